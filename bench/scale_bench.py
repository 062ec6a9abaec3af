"""Stores at scale (issue 13 section 4): commit cost over a long simulated dump, locally and on
S3 (moto's server on 127.0.0.1), beside the code before format 2.0; then teacher-dump on a
large vs a small input (bench/scale_input.py) and merge/subset vs cp (bench/scale_ops.py).

    python bench/scale_bench.py [--segments 10000 --parts 2 --old-segments 600
        --backends local,s3 --modes ranks,single --old-code /tmp/scale_old
        --skip-input --skip-ops --json bench/out/scale_bench.json --markdown FILE]

The dump (bench/scale_commits.py runs every step in a subprocess whose PYTHONPATH is the
checkout under test): tiny segments (16 tokens, one sample each, top-k 8), so every `add()`
commits one. Mode "ranks": `--parts` writers at the same time (one process each,
`commit_store=False`, as teacher-dump's ranks), then `commit_store` consolidates; mode
"single": one writer that commits the store itself (`commit_store=True`; the issue's "6x at
segment 600" was measured so), consolidating at close. Per backend and mode three runs:

- new code at `--old-segments`, old code (`--old-code`, a worktree of `--old-commit`,
  created when missing) at `--old-segments`: like with like (old commit cost grows with
  the store, so it is measured only where it finishes in reasonable time);
- new code at `--segments` (the scale goal; at least 10,000 over 2 parts).

Figures of each run (scale_commits.summarise): commit time of every part's last 100 commits
/ its first 100 (goal <= 1.3x), bytes written per commit, the same (goal <= 1.3x), files
per commit, open + info and verify seconds of the finished store, and on S3 the requests
per commit, counted twice: by the writer's s3fs calls (`S3FileSystem._call_s3`), and by
the server (a WSGI wrapper around moto's app counts every HTTP request; per commit = the
write phase's requests, less those s3fs made opening and closing the writers, / segments).
The main process imports this checkout's code (sys.path), whatever is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # this checkout, not an installed copy

import logitstore  # noqa: E402
from scale_commits import commit_series, simulate_dump, summarise  # noqa: E402

if not logitstore.__file__.startswith(str(ROOT)):
    raise SystemExit(f"imported logitstore from {logitstore.__file__}, not from {ROOT}")

OLD_COMMIT = "1a95f5e"  # the last commit before format 2.0 (issue 13 section 1)
GOAL = 1.3
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent/aws-config",
          "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
          "AWS_EC2_METADATA_DISABLED": "true"}


class RequestCounter:
    """WSGI middleware around moto's app: counts every HTTP request it serves."""

    def __init__(self, app):
        self.app = app
        self.count = 0
        # (CPU ms of the serving thread, wall ms) of every request in arrival order: tells
        # the server's own cost per request apart from waiting on a busy machine
        self.costs: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        with self._lock:
            self.count += 1
        wall, cpu = time.perf_counter(), time.thread_time()  # werkzeug: a thread per request
        try:
            return self.app(environ, start_response)
        finally:
            cost = ((time.thread_time() - cpu) * 1e3, (time.perf_counter() - wall) * 1e3)
            with self._lock:
                self.costs.append(cost)


class S3Server:
    """moto's S3 server in a thread on 127.0.0.1 (a free port), requests counted."""

    def __enter__(self) -> "S3Server":
        import logging

        from moto.server import ThreadedMotoServer

        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                     "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            os.environ.pop(name, None)
        os.environ.update(S3_ENV)  # dummies; inherited by every step's subprocess
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request else
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.counter = RequestCounter(self.server._server.app)
        self.server._server.app = self.counter  # werkzeug's handler calls server.app
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.options = {"key": "testing", "secret": "testing",
                        "client_kwargs": {"endpoint_url": self.endpoint,
                                          "region_name": "us-east-1"}}
        return self

    def bucket(self, name: str) -> str:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def requests(self) -> int:
        return self.counter.count

    def __exit__(self, *exc) -> None:
        self.server.stop()


def old_checkout(path: Path, commit: str) -> Path:
    """`path`, a git worktree of `commit` of this repository, made when missing."""
    if not (path / "logitstore" / "writer.py").exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path),
                        commit], check=True)
    return path.resolve()


def planned_runs(args) -> list[tuple[str, Path, int, str]]:
    """(label, code, segments, mode) of every dump, per mode: new and old code at
    --old-segments, then new code at --segments."""
    runs = []
    for mode in args.modes:
        if not args.skip_old:
            runs += [("new", ROOT, args.old_segments, mode),
                     ("old", args.old_code, args.old_segments, mode)]
        if args.skip_old or args.segments != args.old_segments:
            runs.append(("new", ROOT, args.segments, mode))
    return runs


