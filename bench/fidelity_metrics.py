"""Held-out metrics and the paired summary of bench/fidelity.py (its docstring has the setup).

heldout_metrics   every model on the held-out documents: mean next-token NLL (nats),
                  perplexity, accuracy, expected calibration error, mean KL(teacher || model)
summarise         per method: each metric's mean and 95 % interval over seeds; the paired
                  gap of held-out NLL to online KD and to CE only (bench/fidelity_stats.py),
                  what it resolves, the Pareto front and the goal's verdict (computed from
                  the figures, never written in)
"""

from __future__ import annotations

import math

from fidelity_stats import WITHIN_LIMIT, interval, kept_share, paired_gap, pareto_front, verdict

ECE_BINS = 15
METRICS = ("nll", "ppl", "accuracy", "ece", "kl_from_teacher")
GOAL_BYTES_PER_TOKEN = 24.0  # issue 12: a configuration at <= 24 B/token within 0.5 %


# ----------------------------------------------------------------------------- held-out metrics

def expected_calibration_error(confidence, correct, bins: int = ECE_BINS) -> float:
    """Expected calibration error, the standard definition (Naeini et al. 2015; Guo et al.
    2017): the top-1 probabilities are put in `bins` equal-width bins over [0, 1] (bin b holds
    (b/bins, (b+1)/bins], bin 0 also 0), and ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)|,
    acc = fraction of correct top-1 predictions, conf = mean top-1 probability in the bin.

    confidence: [n] float in [0, 1]; correct: [n] bool  ->  a float in [0, 1]
    """
    import torch

    index = (torch.ceil(confidence.double() * bins).long() - 1).clamp(0, bins - 1)  # [n]
    count = torch.bincount(index, minlength=bins).double()
    conf = torch.zeros(bins, dtype=torch.double).index_add(0, index, confidence.double())
    acc = torch.zeros(bins, dtype=torch.double).index_add(0, index, correct.double())
    return float((conf - acc).abs().sum() / max(1, len(confidence)))


def heldout_metrics(models: dict, teacher, tokenizer_dir, heldout, max_length: int,
                    limit: int | None):
    """Per model: mean NLL, perplexity, accuracy, ECE and KL(teacher || model) on heldout."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from student_train.objective import IGNORE, shifted, target_positions
    from student_train.text_data import TextBatches, load_text_samples

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    samples = load_text_samples([str(heldout)], tokenizer, max_length=max_length)
    samples = samples[:limit] if limit else samples
    batches = TextBatches(samples, batch_tokens=8192, seed=0, shuffle=False, drop_uneven=False,
                          pad_id=tokenizer.pad_token_id or 0)
    everyone = {"teacher": teacher, **models}
    acc = {k: {"nll": [], "conf": [], "correct": [], "kl": []} for k in everyone}
    with torch.no_grad():
        for batch in batches:
            mask = target_positions(batch)  # [B, S]
            labels = shifted(batch["labels"], IGNORE)[mask]  # [n]
            inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=batch["position_ids"], use_cache=False)
            t_logp = None
            for name, model in everyone.items():
                logp = F.log_softmax(model(**inputs).logits.float()[mask], -1)  # [n, V]
                t_logp = logp if name == "teacher" else t_logp
                top = logp.max(-1)
                a = acc[name]
                a["nll"].append(-logp.gather(1, labels[:, None])[:, 0])
                a["conf"].append(top.values.exp())
                a["correct"].append(top.indices == labels)
                a["kl"].append((t_logp.exp() * (t_logp - logp)).sum(-1))  # KL(teacher || model)
    out = {}
    for name, a in acc.items():
        nll, conf, correct = (torch.cat(a[k]) for k in ("nll", "conf", "correct"))
        mean_nll = float(nll.double().mean())
        out[name] = {"nll": mean_nll, "ppl": math.exp(mean_nll),
                     "accuracy": float(correct.double().mean()),
                     "ece": expected_calibration_error(conf, correct),
                     "kl_from_teacher": float(torch.cat(a["kl"]).double().mean()),
                     "tokens": int(len(nll))}
    return out, {"records": len(samples), "tokens": out["teacher"]["tokens"]}


# ----------------------------------------------------------------------------- summary

def _per_seed(runs: list[dict], name: str, key: str) -> list[float]:
    return [r["heldout"][name][key] for r in runs]


def method_row(runs: list[dict], name: str, bytes_per_token: float | None) -> dict:
    """One method: each metric's interval over seeds, its paired NLL gaps and verdicts."""
    row = {k: interval(_per_seed(runs, name, k)) for k in METRICS}
    row["step_s"] = interval([r["step_s"][name] for r in runs])
    row["bytes_per_token"] = bytes_per_token
    if name in runs[0]["load_s_per_batch"]:
        row["load_s_per_batch"] = interval([r["load_s_per_batch"][name] for r in runs])
    nll = _per_seed(runs, name, "nll")
    row["gap_to_online"] = paired_gap(nll, _per_seed(runs, "online", "nll"))
    row["gap_to_ce"] = paired_gap(nll, _per_seed(runs, "ce", "nll"))
    row["verdict"] = verdict(row["gap_to_online"])
    return row


def summarise(runs: list[dict], bytes_per_token: dict[str, float]) -> dict:
    """Per method (ce, every config, online) and the teacher: see the module docstring.

    runs: one per seed, run["heldout"][method][metric], run["step_s"][method],
    run["load_s_per_batch"][config]; bytes_per_token: config -> bytes of its signals."""
    configs = list(bytes_per_token)
    methods = {name: method_row(runs, name, bytes_per_token.get(name))
               for name in ["ce", *configs, "online"]}
    online_vs_ce = methods["online"]["gap_to_ce"]
    for name in configs:
        share, reason = kept_share(methods[name]["gap_to_ce"], online_vs_ce)
        methods[name]["kept_share"], methods[name]["kept_share_reason"] = share, reason
    teacher = {k: interval(_per_seed(runs, "teacher", k)) for k in METRICS}
    front = pareto_front({n: (bytes_per_token[n], methods[n]["gap_to_online"]["mean"])
                          for n in configs})
    meeting = [n for n in configs if bytes_per_token[n] <= GOAL_BYTES_PER_TOKEN
               and methods[n]["verdict"]["within"] == "resolved"]
    goal = {"goal": f"a configuration at <= {GOAL_BYTES_PER_TOKEN:g} B/token whose student is "
                    f"within {WITHIN_LIMIT * 100:g} % of online KD on held-out NLL, resolved "
                    f"(upper end of the 95 % interval < +{WITHIN_LIMIT * 100:g} %)",
            "configs": meeting, "met": bool(meeting)}
    # KD pulls a student towards the teacher: it pays on held-out text only while the teacher
    # predicts that text better than the CE-only student learns to
    teacher_vs_ce = paired_gap(_per_seed(runs, "teacher", "nll"), _per_seed(runs, "ce", "nll"))
    regime = {"teacher_vs_ce": teacher_vs_ce, "online_vs_ce": online_vs_ce,
              "teacher_better_than_ce": teacher_vs_ce["mean"] < 0,
              "online_gain_resolved": online_vs_ce["high"] is not None
              and online_vs_ce["high"] < 0}
    return {"methods": methods, "teacher": teacher, "pareto_front": front, "goal": goal,
            "regime": regime, "seeds": len(runs)}
