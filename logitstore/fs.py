"""A store's files at any fsspec URL: atomic writes, checksummed reads, and zarr access.

Local paths get temp-file + fsync + rename; object stores (s3://, gs://, memory://) write
each object in one PUT, which is atomic there. Readers may add a local read cache
(fsspec's `filecache`), and zarr reads go through a small wrapper that caches shard
indexes so random reads cost one request per chunk instead of two.

Failures of the storage itself (timeouts, refused connections, permissions, missing
credentials) become `StoreIOError` naming the URL, never a checksum error: nothing is known
to be wrong with the bytes. Reads are idempotent, so a timeout or a dropped connection is
retried (`RETRY_DELAYS`) before it is reported.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
from fsspec.implementations.local import LocalFileSystem
from zarr.abc.store import SuffixByteRequest
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from logitstore.errors import LogitStoreError, StoreIOError
from logitstore.format import MANIFEST, PART_HEAD, TMP_MARK

T = TypeVar("T")

# Seconds to wait before the 2nd, 3rd, ... attempt of a read that timed out or lost its
# connection (client libraries such as s3fs retry on their own first).
RETRY_DELAYS: tuple[float, ...] = (0.5, 2.0)
TRANSIENT_ERRORS = (TimeoutError, ConnectionError)
# Not storage failures: a missing file is reported as missing (or damage) by the caller.
_ABSENT_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
# Exceptions of these client libraries are storage failures even when not an OSError
# (botocore's NoCredentialsError, EndpointConnectionError, ...).
_CLIENT_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google.auth", "google.api_core",
                   "azure", "adlfs", "aiohttp", "requests", "urllib3")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def storage_error(err: BaseException, url: str, attempts: int = 1) -> StoreIOError | None:
    """`err` as a StoreIOError naming `url` when it is a failure to reach or use the storage
    (not a missing file and not bad bytes); None otherwise."""
    if isinstance(err, StoreIOError):
        return err
    if isinstance(err, _ABSENT_ERRORS):
        return None
    modules = [c.__module__ for c in type(err).__mro__]
    if not isinstance(err, OSError) and not any(m.startswith(_CLIENT_MODULES) for m in modules):
        return None
    name = type(err).__name__
    detail = str(err).splitlines()[0] if str(err) else name
    tries = f" (after {attempts} attempts)" if attempts > 1 else ""
    if "Credential" in name:
        return StoreIOError(
            f"cannot access {url}: no usable credentials ({name}: {detail}). Provide them the "
            f"usual way for the storage (for s3://: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            f"or AWS_PROFILE; for gs://: GOOGLE_APPLICATION_CREDENTIALS) and retry")
    if isinstance(err, PermissionError):
        return StoreIOError(f"I/O error on {url}: permission denied ({detail}); check the "
                            f"access rights of this path or bucket. This is not damage to the "
                            f"store")
    return StoreIOError(f"I/O error on {url}: {name}: {detail}{tries}. The storage could not "
                        f"be reached or did not answer; this is not damage to the store: "
                        f"retry later, or check the network and the endpoint")


def with_retries(url: str, action: Callable[[], T], retry: bool = True) -> T:
    """`action()`; transient errors retried (when `retry`), storage failures raised as
    StoreIOError naming `url`; anything else (a missing file, bad bytes) as it was."""
    delays = RETRY_DELAYS if retry else ()
    for attempt in range(len(delays) + 1):
        try:
            return action()
        except TRANSIENT_ERRORS as err:
            if attempt == len(delays):
                raise storage_error(err, url, attempt + 1) from err
            time.sleep(delays[attempt])
        except Exception as err:
            failure = storage_error(err, url)
            if failure is None:
                raise
            raise failure from err
    raise AssertionError("unreachable")


def _open_filesystem(url: str, options: dict[str, Any]):
    """(filesystem, root path) of an fsspec URL; LogitStoreError when it cannot be opened."""
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as err:
        raise LogitStoreError(f"cannot open {url}: {err} (the package that handles its URL "
                              f"scheme is not installed)") from None
    except (ValueError, OSError, TypeError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LogitStoreError(f"cannot open {url}: {detail}. Give a local path or an fsspec "
                              f"URL such as s3://bucket/prefix, gs://bucket/prefix or "
                              f"memory://name") from None


class StoreFS:
    """Files of one store, addressed by paths relative to its root."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | None = None):
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        fs, root = _open_filesystem(self.url, self.storage_options)
        self.cached = cache_dir is not None and not isinstance(fs, LocalFileSystem)
        # manifest.json and the part heads are replaced by commits: never read them cached
        self._uncached = fs
        if self.cached:
            # Whole-file cache: shards are immutable once committed, so cached copies stay valid.
            fs = fsspec.filesystem("filecache", fs=fs, cache_storage=str(cache_dir),
                                   check_files=False, same_names=False)
        self.fs = fs
        self.root = root.rstrip("/") if root not in ("/", "") else root
        self.is_local = isinstance(fs, LocalFileSystem)
        self._zarr: ShardIndexCache | None = None

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str = "") -> str:
        """The full URL of a file of the store (as the user would write it)."""
        return f"{self.url.rstrip('/')}/{rel}" if rel else self.url

    def exists(self, rel: str = "") -> bool:
        return with_retries(self.url_of(rel), lambda: self.fs.exists(self.path(rel)))

    def read_bytes(self, rel: str, size: int | None = None) -> bytes:
        """The bytes of `rel`; `size`, when the caller knows it (a manifest's or record's
        entry), lets a small file be read in one request (see `_one_request`)."""
        replaced = rel == MANIFEST or rel.rsplit("/", 1)[-1] == PART_HEAD
        fs = self._uncached if replaced else self.fs
        kwargs = self._one_request(fs, rel, size)
        return with_retries(self.url_of(rel), lambda: fs.cat_file(self.path(rel), **kwargs))

    def read_bytes_if_present(self, rel: str, size: int | None = None) -> bytes | None:
        """The bytes of `rel`, or None when there is no such file (verify names it missing)."""
        try:
            return self.read_bytes(rel, size)
        except FileNotFoundError:
            return None

    @staticmethod
    def _one_request(fs, rel: str, size: int | None) -> dict[str, Any]:
        """cat_file arguments that read a small file with one GET.

        s3fs asks for the size of every file it reads whole (a HEAD), to split files larger
        than its block size into concurrent ranged GETs: that doubles the requests of a
        store's many small files (metadata JSON: manifest, heads, records, zarr.json; and
        files whose recorded size is below the block size). Other filesystems: no change."""
        block = getattr(fs, "default_block_size", None)
        if getattr(fs, "max_concurrency", None) is None or not block:
            return {}
        small = rel.endswith(".json") or (size is not None and size <= block)
        return {"max_concurrency": 1} if small else {}

    def size(self, rel: str) -> int:
        return int(with_retries(self.url_of(rel), lambda: self.fs.size(self.path(rel))))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file so that readers see either nothing/the old bytes or all new bytes."""
        with_retries(self.url_of(rel), lambda: self._write(rel, data), retry=False)

    def _write(self, rel: str, data: bytes) -> None:
        full = self.path(rel)
        if self.is_local:
            directory = os.path.dirname(full)
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f"{TMP_MARK}{uuid.uuid4().hex}-{os.path.basename(full)}")
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, full)
        else:
            self.fs.pipe_file(full, data)

    def delete(self, rel: str, recursive: bool = False) -> None:
        full = self.path(rel)
        if self.exists(rel):
            with_retries(self.url_of(rel), lambda: self.fs.rm(full, recursive=recursive),
                         retry=False)

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under rel; [] when rel does not exist."""
        full = self.path(rel)
        # Object-store filesystems (s3fs, gcsfs) cache listings without expiry; other
        # processes (the ranks of a dump) create parts and files: always list afresh.
        self.fs.invalidate_cache(full)
        try:
            entries = with_retries(self.url_of(rel), lambda: self.fs.ls(full, detail=False))
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries
                      if e.rstrip("/") != full.rstrip("/"))

    def walk_files(self, rel: str) -> list[str]:
        """All file paths under rel, relative to the store root."""
        full = self.path(rel)
        if not self.exists(rel):
            return []
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p
                      for p in with_retries(self.url_of(rel), lambda: self.fs.find(full)))

    def zarr_store(self) -> "ShardIndexCache":
        """A read-only zarr store rooted at the store root (shard indexes cached); one per StoreFS."""
        if self._zarr is None:
            if self.is_local:
                inner = LocalStore(self.root, read_only=True)
            else:
                # (a caching wrapper reports its target's async_impl, but is itself sync)
                if getattr(self.fs, "async_impl", False) and not self.cached:
                    # zarr drives its own event loop: give it an instance made for that.
                    options = dict(self.fs.storage_options)
                    if hasattr(self.fs, "max_concurrency"):
                        # zarr reads shards by byte range; what it reads whole is metadata
                        # and small chunks: one GET each, not a HEAD first (`_one_request`)
                        options.setdefault("max_concurrency", 1)
                    afs = type(self.fs)(asynchronous=True, **options)
                else:
                    afs = AsyncFileSystemWrapper(self.fs, asynchronous=True)
                inner = FsspecStore(afs, path=self.root, read_only=True)
            self._zarr = ShardIndexCache(inner, whole_files=self.cached)
        return self._zarr


