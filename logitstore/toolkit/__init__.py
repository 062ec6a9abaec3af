"""Helpers the tools share (teacher_dump, student_train, eval, student_export, distill_serve),
outside the store core.

Model aliases and loading (hf, models.yaml, tokenizer_identity), raw data and its record
formats (data_sources, record_formats, data, hub_data, hub_probe), the option tables of the
tools' configs (options), token-budget batching (batching) the pooling of hidden states
and attention maps (pooling), and running a student however it was saved (inference, onnx_lm,
torch_int8), image+text classifiers and the adapters that read their logits and features
(classifier_models, classifier_adapter), their records and synthetic data (classify_records,
synthetic_classify) and metrics (classify_metrics), a local server process for tests,
benchmarks and the demo (local_server) and JSON-safe values (json_values).

The boundary: torch, transformers and datasets are imported lazily, inside the functions
that need them, so importing a module here stays light (pooling imports torch at the top: it
is torch math; classifier_models too: it defines an nn.Module and registers it with
transformers' Auto classes); the store core (`logitstore` itself: format, writer, reader,
verify...) never imports this package, and the tools import it and the core, never each
other.
"""

import logging

# transformers imports torchao whenever it is installed (student-export's INT8 path needs it);
# torchao then logs a warning per CUDA-only kernel library it cannot load on a CPU machine, and
# registers enums that torch's pytree warns about. Neither is a problem of the user's run.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
