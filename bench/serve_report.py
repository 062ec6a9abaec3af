"""Statistics, goals, markdown and chart of bench/serve_bench.py (no models here).

Intervals: this 2-core machine is shared, and another process waking up slows a single round
several-fold (seen in the runs: one round at 6 tokens/s among five at 46). A mean and its
t-interval follow such a round; so every timing here is summarized by its MEDIAN over rounds
with a 95 % bootstrap interval (2,000 resamples of the rounds). A ratio of two timings
measured in the same round (int8 vs fp32 at batch 1, 16 clients vs 1 on one server) is
paired: the median of the per-round ratios, and its bootstrap interval. Latency percentiles
(p50, p95 over every request of every round) get a bootstrap interval over the requests. A
ratio is shown as "–" with the reason when it has one round only or when its interval's
half-width exceeds NOISY_SHARE of its value.
Goals: "met" when the whole interval is on the goal's side, "not met" when the whole interval
is on the other side (or the perplexity bound fails), "unresolved" when it holds the bound.
"""

from __future__ import annotations

import math

import numpy as np

NOISY_SHARE = 0.5
SPEEDUP_GOAL = 2.0  # int8 ONNX vs fp32 PyTorch generation tokens/s, batch 1
PPL_GOAL = 1.02
SCALING_GOAL = 4.0  # server throughput, 16 clients vs 1
BOOTSTRAP = 2000


def interval(values: list[float], seed: int = 0) -> dict:
    """{"value": median, "low", "high" (95 % bootstrap interval, None with one value),
    "half_width", "n", "values"} of per-round values."""
    data = np.asarray(values, dtype=float)
    out = {"value": float(np.median(data)), "low": None, "high": None, "half_width": None,
           "n": len(data), "values": [float(v) for v in data]}
    if len(data) >= 2:
        rng = np.random.default_rng(seed)
        boot = np.median(rng.choice(data, size=(BOOTSTRAP, len(data)), replace=True), axis=1)
        out["low"], out["high"] = float(np.percentile(boot, 2.5)), \
            float(np.percentile(boot, 97.5))
        out["half_width"] = (out["high"] - out["low"]) / 2
    return out


def ratio_interval(numerators: list[float], denominators: list[float]) -> dict:
    return interval([a / b for a, b in zip(numerators, denominators)])


def shown_ratio(iv: dict) -> tuple[float | None, str | None]:
    """(value, None), or (None, why it is "–")."""
    if iv["half_width"] is None:
        return None, "one round: no interval, so noise cannot be ruled out"
    if iv["half_width"] > NOISY_SHARE * abs(iv["value"]):
        return None, (f"noise: the 95 % interval ({iv['low']:.3g} .. {iv['high']:.3g}) is wider "
                      f"than ±{NOISY_SHARE:.0%} of the ratio {iv['value']:.3g}")
    return iv["value"], None


def percentile_interval(values: list[float], q: float, seed: int = 0) -> dict:
    """The q-th percentile of `values` and its 95 % bootstrap interval."""
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    samples = rng.choice(data, size=(BOOTSTRAP, len(data)), replace=True)
    boot = np.percentile(samples, q, axis=1)
    return {"value": float(np.percentile(data, q)), "low": float(np.percentile(boot, 2.5)),
            "high": float(np.percentile(boot, 97.5)), "n": len(data)}


def verdict(iv: dict, bound: float) -> str:
    if iv["half_width"] is None:
        return "met" if iv["value"] >= bound else "not met"
    if iv["low"] >= bound:
        return "met"
    if iv["high"] < bound:
        return "not met"
    return "unresolved"


