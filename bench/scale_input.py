"""teacher-dump on a large input vs a small one: peak RSS and time to the first committed
segment must not grow with the size of the input (issue 13 section 4; goals <= 1.2x).

    python bench/scale_input.py [--small 10000 --large 1000000 --stop-after 2000
                                 --workdir bench/out/scale_input_work --json out.json]
    from bench.scale_input import scale_input; figures = scale_input(workdir, ...)

What it does:

* writes two JSONL files of short synthetic text records (`--small` and `--large` lines,
  the same generator: sentences of the tests' tiny clinical corpus with a record number);
* builds the tests' tiny local model once (`tests/tiny_hf.py`: a 400-token byte-level BPE
  and a 2-layer Llama, hidden 64), cached under the work directory;
* runs `python -m teacher_dump` on each (a subprocess: its own peak RSS) with a tiny
  signal (top-k 2, no draws, eager capture kernel) and tiny segments
  (`--segment-tokens`, default 2,000), every other setting at its default (so the read
  window is `read_window_tokens`' default). The small run goes to its end; the large one is
  stopped (SIGINT, as Ctrl-C) once `--stop-after` records are committed. The store is
  polled through `logitstore.reader.StoreReader` every `--poll` seconds.

Reported per run (JSON): records in the input, samples committed when it ended, seconds to
the first committed segment (from the start of the process), wall seconds, and the peak
RSS of the teacher-dump process: `ru_maxrss` from `os.wait4` (exact) and the highest RSS
sampled with psutil (or /proc) while it ran. Then the ratios large / small of the peak RSS
(ru_maxrss) and of the time to the first committed segment, with the goals.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_RATIO = 1.2


def write_records(path: Path, n: int) -> Path:
    """`n` JSONL text records of 8-40 tokens; deterministic, rewritten only when missing."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_hf import corpus

    if path.exists() and path.stat().st_size and _lines(path) == n:
        return path
    sentences = corpus()
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for i in range(n):
            first = sentences[i % len(sentences)]
            text = f"Record {i}. {first}" + (f" {sentences[(i * 7) % len(sentences)]}"
                                             if i % 3 == 0 else "")
            handle.write(json.dumps({"text": text}) + "\n")
    tmp.replace(path)
    return path


def _lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


def tiny_model(workdir: Path) -> Path:
    """The tests' tiny Llama with its tokenizer, built once under `workdir`."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_hf import make_tiny_llama, make_tokenizer

    model = workdir / "llama"
    if not (model / "config.json").exists():
        make_tiny_llama(model, make_tokenizer(workdir / "tok"))
    return model


def _committed(out: Path) -> int:
    """Samples committed in the store at `out` (0 while there is none)."""
    from logitstore.reader import StoreReader

    try:
        return len(StoreReader(str(out)))
    except Exception:  # nothing committed yet, or a commit in progress: ask again later
        return 0


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _rss(pid: int) -> int:
    """Resident bytes of process `pid` now (psutil, else /proc), 0 once it is gone."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        try:
            pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0
    except Exception:  # psutil.NoSuchProcess: it has just ended
        return 0


