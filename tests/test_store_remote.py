"""Stores on object storage: S3 (moto's S3 server on a loopback port) and fsspec's memory://.

Nothing here reaches the internet: the S3 endpoint is http://127.0.0.1:<free port>, the
credentials are dummies, and AWS config files are pointed at nothing. The library is given
the endpoint through `storage_options` (StoreWriter/StoreReader/verify_store/copy_store);
the CLI, which takes no options, through the AWS_ENDPOINT_URL environment variable.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import fsspec
import pytest
from click.testing import CliRunner

from store_helpers import (assert_same_content, content_differences, content_of, make_samples,
                           make_settings, make_signal, sample_content)

from logitstore.cli import main as cli
from logitstore.errors import ChecksumError, LogitStoreError
from logitstore.format import MANIFEST
from logitstore.reader import StoreReader
from logitstore.transfer import copy_store
from logitstore.verify import verify_store
from logitstore.writer import StoreWriter

boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

# moto answers a request in ~20-50 ms here, so the stores are small: requests are the cost
N = 6
SEED = 21
SETTINGS = make_settings(segment_tokens=48)  # every kind of signal; 2-3 segments
# top-k only, one segment: for the tests about plumbing rather than content (CLI, damage)
SMALL = make_settings(segment_tokens=10_000, signals={"teacher": make_signal(
    n_draws=None, hidden=None, attention=None)})
BUCKET = "logitstore-test"


class S3:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.options = {"key": "testing", "secret": "testing",
                        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing")

    def url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    def keys(self, prefix: str) -> set[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                      Prefix=prefix + "/")
        return {obj["Key"][len(prefix) + 1:] for page in pages for obj in page.get("Contents", [])}


def _clear_s3fs_instances() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # none made here may outlive this module


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server in a thread on 127.0.0.1:<free port>, with one empty bucket."""
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                     "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        werkzeug_log = logging.getLogger("werkzeug")
        level = werkzeug_log.level
        werkzeug_log.setLevel(logging.WARNING)  # one line per request otherwise
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        _clear_s3fs_instances()
        try:
            host, port = server.get_host_and_port()
            assert host == "127.0.0.1"
            s3 = S3(f"http://{host}:{port}")
            s3.client.create_bucket(Bucket=BUCKET)
            yield s3
        finally:
            _clear_s3fs_instances()
            server.stop()
            werkzeug_log.setLevel(level)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A local store of the N samples: the content every remote copy must hold."""
    path = tmp_path_factory.mktemp("remote") / "local"
    with StoreWriter(str(path), SETTINGS) as writer:
        writer.add_many(make_samples(N, SEED, SETTINGS))
    reader = StoreReader(str(path))
    assert len(reader.segments) >= 2
    return str(path), reader, content_of(reader)


@pytest.fixture(scope="module")
def small_local(tmp_path_factory):
    path = tmp_path_factory.mktemp("remote") / "small"
    with StoreWriter(str(path), SMALL) as writer:
        writer.add_many(make_samples(3, SEED, SMALL))
    return str(path), StoreReader(str(path))


@pytest.fixture(scope="module")
def s3_store(s3):
    """The same samples written straight to S3 by StoreWriter."""
    url = s3.url("written")
    with StoreWriter(url, SETTINGS, storage_options=s3.options) as writer:
        writer.add_many(make_samples(N, SEED, SETTINGS))
    return url


def test_write_read_verify_on_s3(s3, s3_store, local):
    _, local_reader, local_content = local
    assert MANIFEST in s3.keys("written")  # it really is in the (moto) bucket
    reader = StoreReader(s3_store, storage_options=s3.options)
    assert reader.sample_ids == local_reader.sample_ids
    # random access by id and by position
    for sid in (reader.sample_ids[0], reader.sample_ids[-1]):
        assert not content_differences({sid: sample_content(reader.sample(sid))},
                                       {sid: local_content[sid]})
    assert reader.sample(1).sample_id == reader.sample_ids[1]
    # streaming, every sample and signal array
    assert_same_content(reader, local_reader)
    assert verify_store(s3_store, storage_options=s3.options) == []


def test_copy_local_to_s3_and_back(s3, local, tmp_path):
    path, local_reader, _ = local
    remote = s3.url("copied")
    copy_store(path, remote, dst_options=s3.options)
    assert MANIFEST in s3.keys("copied")
    back = tmp_path / "back"
    copy_store(remote, str(back), src_options=s3.options)
    assert verify_store(str(back)) == []
    assert_same_content(StoreReader(str(back)), local_reader)
    assert (back / MANIFEST).read_bytes() == (Path(path) / MANIFEST).read_bytes()
    with pytest.raises(LogitStoreError, match="already holds a store"):
        copy_store(path, remote, dst_options=s3.options)


def test_cli_cp_between_local_and_s3(s3, small_local, tmp_path, monkeypatch):
    path, local_reader = small_local
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # the CLI takes no storage options
    _clear_s3fs_instances()
    try:
        runner = CliRunner()
        result = runner.invoke(cli, ["cp", path, s3.url("cli")])  # copies, then verifies
        assert result.exit_code == 0, result.output
        assert "verified" in result.output
        assert MANIFEST in s3.keys("cli")

        again = runner.invoke(cli, ["cp", path, s3.url("cli")])
        assert again.exit_code == 1 and "already holds a store" in again.output

        back = tmp_path / "back"
        result = runner.invoke(cli, ["cp", s3.url("cli"), str(back)])
        assert result.exit_code == 0, result.output
    finally:
        _clear_s3fs_instances()
    assert_same_content(StoreReader(str(back)), local_reader)


def test_reader_with_local_cache_on_s3(s3, s3_store, local, tmp_path):
    _, local_reader, local_content = local
    cache = tmp_path / "cache"
    reader = StoreReader(s3_store, storage_options=s3.options, cache_dir=str(cache))
    sid = reader.sample_ids[-1]
    assert not content_differences({sid: sample_content(reader.sample(sid))},
                                   {sid: local_content[sid]})  # ranged reads through the cache
    assert_same_content(reader, local_reader)
    assert any(cache.iterdir()), "nothing was cached"


def test_corrupted_objects_on_s3_are_detected(s3, small_local):
    path, local_reader = small_local
    url = s3.url("corrupt")
    copy_store(path, url, dst_options=s3.options)  # checks every object as it arrives
    seg = local_reader.segments[0].path
    damaged, removed = f"{seg}/input_ids/c/0", f"{seg}/loss_mask/zarr.json"
    body = bytearray(s3.client.get_object(Bucket=BUCKET, Key=f"corrupt/{damaged}")["Body"].read())
    body[len(body) // 2] ^= 0x40
    s3.client.put_object(Bucket=BUCKET, Key=f"corrupt/{damaged}", Body=bytes(body))
    s3.client.delete_object(Bucket=BUCKET, Key=f"corrupt/{removed}")

    problems = verify_store(url, storage_options=s3.options)
    assert any(damaged in p and "damaged" in p for p in problems), problems
    assert any(removed in p and "missing" in p for p in problems), problems
    assert all(damaged in p or f"{seg}/loss_mask" in p for p in problems), problems
    reader = StoreReader(url, storage_options=s3.options)
    with pytest.raises(ChecksumError):  # the chunk's crc32c catches it on read, too
        reader.sample(0)


# -- memory:// ----------------------------------------------------------------------------------

@pytest.fixture
def memory_root():
    root = f"memory://logitstore-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_memory_write_read_copy(memory_root, local, tmp_path):
    path, local_reader, _ = local
    url = f"{memory_root}/store"
    with StoreWriter(url, SETTINGS) as writer:
        writer.add_many(make_samples(N, SEED, SETTINGS))
    assert verify_store(url) == []
    reader = StoreReader(url)
    assert reader.sample(reader.sample_ids[2]).sample_id == reader.sample_ids[2]
    assert_same_content(reader, local_reader)

    copy_store(path, f"{memory_root}/copy")
    assert_same_content(StoreReader(f"{memory_root}/copy"), local_reader)
    result = CliRunner().invoke(cli, ["cp", url, str(tmp_path / "from-memory")])
    assert result.exit_code == 0, result.output
    assert_same_content(StoreReader(str(tmp_path / "from-memory")), local_reader)


def test_cache_dir_serves_data_from_the_cache_and_sees_new_commits(memory_root, local,
                                                                   tmp_path):
    _, local_reader, local_content = local
    url = f"{memory_root}/store"
    with StoreWriter(url, SETTINGS, part="first") as writer:
        writer.add_many(make_samples(N, SEED, SETTINGS))
    cache = str(tmp_path / "cache")
    assert_same_content(StoreReader(url, cache_dir=cache), local_reader)  # fills the cache

    # drop every data file from the remote: a new cached reader still reads them all
    fs = fsspec.filesystem("memory")
    root = url[len("memory://"):]
    for rel in StoreReader(url).manifest["files"]:
        fs.rm(f"{root}/{rel}")
    cached = StoreReader(url, cache_dir=cache)
    assert not content_differences(content_of(cached), local_content)
    sid = cached.sample_ids[-1]
    assert not content_differences({sid: sample_content(cached.sample(sid))},
                                   {sid: local_content[sid]})

    # the manifest is not served stale from the cache: a later commit is seen
    more = make_samples(3, SEED + 1, SETTINGS)
    with StoreWriter(url, SETTINGS, part="second") as writer:  # commits the store on close
        writer.add_many(more)
    later = StoreReader(url, cache_dir=cache)
    assert len(later) == N + 3
    assert later.sample(more[-1].sample_id).sample_id == more[-1].sample_id

    # nor a part's head: a running writer's newer segments are seen (readers follow heads)
    running = StoreWriter(url, SETTINGS, part="third")
    seen = []
    for sample in make_samples(8, SEED + 2, SETTINGS):
        running.add(sample)
        if running.committed_count and running.committed_count not in seen:
            seen.append(running.committed_count)
            assert len(StoreReader(url, cache_dir=cache)) == N + 3 + running.committed_count
    assert len(seen) >= 2, seen
    running.abort()