def goals(direct: dict, server: dict, quality: dict) -> list[dict]:
    """The issue's two goals per model (and per served variant for the second)."""
    out = []
    for model, variants in direct.items():
        if "onnx-int8" not in variants or "torch-fp32" not in variants:
            continue
        iv = ratio_interval(variants["onnx-int8"]["generation_tokens_per_s"]["values"],
                            variants["torch-fp32"]["generation_tokens_per_s"]["values"])
        ppl = quality.get(model, {}).get("onnx-int8", {}).get("perplexity_ratio")
        speed = verdict(iv, SPEEDUP_GOAL)
        met = "not met" if ppl is None or ppl > PPL_GOAL else speed
        out.append({"goal": f"int8 ONNX >= {SPEEDUP_GOAL:g}x fp32 PyTorch generation tokens/s "
                            f"at batch 1, perplexity ratio <= {PPL_GOAL}",
                    "model": model, "variant": "onnx-int8", "ratio": iv,
                    "perplexity_ratio": ppl, "verdict": met})
    for model, variants in server.items():
        for variant, result in variants.items():
            scaling = result.get("scaling", {}).get("16")
            if scaling is None:
                continue
            out.append({"goal": f"server throughput at 16 clients >= {SCALING_GOAL:g}x "
                                "1 client", "model": model, "variant": variant,
                        "ratio": scaling, "verdict": verdict(scaling, SCALING_GOAL)})
    return out


def summarize_server(rounds: list[dict], concurrencies: list[int]) -> dict:
    """Per concurrency: throughput interval, latency percentiles, mean batch; and the paired
    scaling (throughput at c / at the lowest c) per round."""
    by_c = {}
    for c in map(str, concurrencies):
        phases = [r[c] for r in rounds]
        latencies = [x for p in phases for x in p["latencies_s"]]
        by_c[c] = {"throughput_tokens_per_s": interval([p["throughput_tokens_per_s"]
                                                         for p in phases]),
                   "latency_p50_s": percentile_interval(latencies, 50),
                   "latency_p95_s": percentile_interval(latencies, 95),
                   "mean_batch_size": float(np.mean([p["mean_batch_size"] for p in phases])),
                   "requests": sum(p["requests"] for p in phases)}
    base = str(min(concurrencies))
    scaling = {c: ratio_interval([r[c]["throughput_tokens_per_s"] for r in rounds],
                                 [r[base]["throughput_tokens_per_s"] for r in rounds])
               for c in map(str, concurrencies) if c != base}
    return {"by_concurrency": by_c, "scaling": scaling}


# ----------------------------------------------------------------------------- markdown


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _iv(iv: dict) -> str:
    if iv["half_width"] is None:
        return _num(iv["value"])
    return f"{_num(iv['value'])} [{_num(iv['low'])}, {_num(iv['high'])}]"


def _ratio_cell(iv: dict, reasons: list[str], label: str) -> str:
    value, why = shown_ratio(iv)
    if value is None:
        reasons.append(f"{label}: {why}")
        return "–"
    return f"{_iv(iv)}×"


