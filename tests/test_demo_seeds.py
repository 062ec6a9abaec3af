"""bench/demo_seeds.py: the summary over seeds and its refusals (no training here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from demo_seeds import main, markdown, summarise  # noqa: E402


def row(student, baseline, stderr, resolved):
    return {"student": student, "baseline": baseline, "difference": student - baseline,
            "stderr": stderr, "resolved": resolved}


def seeds():
    return {
        0: {"ppl/heldout/perplexity": row(2.45, 2.89, 0.03, True),
            "medmcq_kb/acc": row(0.35, 0.36, 0.03, False),
            "medmcq_kb/acc_norm": row(0.36, 0.37, 0.03, False)},
        1: {"ppl/heldout/perplexity": row(2.47, 2.76, 0.02, True),
            "medmcq_kb/acc": row(0.46, 0.37, 0.03, True),
            "medmcq_kb/acc_norm": row(0.30, 0.40, 0.03, True)},
    }


def test_wins_follow_each_metrics_direction():
    summary = summarise(seeds())
    ppl, acc, norm = (summary[k] for k in ("ppl/heldout/perplexity", "medmcq_kb/acc",
                                           "medmcq_kb/acc_norm"))
    assert (ppl["resolved_wins"], ppl["resolved_losses"]) == (2, 0)  # lower is better
    assert (acc["resolved_wins"], acc["resolved_losses"]) == (1, 0)
    assert (norm["resolved_wins"], norm["resolved_losses"]) == (0, 1)  # resolved, baseline ahead
    assert ppl["difference"]["mean"] == pytest.approx((-0.44 - 0.29) / 2)
    assert ppl["difference"]["low"] < ppl["difference"]["mean"] < ppl["difference"]["high"]


def test_one_seed_has_no_interval_and_the_table_says_so():
    one = {0: seeds()[0]}
    table = markdown(one, summarise(one))
    assert "| ppl/heldout/perplexity | 2.450 / 2.890 (-0.440 ± 0.030, resolved) | –;" in table


def test_a_missing_demo_run_is_refused_before_any_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--demo-out", str(tmp_path / "nothing"), "--work", str(tmp_path / "w")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "expected a finished demo run" in err and "make demo" in err
    assert not (tmp_path / "w").exists()


def test_a_seed_reuses_finished_runs_and_refuses_another_demo_runs(tmp_path, monkeypatch):
    import json

    import demo_seeds

    calls = []

    def fake_run(cmd, log):  # what the tools leave behind, without training anything
        calls.append(Path(cmd[cmd.index("--out") + 1]).name)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        if cmd[0] == "student-train":
            (out / "training_metadata.json").write_text("{}")
            return
        rows = [{"task": t, "metric": m, "student": 1.0, "baseline": 2.0,
                 "student_vs_baseline": {"difference": -1.0, "stderr": 0.1, "resolved": True}}
                for t, m in demo_seeds.METRICS]
        (out / "report.json").write_text(json.dumps({"comparison": rows}))

    monkeypatch.setattr(demo_seeds, "_run", fake_run)
    tools = {"student-train": "student-train", "distill-eval": "distill-eval"}
    demo, config, work = tmp_path / "demo", tmp_path / "c.yaml", tmp_path / "work"
    first = demo_seeds._pair(demo, config, 0, work, tools)
    assert calls == ["student", "baseline", "report"]
    assert first["ppl/heldout/perplexity"]["difference"] == -1.0
    assert demo_seeds._pair(demo, config, 0, work, tools) == first and len(calls) == 3
    (work / "seed0" / "baseline" / "training_metadata.json").unlink()  # killed before its end
    demo_seeds._pair(demo, config, 0, work, tools)
    assert calls[3:] == ["baseline", "report"]  # retrained, and its report rebuilt
    with pytest.raises(SystemExit, match="give another --work"):
        demo_seeds._pair(tmp_path / "other-demo", config, 0, work, tools)
