"""A store's files at any fsspec URL: atomic writes, checksummed reads, and zarr access.

Local paths get temp-file + fsync + rename; object stores (s3://, gs://, memory://) write
each object in one PUT, which is atomic there. Readers may add a local read cache
(fsspec's `filecache`), and zarr reads go through a small wrapper that caches shard
indexes so random reads cost one request per chunk instead of two.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections import OrderedDict
from typing import Any

import fsspec
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
from fsspec.implementations.local import LocalFileSystem
from zarr.abc.store import SuffixByteRequest
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from logitstore.format import MANIFEST, TMP_MARK


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class StoreFS:
    """Files of one store, addressed by paths relative to its root."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | None = None):
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.cached = cache_dir is not None and not isinstance(fs, LocalFileSystem)
        self._uncached = fs  # manifest.json is replaced by every commit: never read it cached
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

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        fs = self._uncached if rel == MANIFEST else self.fs
        return fs.cat_file(self.path(rel))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file so that readers see either nothing/the old bytes or all new bytes."""
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
        if self.fs.exists(full):
            self.fs.rm(full, recursive=recursive)

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under rel; [] when rel does not exist."""
        full = self.path(rel)
        try:
            entries = self.fs.ls(full, detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries
                      if e.rstrip("/") != full.rstrip("/"))

    def walk_files(self, rel: str) -> list[str]:
        """All file paths under rel, relative to the store root."""
        full = self.path(rel)
        if not self.fs.exists(full):
            return []
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p
                      for p in self.fs.find(full))

    def zarr_store(self) -> "ShardIndexCache":
        """A read-only zarr store rooted at the store root (shard indexes cached); one per StoreFS."""
        if self._zarr is None:
            if self.is_local:
                inner = LocalStore(self.root, read_only=True)
            else:
                # (a caching wrapper reports its target's async_impl, but is itself sync)
                if getattr(self.fs, "async_impl", False) and not self.cached:
                    # zarr drives its own event loop: give it an instance made for that.
                    afs = type(self.fs)(asynchronous=True, **self.fs.storage_options)
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