def render_markdown(result: dict) -> str:
    s = result["settings"]
    lines = ["# Serving benchmark (bench/serve_bench.py)", "",
             f"`{result['command']}`  ", f"{result['machine']['summary']}; "
             f"{result['seconds']:.0f} s in all.", "",
             "Median [95 % bootstrap interval] over rounds (a shared machine: see "
             "bench/serve_report.py), latency percentiles with bootstrap intervals over "
             "requests; ratios paired per round. – = not shown, reason below.", "",
             "## Models", "", "| model | params | variant | weights on disk | ppl ratio "
             "(export gate) | export s |", "|---|---|---|---|---|---|"]
    for model in result["models"]:
        for name, v in model["variants"].items():
            lines.append(f"| {model['name']} | {model['parameters'] / 1e6:.1f}M | {name} | "
                         f"{v['file_bytes'] / 1e6:.1f} MB | {_num(v.get('ppl_ratio'), 5)} | "
                         f"{_num(v.get('export_seconds'))} |")
    lines += ["", "Models: " + "; ".join(f"**{m['name']}**: {m['description']}"
                                         for m in result["models"]), ""]
    reasons: list[str] = []
    lines += [f"## Batch 1, in process ({s['rounds']} rounds; prompt {s['prompt_tokens']} "
              f"tokens for prefill; {s['new_tokens']} new tokens after a "
              f"{s['short_prompt_tokens']}-token prompt for generation, EOS off)", "",
              "| model | variant | prefill tokens/s | generation tokens/s | generation vs "
              "torch-fp32 |", "|---|---|---|---|---|"]
    for model, variants in result["direct"].items():
        base = variants.get("torch-fp32")
        for name, v in variants.items():
            cell = "1" if name == "torch-fp32" or base is None else _ratio_cell(
                ratio_interval(v["generation_tokens_per_s"]["values"],
                               base["generation_tokens_per_s"]["values"]), reasons,
                f"{model} {name} generation vs torch-fp32")
            lines.append(f"| {model} | {name} | {_iv(v['prefill_tokens_per_s'])} | "
                         f"{_iv(v['generation_tokens_per_s'])} | {cell} |")
    lines += ["", f"## Through distill-serve (max batch {s['max_batch']}, {s['new_tokens_served']}"
              f" new tokens per request, {s['requests_per_client']} requests per client per "
              f"round, {s['server_rounds']} rounds)", "",
              "| model | variant | clients | throughput tokens/s | vs 1 client | p50 latency s "
              "| p95 latency s | mean batch | peak RSS |", "|---|---|---|---|---|---|---|---|---|"]
    for model, variants in result["server"].items():
        for name, v in variants.items():
            for c, row in v["by_concurrency"].items():
                scaling = v["scaling"].get(c)
                cell = "1" if scaling is None else _ratio_cell(
                    scaling, reasons, f"{model} {name} {c} clients vs 1")
                p50, p95 = row["latency_p50_s"], row["latency_p95_s"]
                lines.append(
                    f"| {model} | {name} | {c} | {_iv(row['throughput_tokens_per_s'])} | "
                    f"{cell} | {_num(p50['value'])} [{_num(p50['low'])}, {_num(p50['high'])}] "
                    f"| {_num(p95['value'])} [{_num(p95['low'])}, {_num(p95['high'])}] | "
                    f"{row['mean_batch_size']:.1f} | {v['peak_rss_bytes'] / 1e6:.0f} MB |")
    lines += ["", "## Goals", "", "| goal | model | variant | ratio | verdict |",
              "|---|---|---|---|---|"]
    for g in result["goals"]:
        extra = f", ppl ratio {_num(g['perplexity_ratio'], 5)}" if "perplexity_ratio" in g \
            else ""
        lines.append(f"| {g['goal']} | {g['model']} | {g['variant']} | {_iv(g['ratio'])}×"
                     f"{extra} | **{g['verdict']}** |")
    if reasons:
        lines += ["", "## Why a ratio is –", ""] + [f"- {r}" for r in reasons]
    lines += ["", "![serving](serve.png)", ""]
    return "\n".join(lines)


def write_chart(result: dict, path) -> None:
    """Left: batch-1 generation tokens/s per model and variant; right: server throughput by
    number of clients; 95 % intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels, ivs = [], []
    for model, variants in result["direct"].items():
        for name, v in variants.items():
            labels.append(f"{model}\n{name}")
            ivs.append(v["generation_tokens_per_s"])
    left.bar(range(len(labels)), [iv["value"] for iv in ivs], yerr=_error_bars(ivs), capsize=3)
    left.set_yscale("log")
    left.set_xticks(range(len(labels)))
    left.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
    left.set_title("Batch 1 generation tokens/s, median (in process)")
    for model, variants in result["server"].items():
        for name, v in variants.items():
            cs = [int(c) for c in v["by_concurrency"]]
            ivs = [v["by_concurrency"][str(c)]["throughput_tokens_per_s"] for c in cs]
            right.errorbar(cs, [iv["value"] for iv in ivs], yerr=_error_bars(ivs), marker="o",
                           capsize=3, label=f"{model} {name}")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("concurrent clients")
    right.set_title("distill-serve throughput (generated tokens/s)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _error_bars(ivs: list[dict]) -> list[list[float]]:
    """matplotlib's asymmetric error bars ([below], [above]) of bootstrap intervals."""
    return [[iv["value"] - iv["low"] if iv["low"] is not None else 0.0 for iv in ivs],
            [iv["high"] - iv["value"] if iv["high"] is not None else 0.0 for iv in ivs]]
