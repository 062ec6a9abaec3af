"""Helpers the three tools share (teacher_dump, student_train, eval), outside the store core.

Model aliases and loading (hf, models.yaml, tokenizer_identity), raw data and its record
formats (data_sources, record_formats, data, hub_data, hub_probe), the option tables of the
tools' configs (options), token-budget batching (batching) and the pooling of hidden states
and attention maps (pooling).

The boundary: torch, transformers and datasets are imported lazily, inside the functions
that need them, so importing a module here stays light (pooling alone imports torch at the
top: it is torch math); the store core (`logitstore` itself: format, writer, reader,
verify...) never imports this package, and the tools import it and the core, never each
other.
"""