def run_dumps(args, backend: str, s3: S3Server | None, figures: dict) -> None:
    for label, code, segments, mode in planned_runs(args):
        name = f"{backend}-{mode}-{label}-{segments}"
        print(f"[scale_bench] {name} ...", file=sys.stderr, flush=True)
        if s3 is not None:
            url, options = f"{s3.bucket(name.lower())}/store", s3.options
        else:
            url, options = str(args.workdir / "stores" / name), None
            shutil.rmtree(url, ignore_errors=True)
        served_before = s3.requests() if s3 else 0
        run = simulate_dump(code, url, segments=segments, parts=args.parts, mode=mode,
                            storage_options=options, workdir=args.workdir / "steps" / name,
                            server_requests=s3.requests if s3 else None)
        summary = {"backend": backend, "code": label,
                   "commit": OLD_COMMIT if label == "old" else _head(), **summarise(run)}
        if s3 is not None:
            summary["server_ms_per_request"] = server_cost_ends(
                s3.counter.costs, served_before, run, summary["window"])
        figures["runs"].append(summary)
        figures["series"][name] = commit_series(run)
        _save(args, figures)
        print(f"[scale_bench] {name}: commit x{summary['commit_time_ratio']}, bytes "
              f"x{summary['bytes_ratio']}, verify {summary['verify_s']:.1f} s",
              file=sys.stderr, flush=True)
        if s3 is None:
            shutil.rmtree(url, ignore_errors=True)


def server_cost_ends(costs: list, start: int, run: dict, window: int) -> dict:
    """moto's CPU and wall ms per request over the write phase's first and last `window`
    commits of every part (requests arrive interleaved from the parts, so the ends are
    taken by request count; the writers' open and close requests are left out)."""
    phase = costs[start:start + run["server_requests"]["write"]]
    opened = sum(w["open"]["requests"] for w in run["writes"])
    closed = sum(w["close"]["requests"] for w in run["writes"])
    per_commit = summarise_requests(run)
    n = max(1, round(per_commit * window * run["parts"]))
    first, last = phase[opened:opened + n], phase[max(opened, len(phase) - closed - n):
                                                   len(phase) - closed]
    out = {}
    for k, key in enumerate(("cpu", "wall")):
        a, b = (sum(c[k] for c in first) / len(first), sum(c[k] for c in last) / len(last))
        out[key] = {"first": round(a, 3), "last": round(b, 3), "ratio": round(b / a, 3)}
    return out


def summarise_requests(run: dict) -> float:
    """Mean S3 requests per commit the writers made (s3fs's count)."""
    commits = [c["requests"] for w in run["writes"] for c in w["commits"]]
    return sum(commits) / len(commits)


def _head() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                            "logitstore"], capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+changes" if dirty else "")


def _save(args, figures: dict) -> None:
    """Written after every run, so an interrupted benchmark keeps what it measured."""
    args.json.parent.mkdir(parents=True, exist_ok=True)
    series = args.json.with_name(args.json.stem + "_commits.json")
    series.write_text(json.dumps(figures["series"]) + "\n")
    body = {k: v for k, v in figures.items() if k != "series"}
    args.json.write_text(json.dumps({**body, "commit_series_file": series.name}, indent=1) + "\n")


