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
