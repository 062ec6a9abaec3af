"""logitstore: a versioned, checksummed store of teacher signals for offline distillation.

The store core (format, writer, reader, CLI) is numpy + zarr + pyarrow and never imports
torch; `logitstore.toolkit.hf` holds the Hugging Face helpers and imports torch lazily.
"""

__version__ = "0.1.0"

from logitstore.errors import LogitStoreError  # noqa: E402

__all__ = ["LogitStoreError", "__version__"]
