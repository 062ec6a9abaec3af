"""Tables, summary and figure of bench/memory_plan_bench.py's results (no torch needed)."""

from __future__ import annotations

from pathlib import Path

MiB = 1 << 20
ROW_NAMES = {"weights": "weights", "gradients": "grads", "optimizer": "optim",
             "dynamic": "activations+KD+other"}
SPLIT_NAMES = {"forward_kept": "activations", "head_and_backward": "KD+other"}


def _mib(n) -> str:
    return "-" if n is None else f"{n / MiB:,.0f}"


def _ratio(r) -> str:
    return "-" if r is None else f"{r:.2f}"


def summary(results: list[dict], goal: float) -> dict:
    """Counts within the goal and the worst misses, over the configurations with a plan."""
    planned = [r for r in results if r.get("ratios")]
    worst = sorted(planned, key=lambda r: -abs(r["ratios"]["total_tensor"] - 1))
    return {
        "configurations": len(results), "with_plan": len(planned), "goal": goal,
        "within_goal_tensor": sum(r["within_goal"] for r in planned),
        "within_goal_rss": sum(r["within_goal_rss"] for r in planned),
        "max_abs_error_tensor": max((abs(r["ratios"]["total_tensor"] - 1) for r in planned),
                                    default=None),
        "max_abs_error_rss": max((abs(r["ratios"]["total_rss"] - 1) for r in planned),
                                 default=None),
        "worst": [{"config": f"{r['size']} {r['mode']} {r['optimizer']}",
                   "plan_over_tensor_peak": r["ratios"]["total_tensor"],
                   "rows_off": {k: r["ratios"][k] for k in r["rows_off"]}} for r in worst[:5]],
        "rss_minus_tensor_peak_mib": [
            round((r["measured"]["total_rss"] - r["measured"]["total_tensor"]) / MiB, 1)
            for r in results],
    }


def markdown(report: dict) -> str:
    results, s = report["results"], report["summary"]
    lines = [
        "| student | mode | optimizer | batch tokens | plan MiB | tensor peak MiB | plan / tensor "
        "| RSS peak MiB | plan / RSS | rows off > 15 % (plan / measured) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        m, ratios = r["measured"], r.get("ratios") or {}
        off = ", ".join(f"{ROW_NAMES[k]} {ratios[k]:.2f}" for k in r.get("rows_off", [])) or (
            "-" if ratios else "(no plan)")
        lines.append(
            f"| {r['size']} ({r['measurement']['params'] / 1e6:.0f}M) | {r['mode']} | "
            f"{r['optimizer']} | {r['settings']['batch_tokens']} | "
            f"{_mib((r.get('planned') or {}).get('total_tensor'))} | {_mib(m['total_tensor'])} | "
            f"{_ratio(ratios.get('total_tensor'))} | {_mib(m['total_rss'])} | "
            f"{_ratio(ratios.get('total_rss'))} | {off} |")
    lines += ["", "Rows, plan / measured MiB (measured: weights, gradients and optimizer state "
                  "counted from the tensors; activations+KD+other = the tensor peak less the "
                  "weights and optimizer state, and in the backward and step all the gradients; "
                  "the last column: "
                  "where the peak is (forward, backward, optimizer step) and the parameter "
                  "gradients live then; the split of the dynamic part: the plan's "
                  "activations against what the forward keeps at the decoder's output, the "
                  "plan's KD buffers + other against the rest of a forward peak):", "",
              "| student | mode | optimizer | weights | grads | optim | activations+KD+other "
              "| peak in | grads at peak | activations | KD+other |",
              "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in results:
        planned, m = r.get("planned") or {}, r["measured"]
        cells = " | ".join(f"{_mib(planned.get(k))} / {_mib(m[k])}" for k in ROW_NAMES)
        cells += f" | {m['peak_phase']} | {_mib(m['gradients_at_peak'])} | " + " | ".join(
            f"{_mib(planned.get(k))} / {_mib(m[k])}" for k in SPLIT_NAMES)
        lines.append(f"| {r['size']} | {r['mode']} | {r['optimizer']} | {cells} |")
    if s["with_plan"]:
        lines += ["", f"Within {s['goal']:.0%} of the tensor peak: {s['within_goal_tensor']} of "
                      f"{s['with_plan']} (largest error {s['max_abs_error_tensor']:.1%}); of the "
                      f"RSS peak: {s['within_goal_rss']} of {s['with_plan']} (largest error "
                      f"{s['max_abs_error_rss']:.1%})."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    """Plan vs measured peak (tensor: filled, RSS: hollow), log-log, with the +-goal band."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results = [r for r in report["results"] if r.get("planned")]
    if not results:
        return False
    goal = report["summary"]["goal"]
    colors = {"full": "tab:blue", "lora": "tab:orange", "ckpt": "tab:green"}
    markers = {"adamw": "o", "adamw-8bit": "s"}
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    values = []
    for r in results:
        plan = r["planned"]["total_tensor"] / MiB
        tensor, rss = r["measured"]["total_tensor"] / MiB, r["measured"]["total_rss"] / MiB
        values += [plan, tensor, rss]
        style = dict(color=colors.get(r["mode"], "gray"), marker=markers.get(r["optimizer"], "^"))
        ax.plot(tensor, plan, linestyle="none", **style)
        ax.plot(rss, plan, linestyle="none", markerfacecolor="none", **style)
    low, high = min(values) / 1.3, max(values) * 1.3
    line = [low, high]
    ax.plot(line, line, color="black", linewidth=0.8)
    ax.fill_between(line, [v * (1 - goal) for v in line], [v * (1 + goal) for v in line],
                    color="gray", alpha=0.15, label=f"within {goal:.0%}")
    for mode, color in colors.items():
        ax.plot([], [], color=color, marker="o", linestyle="none", label=mode)
    for name, marker in markers.items():
        ax.plot([], [], color="gray", marker=marker, linestyle="none", label=name)
    ax.plot([], [], color="gray", marker="o", markerfacecolor="none", linestyle="none",
            label="vs RSS peak (hollow)")
    from matplotlib.ticker import FixedLocator, NullFormatter

    ticks = [t for t in (250, 500, 1000, 2000, 4000, 8000, 16000) if low <= t <= high]
    ax.set(xscale="log", yscale="log", xlim=line, ylim=line, xlabel="measured peak (MiB)",
           ylabel="memory plan total (MiB)",
           title="student-train step memory: plan vs measured (CPU, fp32)")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(lambda value, _pos: f"{value:,.0f}")
        axis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
