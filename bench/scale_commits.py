"""One simulated dump for bench/scale_bench.py: the per-commit figures of its writers, the
consolidation, and the open + `info` and `verify` times of the finished store.

    from scale_commits import simulate_dump      # bench/ on sys.path
    run = simulate_dump(ROOT, "s3://bucket/store", segments=10_000, parts=2, mode="ranks",
                        storage_options={...}, workdir=Path("bench/out/work"))

Every step runs in a subprocess of this file (`python bench/scale_commits.py STEP ARGS.json
OUT.json`) with PYTHONPATH set to the checkout under test (`code`) and its tests/ folder,
so the same steps measure this checkout or an older one (the baseline, e.g. a git worktree
of the commit before format 2.0); each step records which `logitstore` it imported. Steps:

- `write`: one StoreWriter part (`commit_store=False`, a rank of a multi-rank dump, or
  `True`, a single writer that commits the store itself). Every sample fills one segment
  (`segment_tokens` tokens, top-k 8 from tests/synthetic.py's Zipf teacher; a pool of 20
  distinct samples reused under new ids of one length), so every `add()` commits one
  segment. Per commit: wall and CPU seconds of the `add()`, bytes and files written through
  `StoreFS.write_bytes` (wrapped), and S3 API calls made through s3fs
  (`S3FileSystem._call_s3` wrapped: one per request s3fs makes, its own retries aside).
  `close()` is timed apart (a single writer consolidates there).
- `consolidate`: `commit_store` of the store (ranks mode, after every rank has closed).
- `read`: `StoreReader` + `info.size_report` of the manifest (what `logitstore info`
  does), then `verify_store`, each timed, with the s3fs instance cache cleared in between.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

POOL = 20  # distinct samples; a multiple of it divides 100, so every 100 commits hold each 5x
TOP_K = 8
VOCAB = 500


# -- inside a step's subprocess (imports the logitstore of PYTHONPATH) -----------------------

class Traffic:
    """Bytes and files written through StoreFS and S3 calls made through s3fs, since `take()`."""

    def __init__(self, part: str | None = None):
        from logitstore.fs import StoreFS

        self.part = part
        self.bytes = self.meta_bytes = self.files = 0
        self.calls: Counter[str] = Counter()
        write = StoreFS.write_bytes

        def write_bytes(fs, rel, data):
            self.bytes += len(data)
            self.files += 1
            if part is None or not rel.startswith(f"parts/{part}/seg-"):
                self.meta_bytes += len(data)  # what is not the segment's own data
            return write(fs, rel, data)

        StoreFS.write_bytes = write_bytes
        try:
            import s3fs
        except ImportError:
            return
        call = s3fs.S3FileSystem._call_s3

        async def call_s3(fs, method, *args, **kwargs):
            self.calls[method if isinstance(method, str) else method.__name__] += 1
            return await call(fs, method, *args, **kwargs)

        s3fs.S3FileSystem._call_s3 = call_s3

    def take(self) -> dict:
        out = {"bytes": self.bytes, "meta_bytes": self.meta_bytes, "files": self.files,
               "requests": sum(self.calls.values()), "calls": dict(self.calls)}
        self.bytes = self.meta_bytes = self.files = 0
        self.calls = Counter()
        return out


def bench_settings(segment_tokens: int):
    from logitstore.format import SignalSpec, StoreSettings, TopKSpec

    return StoreSettings(vocab_size=VOCAB, tokenizer_fingerprint="ab" * 32,
                         tokenizer_name="synthetic", chunk_tokens=segment_tokens,
                         segment_tokens=segment_tokens, chunk_samples=4,
                         signals={"teacher": SignalSpec(topk=TopKSpec(TOP_K),
                                                        teacher={"model_id": "synthetic-zipf"})})


def sample_pool(segment_tokens: int, seed: int) -> list:
    import numpy as np
    from synthetic import ZipfTeacher, random_sample

    rng = np.random.default_rng(seed)
    teacher = ZipfTeacher(vocab_size=VOCAB)
    return [random_sample(rng, f"pool-{i}", segment_tokens, teacher, k=TOP_K)
            for i in range(POOL)]


def step_write(args: dict) -> dict:
    """A part of `args["segments"]` one-segment commits (module docstring)."""
    from logitstore.segment import encode_segment
    from logitstore.writer import StoreWriter

    settings = bench_settings(args["segment_tokens"])
    pool = sample_pool(args["segment_tokens"], args["seed"])
    encode_segment(pool[:1], settings)  # codecs warmed up before the first timed commit
    traffic = Traffic(args["part"])
    writer = StoreWriter(args["url"], settings, part=args["part"],
                         storage_options=args["options"], commit_store=args["commit_store"])
    opened = traffic.take()
    commits = []
    for i in range(args["segments"]):
        sample = replace(pool[i % POOL], sample_id=f"{args['part']}-{i:07d}")
        before = writer.committed_count
        start, cpu = time.perf_counter(), time.process_time()
        writer.add(sample)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        if writer.committed_count != before + 1:
            raise RuntimeError(f"add() of sample {i} committed {writer.committed_count - before} "
                               f"segments, expected 1: check segment_tokens")
        commits.append({"seconds": seconds, "cpu_seconds": cpu, **traffic.take()})
    start = time.perf_counter()
    writer.close()
    closed = {"seconds": time.perf_counter() - start, **traffic.take()}
    return {"open": opened, "commits": commits, "close": closed}


def step_consolidate(args: dict) -> dict:
    from logitstore.commit import commit_store

    traffic = Traffic()
    start = time.perf_counter()
    manifest = commit_store(args["url"], storage_options=args["options"])
    return {"seconds": time.perf_counter() - start, **traffic.take(),
            "segments": manifest["counts"]["segments"]}


def step_read(args: dict) -> dict:
    from logitstore.info import size_report
    from logitstore.reader import StoreReader
    from logitstore.verify import verify_store

    traffic = Traffic()
    start = time.perf_counter()
    reader = StoreReader(args["url"], storage_options=args["options"])
    sizes = size_report(reader.manifest)
    opened = {"seconds": time.perf_counter() - start, **traffic.take(),
              "samples": len(reader), "segments": reader.manifest["counts"]["segments"],
              "store_bytes": sizes["total_bytes"]}
    _forget_s3_instances()  # verify starts as cold as the open did
    start = time.perf_counter()
    problems = verify_store(args["url"], storage_options=args["options"])
    checked = {"seconds": time.perf_counter() - start, **traffic.take(),
               "problems": len(problems), "first_problems": problems[:3]}
    return {"open_info": opened, "verify": checked}


def _forget_s3_instances() -> None:
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


STEPS = {"write": step_write, "consolidate": step_consolidate, "read": step_read}


def step_main(step: str, args_file: str, out_file: str) -> None:
    import logitstore

    args = json.loads(Path(args_file).read_text())
    result = STEPS[step](args)
    result["logitstore"] = os.path.dirname(logitstore.__file__)
    Path(out_file).write_text(json.dumps(result))


# -- in the benchmark process ----------------------------------------------------------------

def run_step(code: Path, step: str, args: dict, workdir: Path, name: str) -> subprocess.Popen:
    """Start one step under `code` (module docstring); `finish_step` collects it."""
    workdir.mkdir(parents=True, exist_ok=True)
    args_file, out_file = workdir / f"{name}.args.json", workdir / f"{name}.out.json"
    args_file.write_text(json.dumps(args))
    out_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{code / 'tests'}"}
    log = (workdir / f"{name}.stderr.txt").open("wb")
    proc = subprocess.Popen([sys.executable, __file__, step, str(args_file), str(out_file)],
                            env=env, cwd=str(code), stdout=log, stderr=subprocess.STDOUT)
    proc.out_file, proc.log_file = out_file, workdir / f"{name}.stderr.txt"
    return proc


def finish_step(proc: subprocess.Popen, code: Path) -> dict:
    if proc.wait() != 0:
        tail = proc.log_file.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"benchmark step {proc.args[2]} under {code} exited "
                           f"{proc.returncode}:\n{tail}")
    result = json.loads(proc.out_file.read_text())
    if not result["logitstore"].startswith(str(code)):
        raise RuntimeError(f"benchmark step {proc.args[2]} imported logitstore from "
                           f"{result['logitstore']}, expected the checkout {code}: "
                           f"check PYTHONPATH and editable installs")
    return result


def simulate_dump(code: Path, url: str, *, segments: int, parts: int, mode: str,
                  storage_options: dict | None, workdir: Path, segment_tokens: int = 16,
                  seed: int = 0, server_requests=None) -> dict:
    """One dump under `code` into `url` (fresh); `mode` "ranks": `parts` writers at the
    same time, then `commit_store`; "single": one writer committing the store itself.
    `server_requests()`: the S3 server's request count so far (None: not S3)."""
    parts = 1 if mode == "single" else parts
    per_part = [segments // parts + (i < segments % parts) for i in range(parts)]
    base = {"url": url, "options": storage_options, "segment_tokens": segment_tokens,
            "seed": seed}
    counted = server_requests or (lambda: 0)
    phases, server = {}, {}
    before, start = counted(), time.perf_counter()
    procs = [run_step(code, "write", {**base, "part": f"part-{i:05d}", "segments": n,
                                      "commit_store": mode == "single"}, workdir, f"write-{i}")
             for i, n in enumerate(per_part)]
    writes = [finish_step(p, code) for p in procs]
    phases["write_s"], server["write"] = time.perf_counter() - start, counted() - before
    if mode == "ranks":
        before = counted()
        consolidated = finish_step(run_step(code, "consolidate", base, workdir, "consolidate"),
                                   code)
        server["consolidate"] = counted() - before
    else:
        consolidated = writes[0]["close"]  # the single writer's close() consolidated
    before = counted()
    read = finish_step(run_step(code, "read", base, workdir, "read"), code)
    server["read"] = counted() - before
    return {"code": str(code), "url": url, "mode": mode, "segments": segments, "parts": parts,
            "segment_tokens": segment_tokens, "logitstore": writes[0]["logitstore"],
            "writes": writes, "consolidate": consolidated, "read": read, "phases": phases,
            "server_requests": server if server_requests else None}


# -- figures of one run ------------------------------------------------------------------------

def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _ends(run: dict, key: str, window: int) -> tuple[list, list]:
    """`key` of every part's first and last `window` commits, pooled over the parts."""
    first, last = [], []
    for write in run["writes"]:
        values = [c[key] for c in write["commits"]]
        first += values[:window]
        last += values[-window:]
    return first, last


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def summarise(run: dict, window: int = 100) -> dict:
    """The benchmark's figures of one `simulate_dump` run: its parts' last `window` commits
    against their first (means, and medians for time: robust to a busy machine), the
    mean commit time in tenths of each part (a flat curve is the goal), S3 requests per
    commit, consolidation, open + info and verify."""
    per_part = min(len(w["commits"]) for w in run["writes"])
    window = min(window, per_part // 2)
    t_first, t_last = _ends(run, "seconds", window)
    c_first, c_last = _ends(run, "cpu_seconds", window)
    b_first, b_last = _ends(run, "bytes", window)
    m_first, m_last = _ends(run, "meta_bytes", window)
    f_first, f_last = _ends(run, "files", window)
    r_first, r_last = _ends(run, "requests", window)
    slices = min(10, per_part)
    tenths = [_mean([c["seconds"] for w in run["writes"] for c in
                     w["commits"][per_part * k // slices:per_part * (k + 1) // slices]]) * 1e3
              for k in range(slices)]
    read, server = run["read"], run["server_requests"]
    out = {
        "mode": run["mode"], "segments": run["segments"], "parts": run["parts"],
        "commits_per_part": per_part, "window": window, "logitstore": run["logitstore"],
        "commit_ms": {"first_mean": _mean(t_first) * 1e3, "last_mean": _mean(t_last) * 1e3,
                      "first_median": _median(t_first) * 1e3,
                      "last_median": _median(t_last) * 1e3},
        "commit_time_ratio": _ratio(_mean(t_last), _mean(t_first)),
        "commit_time_ratio_median": _ratio(_median(t_last), _median(t_first)),
        # CPU seconds of the writer's process: less disturbed by other load than wall time
        "commit_cpu_ms": {"first_mean": _mean(c_first) * 1e3, "last_mean": _mean(c_last) * 1e3},
        "commit_cpu_ratio": _ratio(_mean(c_last), _mean(c_first)),
        "commit_ms_by_tenth": [round(t, 2) for t in tenths],
        "bytes_per_commit": {"first": _mean(b_first), "last": _mean(b_last),
                             "metadata_first": _mean(m_first), "metadata_last": _mean(m_last)},
        "bytes_ratio": _ratio(_mean(b_last), _mean(b_first)),
        "files_per_commit": {"first": _mean(f_first), "last": _mean(f_last)},
        "write_wall_s": run["phases"]["write_s"],
        "consolidate_s": run["consolidate"]["seconds"],
        "consolidate_bytes": run["consolidate"]["bytes"],
        "open_info_s": read["open_info"]["seconds"], "verify_s": read["verify"]["seconds"],
        "verify_problems": read["verify"]["problems"],
        "store": {"samples": read["open_info"]["samples"],
                  "segments": read["open_info"]["segments"],
                  "bytes": read["open_info"]["store_bytes"]},
    }
    if server is not None:
        calls = Counter()
        for write in run["writes"]:
            for commit in write["commits"][-window:]:
                calls.update(commit["calls"])
        out["s3_requests_per_commit"] = {
            "client_first": _mean(r_first), "client_last": _mean(r_last),
            "client_last_by_call": {k: v / len(r_last) for k, v in sorted(calls.items())},
            # the server's count of the write phase, less the requests s3fs made while
            # opening and closing the writers (a single writer consolidates at close)
            "server": (server["write"] - sum(w["open"]["requests"] + w["close"]["requests"]
                                             for w in run["writes"])) / run["segments"]}
        out["s3_requests"] = {"open_info": read["open_info"]["requests"],
                              "verify": read["verify"]["requests"],
                              "consolidate": run["consolidate"]["requests"], "server": server}
    return out


def commit_series(run: dict) -> list[dict]:
    """Every commit's milliseconds, bytes and S3 requests, per part (for plots)."""
    return [{"ms": [round(c["seconds"] * 1e3, 3) for c in w["commits"]],
             "bytes": [c["bytes"] for c in w["commits"]],
             "requests": [c["requests"] for c in w["commits"]]} for w in run["writes"]]


if __name__ == "__main__":
    step_main(*sys.argv[1:4])
