"""One exit status convention for the four commands (logitstore/exit_codes.py):
0 success, 1 user/config/data error, 2 usage error, 130 interrupted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from logitstore import exit_codes
from logitstore.cli import main as logitstore_cli

REPO = Path(__file__).resolve().parents[1]


def _invoke(command, args, *, code: int, prog: str, words: str = ""):
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit) or result.exception is None, result.exc_info
    if code == exit_codes.USER_ERROR:
        assert result.output.startswith(f"{prog}: error: "), result.output
        assert "Traceback" not in result.output
    if code == exit_codes.INTERRUPTED:
        assert f"{prog}: interrupted" in result.output
    assert words in result.output
    return result


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_the_convention():
    assert (exit_codes.OK, exit_codes.USER_ERROR, exit_codes.USAGE,
            exit_codes.INTERRUPTED) == (0, 1, 2, 130)


# ----------------------------------------------------------------------------- logitstore


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import numpy as np

    from logitstore.writer import StoreWriter
    from test_store_roundtrip import make, settings_for

    root = tmp_path_factory.mktemp("exit") / "store"
    settings = settings_for()
    with StoreWriter(str(root), settings) as writer:
        writer.add_many(make(np.random.default_rng(1), 3, settings))
    return root


def test_logitstore(store, tmp_path, monkeypatch):
    _invoke(logitstore_cli, ["verify", store], code=0, prog="logitstore", words="ok")
    _invoke(logitstore_cli, ["info", store, "--no-such-flag"], code=2, prog="logitstore")
    _invoke(logitstore_cli, ["show", store, "x", "--index", "1"], code=2, prog="logitstore",
            words="not both")
    _invoke(logitstore_cli, ["info", tmp_path / "nowhere"], code=1, prog="logitstore",
            words="no store at")
    _invoke(logitstore_cli, ["show", store, "no-such-id"], code=1, prog="logitstore")
    import logitstore.verify

    monkeypatch.setattr(logitstore.verify, "verify_store", _interrupt)
    _invoke(logitstore_cli, ["verify", store], code=130, prog="logitstore")


def test_logitstore_process_exit_status(tmp_path):
    # The real process, not CliRunner: what a shell script or a launcher sees.
    done = subprocess.run([sys.executable, "-m", "logitstore.cli", "info",
                           str(tmp_path / "nowhere")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("logitstore: error: ")


# ----------------------------------------------------------------------------- the tools


def test_teacher_dump(tmp_path, monkeypatch):
    import teacher_dump.dump
    from teacher_dump.cli import teacher_dump as cli

    args = ["--model", "m", "--data", "d.jsonl", "--out", tmp_path / "s", "--no-progress"]
    _invoke(cli, [*args, "--no-such-flag"], code=2, prog="teacher-dump")
    _invoke(cli, ["--data", "d.jsonl"], code=1, prog="teacher-dump", words="model is required")
    _invoke(cli, ["--config", "no-such-preset", *args], code=1, prog="teacher-dump",
            words="no bundled preset")

    class Report:
        is_main = True

        def __str__(self):
            return "dumped"

    monkeypatch.setattr(teacher_dump.dump, "run_dump", lambda cfg, **_: Report())
    _invoke(cli, args, code=0, prog="teacher-dump", words="dumped")
    monkeypatch.setattr(teacher_dump.dump, "run_dump", _interrupt)
    _invoke(cli, args, code=130, prog="teacher-dump", words="rerun the same command")


def test_student_train(tmp_path, monkeypatch):
    import student_train.train
    from student_train.cli import main as cli

    args = ["--store", tmp_path / "store", "--student", "s", "--out", tmp_path / "run"]
    _invoke(cli, [*args, "--no-such-flag"], code=2, prog="student-train")
    _invoke(cli, ["--student", "s"], code=1, prog="student-train",
            words="give exactly one of store")
    monkeypatch.setattr(student_train.train, "train", lambda cfg: {"eval/kd": 0.5})
    _invoke(cli, args, code=0, prog="student-train", words="eval/kd 0.5")
    monkeypatch.setattr(student_train.train, "train", _interrupt)
    _invoke(cli, args, code=130, prog="student-train", words="--resume")


def test_distill_eval(tmp_path, monkeypatch):
    import eval.runner
    from eval.cli import distill_eval as cli

    args = ["--model", "m", "--out", tmp_path / "report"]
    _invoke(cli, [*args, "--no-such-flag"], code=2, prog="distill-eval")
    _invoke(cli, [*args, "--batch-size", "0"], code=1, prog="distill-eval",
            words="batch_size (command line): must be >= 1")
    report = {"tasks": {}, "skipped": [], "ratios": {}}
    monkeypatch.setattr(eval.runner, "run", lambda cfg: (report, {"report.md": "r.md"}))
    _invoke(cli, args, code=0, prog="distill-eval", words="report: r.md")
    monkeypatch.setattr(eval.runner, "run", _interrupt)
    _invoke(cli, args, code=130, prog="distill-eval")