def _fmt(value, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def markdown(figures: dict) -> str:
    """The runs as one table, then the input and ops halves' headline figures."""
    lines = ["| backend | mode | code | segments (parts) | commit ms first → last | time ratio "
             f"(goal ≤ {GOAL}) | bytes/commit first → last | bytes ratio | files/commit | "
             "S3 requests/commit (s3fs; server) | consolidate s | open + info s | verify s |",
             "|" + "---|" * 13]
    for r in figures["runs"]:
        ms, by = r["commit_ms"], r["bytes_per_commit"]
        req = r.get("s3_requests_per_commit")
        lines.append(
            f"| {r['backend']} | {r['mode']} | {r['code']} ({r['commit']}) | {r['segments']:,} "
            f"({r['parts']}) | {ms['first_mean']:.1f} → {ms['last_mean']:.1f} | "
            f"{_fmt(r['commit_time_ratio'])}x (median {_fmt(r['commit_time_ratio_median'])}x, "
            f"CPU {_fmt(r.get('commit_cpu_ratio'))}x) | "
            f"{by['first']:,.0f} → {by['last']:,.0f} | {_fmt(r['bytes_ratio'])}x | "
            f"{r['files_per_commit']['last']:.0f} | "
            + (f"{req['client_last']:.1f}; {req['server']:.1f}" if req else "–")
            + f" | {r['consolidate_s']:.2f} | {r['open_info_s']:.2f} | {r['verify_s']:.1f} |")
    served = [r for r in figures["runs"] if r.get("server_ms_per_request")]
    if served:
        lines += ["", "| S3 run | server CPU ms/request first → last | ratio | server wall "
                      "ms/request first → last | ratio |", "|---|---|---|---|---|"]
        for r in served:
            cpu, wall = r["server_ms_per_request"]["cpu"], r["server_ms_per_request"]["wall"]
            lines.append(f"| {r['mode']} {r['code']} {r['segments']:,} | {cpu['first']:.2f} → "
                         f"{cpu['last']:.2f} | {cpu['ratio']:.2f}x | {wall['first']:.2f} → "
                         f"{wall['last']:.2f} | {wall['ratio']:.2f}x |")
    lines.append(f"\nFirst/last: each part's first and last {figures['runs'][0]['window']} "
                 "commits (means; CPU: the writer process's CPU time), tiny segments of one "
                 "16-token sample, top-k 8."
                 if figures["runs"] else "")
    if figures.get("input"):
        inp = figures["input"]
        lines += ["", "| teacher-dump input | records | peak RSS MB | first commit s |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {inp[name]['records']:,} | {inp[name]['peak_rss_mb']:.0f} | "
                  f"{_fmt(inp[name]['first_segment_s'], '.1f')} |" for name in ("small", "large")]
        lines.append(f"| large / small (goal ≤ 1.2) | | {_fmt(inp['ratios']['peak_rss'])}x | "
                     f"{_fmt(inp['ratios']['first_segment'])}x |")
    for dest, ops in (figures.get("ops") or {}).items():
        lines += ["", f"| ops → {dest} | tokens/s in | seconds | / cp |", "|---|---|---|---|"]
        lines += [f"| {op} | {ops[op]['tokens_in_per_s']:,} | {ops[op]['seconds']:.1f} | "
                  f"{_fmt(ops['ratio_to_cp'].get(op, 1.0))} |" for op in ("cp", "merge", "subset")]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--segments", type=int, default=10_000, help="segments of the new code's "
                   "long dump, over all parts (the goal: at least 10,000 over 2 parts)")
    p.add_argument("--parts", type=int, default=2, help="writers (ranks) in mode 'ranks'")
    p.add_argument("--old-segments", type=int, default=600,
                   help="segments of the like-for-like runs of the old and the new code")
    p.add_argument("--backends", default="local,s3", help="comma list of local, s3")
    p.add_argument("--modes", default="ranks,single", help="comma list of ranks, single")
    p.add_argument("--old-code", type=Path, default=Path("/tmp/scale_old"))
    p.add_argument("--old-commit", default=OLD_COMMIT)
    p.add_argument("--skip-old", action="store_true", help="no baseline runs")
    p.add_argument("--skip-input", action="store_true", help="no bench/scale_input.py half")
    p.add_argument("--skip-ops", action="store_true", help="no bench/scale_ops.py half")
    p.add_argument("--input-small", type=int, default=10_000)
    p.add_argument("--input-large", type=int, default=1_000_000)
    p.add_argument("--input-stop-after", type=int, default=2_000)
    p.add_argument("--ops-tokens", type=int, default=300_000)
    p.add_argument("--workdir", type=Path, default=ROOT / "bench/out/scale_bench_work")
    p.add_argument("--json", type=Path, default=ROOT / "bench/out/scale_bench.json")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    args = p.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = set(args.backends) - {"local", "s3"} | set(args.modes) - {"ranks", "single"}
    if unknown or args.parts < 1 or min(args.segments, args.old_segments) < 2 * args.parts:
        p.error(f"--backends takes local,s3 and --modes ranks,single (found {sorted(unknown)}); "
                "--parts must be at least 1 and --segments and --old-segments at least twice "
                "--parts (a first and a last commit of every part)")
    args.workdir, args.json = args.workdir.resolve(), args.json.resolve()
    return args


def run_halves(args, s3: S3Server | None, figures: dict) -> None:
    """bench/scale_ops.py (locally, and to S3 when it is a backend) and bench/scale_input.py."""
    if not args.skip_ops:
        from scale_ops import measure_ops

        figures["ops"] = {}
        for backend in args.backends:
            work = args.workdir / f"ops-{backend}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            dst = (f"{s3.bucket('scale-ops')}/out", s3.options) if backend == "s3" else (None, None)
            figures["ops"][backend] = measure_ops(str(work), tokens=args.ops_tokens,
                                                  dst_root=dst[0], dst_options=dst[1])
            _save(args, figures)
    if not args.skip_input:
        from scale_input import scale_input

        figures["input"] = scale_input(args.workdir / "input", small=args.input_small,
                                       large=args.input_large, stop_after=args.input_stop_after)
        _save(args, figures)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.skip_old:
        args.old_code = old_checkout(args.old_code, args.old_commit)
    figures = {"benchmark": "scale_bench", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "platform": platform.platform()},
               "settings": {k: str(v) if isinstance(v, Path) else v
                            for k, v in vars(args).items()},
               "goals": {"commit_time_ratio": GOAL, "bytes_ratio": GOAL},
               "runs": [], "series": {}}
    with S3Server() if "s3" in args.backends else contextlib.nullcontext() as s3:
        for backend in args.backends:
            run_dumps(args, backend, s3 if backend == "s3" else None, figures)
        run_halves(args, s3, figures)
    figures["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _save(args, figures)
    table = markdown(figures)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