class ShardIndexCache(WrapperStore):
    """Caches suffix reads (zarr's shard-index reads) of immutable shard files, LRU-bounded."""

    max_entries = 4096

    def __init__(self, store, whole_files: bool = False):
        super().__init__(store)
        self._cache: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._whole_files = whole_files

    async def get(self, key, prototype, byte_range=None):
        # Chunk reads are idempotent: a timeout or a dropped connection is retried here
        # (reported by the reader as an I/O error, not as damage, if it persists).
        for delay in RETRY_DELAYS:
            try:
                return await self._get(key, prototype, byte_range)
            except TRANSIENT_ERRORS:
                await asyncio.sleep(delay)
        return await self._get(key, prototype, byte_range)

    async def _get(self, key, prototype, byte_range=None):
        if not isinstance(byte_range, SuffixByteRequest):
            return await self._store.get(key, prototype, byte_range)
        slot = (key, byte_range.suffix)
        if slot in self._cache:
            self._cache.move_to_end(slot)
            return self._cache[slot]
        if self._whole_files:
            # fsspec's whole-file cache serves plain local files, which cannot answer suffix
            # ranges (no .size): read the (now locally cached) file whole and keep its tail.
            value = await self._store.get(key, prototype, None)
            if value is not None:
                value = value[max(len(value) - byte_range.suffix, 0):]
        else:
            value = await self._store.get(key, prototype, byte_range)
        if value is not None:
            self._cache[slot] = value
            if len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return value
