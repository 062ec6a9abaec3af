"""The demo's context: its settings, paths and errors, and the runner that calls each tool
with the printed arguments (in this process or as a console script) and logs its output."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import shlex
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEMO_DIR = Path(__file__).resolve().parent
REPO = DEMO_DIR.parent
CONFIG_DIR = DEMO_DIR / "configs"
SCALES = ("default", "tiny")

# tool -> (module, click command attribute); the console scripts of pyproject.toml.
TOOLS = {
    "student-train": ("student_train.cli", "main"),
    "teacher-dump": ("teacher_dump.cli", "teacher_dump"),
    "logitstore": ("logitstore.cli", "main"),
    "distill-eval": ("eval.cli", "distill_eval"),
    "student-export": ("student_export.cli", "student_export"),
}
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>"}


class DemoError(Exception):
    """A stage failed; the message names its log."""


# ----------------------------------------------------------------------------- settings


def load_settings(scale: str) -> dict[str, Any]:
    import yaml

    preset = CONFIG_DIR / f"{scale}.yaml"
    teacher = CONFIG_DIR / f"{scale}-teacher.yaml"
    data = yaml.safe_load(preset.read_text(encoding="utf-8"))
    return {"scale": scale, "preset": preset, "teacher_preset": teacher, "demo": data["demo"],
            "dump": data["dump"], "train": data["train"], "eval": data["eval"]}


def settings_hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()



# ----------------------------------------------------------------------------- running tools


class CurrentStderr(io.TextIOBase):
    """Logging's stream: whatever sys.stderr is now (a stage's log while it runs)."""

    def write(self, s: str) -> int:
        return sys.stderr.write(s)

    def flush(self) -> None:
        sys.stderr.flush()


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s: str) -> int:
        for stream in self.streams:
            stream.write(s)
        return len(s)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return False


def rel_path(path: Path | str, out: Path) -> str:
    """A path as shown to the user: relative to the repo or cwd when it is inside them."""
    path = Path(path).resolve()
    for base in (Path.cwd().resolve(), REPO):
        try:
            return str(path.relative_to(base))
        except ValueError:
            continue
    return str(path)


@dataclass
class Runner:
    out: Path
    subprocess: bool = False
    verbose: bool = False
    commands: list[str] = field(default_factory=list)

    def shell(self, tool: str, argv: list[str]) -> str:
        return " ".join([tool] + [shlex.quote(a) for a in argv])

    def shown(self, tool: str, argv: list[str]) -> str:
        """The command as printed: paths under the current directory made relative."""
        here = str(Path.cwd().resolve()) + os.sep
        return self.shell(tool, [a.removeprefix(here) for a in argv])

    def run(self, stage: str, tool: str, argv: list[str], *, check: bool = True,
            log_name: str | None = None) -> int:
        """Run `tool argv` with its output in OUT/logs/; returns the exit status."""
        log = self.out / "logs" / f"{log_name or stage}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        command = self.shell(tool, argv)
        self.commands.append(command)  # absolute paths: commands.sh runs from anywhere
        print(f"    $ {self.shown(tool, argv)}", flush=True)
        with open(log, "w", encoding="utf-8") as fh:
            fh.write(f"$ {command}\n")
            fh.flush()
            code = (self._subprocess if self.subprocess else self._in_process)(tool, argv, fh)
        if check and code != 0:
            tail = "".join(log.read_text(encoding="utf-8", errors="replace")
                           .splitlines(keepends=True)[-15:])
            raise DemoError(f"stage {stage}: `{tool}` exited with {code}; log: {log}\n{tail}")
        return code

    def _in_process(self, tool: str, argv: list[str], fh) -> int:
        module, attr = TOOLS[tool]
        command = getattr(importlib.import_module(module), attr)
        stream = _Tee(fh, sys.__stdout__) if self.verbose else fh
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            try:
                command.main(args=argv, prog_name=tool, standalone_mode=True)
                return 0
            except SystemExit as exc:  # click's standalone mode always ends with one
                if exc.code is None:
                    return 0
                return exc.code if isinstance(exc.code, int) else 1
            except Exception:  # a bug in a tool: its traceback goes to the stage log
                traceback.print_exc()
                return 1

    def _subprocess(self, tool: str, argv: list[str], fh) -> int:
        script = Path(sys.executable).parent / tool
        module = TOOLS[tool][0].removesuffix(".cli") if tool != "logitstore" else TOOLS[tool][0]
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", module]
        if not self.verbose:
            return subprocess.run(cmd + argv, stdout=fh, stderr=subprocess.STDOUT,
                                  cwd=REPO).returncode
        proc = subprocess.Popen(cmd + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=REPO, text=True)
        for line in proc.stdout:
            fh.write(line)
            sys.stdout.write(line)
        return proc.wait()


@dataclass
class Context:
    out: Path
    settings: dict[str, Any]
    runner: Runner
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def demo(self) -> dict[str, Any]:
        return self.settings["demo"]


def make_paths(out: Path) -> dict[str, Path]:
    p = {"corpus": out / "corpus", "tokenizer": out / "tokenizer",
         "init": out / "init", "teacher_init": out / "init" / "teacher",
         "student_init": out / "init" / "student", "teacher_run": out / "runs" / "teacher",
         "store": out / "store", "inspect": out / "inspect",
         "student_run": out / "runs" / "student", "baseline_run": out / "runs" / "baseline",
         "report": out / "report", "export": out / "export", "serve": out / "serve"}
    p.update(documents=p["corpus"] / "documents.jsonl", distill=p["corpus"] / "distill.jsonl",
             split_sizes=p["corpus"] / "split_sizes.json",
             teacher=p["teacher_run"] / "final", student=p["student_run"] / "final",
             baseline=p["baseline_run"] / "final", info=p["inspect"] / "info.txt",
             verify=p["inspect"] / "verify.txt")
    return p


def tool_version() -> str:
    from logitstore import __version__

    return __version__


def heldout_kd(run: Path) -> list[tuple[int, float]]:
    """(step, eval/kd) of a student-train run, in order (step 0 = before training)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [(r["step"], r["eval/kd"]) for r in rows if "eval/kd" in r]