def run_dump(model: Path, data: Path, out: Path, *, stop_after: int | None,
             segment_tokens: int, poll: float, timeout: float, code: Path = REPO) -> dict:
    """One teacher-dump subprocess on `data`; stopped with SIGINT once `stop_after` samples
    are committed (None: runs to its end). Figures of module docstring. `code`: the
    checkout whose teacher_dump runs (another one gives a baseline)."""
    command = [sys.executable, "-m", "teacher_dump", "--model", str(model), "--data", str(data),
               "--out", str(out), "--top-k", "2", "--samples", "0", "--device", "cpu",
               "--capture-kernel", "eager", "--segment-tokens", str(segment_tokens),
               "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(code),
           "TOKENIZERS_PARALLELISM": "false"}
    shutil.rmtree(out, ignore_errors=True)  # a store left by an earlier run would be resumed
    log = out.with_name(out.name + ".stderr.txt")
    started = time.monotonic()
    with log.open("wb") as stderr:  # a file, not a pipe: a full pipe would block the child
        # SIGINT back to its default in the child: a bench started in the background of a
        # non-interactive shell inherits SIGINT ignored, and the stop below would do nothing.
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                cwd=code, preexec_fn=_default_sigint)
    first_segment_s, peak_sampled, committed, stopped, ended = None, 0, 0, False, None
    while ended is None and time.monotonic() - started < timeout:
        peak_sampled = max(peak_sampled, _rss(proc.pid))
        committed = _committed(out)
        if committed and first_segment_s is None:
            first_segment_s = time.monotonic() - started
        if stop_after is not None and committed >= stop_after and not stopped:
            proc.send_signal(signal.SIGINT)
            stopped = True
        time.sleep(poll)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaped here: usage is its own
        ended = (status, usage) if pid else None
    if ended is None:  # past the timeout
        proc.send_signal(signal.SIGKILL)
        _, status, usage = os.wait4(proc.pid, 0)
        ended = (status, usage)
    status, usage = ended
    code = proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    if code not in (0, 130) or (code == 130 and not stopped):
        raise RuntimeError(f"teacher-dump on {data} exited {code}: "
                           f"{log.read_text(errors='replace')[-2000:]}")
    committed = _committed(out)
    if first_segment_s is None and committed:
        first_segment_s = wall  # committed between the last poll and the end
    return {"records": _lines(data), "samples_committed": committed,
            "stopped_early": stopped, "first_segment_s": first_segment_s, "wall_s": wall,
            "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux: kilobytes
            "peak_rss_sampled_mb": peak_sampled / 2**20}


def scale_input(workdir: Path, *, small: int = 10_000, large: int = 1_000_000,
                stop_after: int = 2_000, segment_tokens: int = 2_000, poll: float = 0.25,
                timeout: float = 3600.0, code: Path = REPO) -> dict:
    """Both runs (module docstring) and their ratios, as a JSON-ready dict."""
    workdir.mkdir(parents=True, exist_ok=True)
    model = tiny_model(workdir)
    runs = {}
    for name, n, stop in (("small", small, None), ("large", large, stop_after)):
        data = write_records(workdir / f"records_{n}.jsonl", n)
        runs[name] = run_dump(model, data, workdir / f"store_{name}", stop_after=stop,
                              segment_tokens=segment_tokens, poll=poll, timeout=timeout,
                              code=code)
    s, big = runs["small"], runs["large"]
    ratios = {"peak_rss": big["peak_rss_mb"] / s["peak_rss_mb"],
              "first_segment": (big["first_segment_s"] / s["first_segment_s"]
                                if big["first_segment_s"] and s["first_segment_s"] else None)}
    from teacher_dump.config import FIELDS

    return {"small": s, "large": big, "ratios": ratios,
            "goals": {k: GOAL_RATIO for k in ratios},
            "met": {k: v is not None and v <= GOAL_RATIO for k, v in ratios.items()},
            "settings": {"top_k": 2, "samples": 0, "segment_tokens": segment_tokens,
                         "stop_after": stop_after,
                         "read_window_tokens": (FIELDS["read_window_tokens"].default
                                                if code == REPO else None),
                         "code": str(code),
                         "batch_tokens": FIELDS["batch_tokens"].default,
                         "cpus": os.cpu_count()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--stop-after", type=int, default=2_000)
    parser.add_argument("--segment-tokens", type=int, default=2_000)
    parser.add_argument("--poll", type=float, default=0.25)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench/out/scale_input_work")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--code", type=Path, default=REPO,
                        help="checkout whose teacher_dump runs (e.g. an export of an older "
                             "commit, for a baseline)")
    args = parser.parse_args(argv)
    figures = scale_input(args.workdir, small=args.small, large=args.large,
                          stop_after=args.stop_after, segment_tokens=args.segment_tokens,
                          poll=args.poll, code=args.code.resolve())
    text = json.dumps(figures, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
