"""Error hierarchy for logitstore.

Every error subclasses a builtin (as zarr-python does) so callers can catch either the
precise class or the builtin they already expect. Messages say what was expected and
what was found, and how to fix it.
"""

from __future__ import annotations


class LogitStoreError(ValueError):
    """Base class: something about a store, its inputs or its settings is wrong."""


class StoreNotFoundError(LogitStoreError, FileNotFoundError):
    """No store at the given URL."""


class ManifestMissingError(LogitStoreError, FileNotFoundError):
    """The store directory exists but has no committed manifest (dump incomplete or running)."""


class StoreIOError(LogitStoreError, OSError):
    """Storage could not be read or written (timeout, connection, permission, credentials):
    nothing is known to be wrong with the store's bytes, so this is never reported as damage."""


class FormatVersionError(LogitStoreError):
    """The store was written with a format major version this reader does not understand."""


class ChecksumError(LogitStoreError):
    """A data file's bytes differ from the checksum recorded at commit time."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class MissingFileError(ChecksumError):
    """A file that the committed state of a store lists is absent: the store is damaged."""


class SchemaMismatchError(LogitStoreError):
    """Shapes, dtypes or capture settings differ between parts, signals or writers."""


class SettingsMismatchError(SchemaMismatchError):
    """Writing into a store that was created with different settings."""


class StoreKindError(SchemaMismatchError):
    """An API of one kind of store (causal-lm: tokens; classifier: per-sample heads, 2.3)
    used on a store, writer or sample of the other kind."""


class UnknownSampleError(LogitStoreError, KeyError):
    """A sample id (or index) that the store does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownSignalError(LogitStoreError, KeyError):
    """A signal name that the store does not hold."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(LogitStoreError):
    """A configuration (YAML + flags) that failed validation; lists every problem at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


class TokenSpansError(LogitStoreError):
    """Byte spans of a tokenization cannot be computed (e.g. a chat template that rewrites
    message contents beyond trimming whitespace, so its tokens cannot be placed in the text)."""


class OffsetsUnavailableError(TokenSpansError):
    """A tokenizer that reports no token offsets (a slow, pure-Python one): use a fast one."""
