"""The demo's summary: artifacts, timings, sizes and the report's comparison
(OUT/summary.json), and the text printed at the end (OUT/SUMMARY.txt)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from demo_context import Context, heldout_kd, rel_path

def _params(model_dir: Path) -> int | None:
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(weights), "np") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def build_summary(ctx: Context, timings: dict, total: float) -> dict[str, Any]:
    p, out = ctx.paths, ctx.out
    artifacts = {
        "corpus": p["corpus"], "tokenizer": p["tokenizer"], "teacher": p["teacher"],
        "store": p["store"], "store info": p["info"], "store verify": p["verify"],
        "student": p["student"], "student run": p["student_run"],
        "baseline": p["baseline"], "baseline run": p["baseline_run"],
        "report.md": p["report"] / "report.md", "report.json": p["report"] / "report.json",
        "report.png": p["report"] / "report.png", "export": p["export"] / "export.json",
        "served answer": p["serve"] / "answer.json", "logs": out / "logs",
        "commands": out / "commands.sh"}
    summary: dict[str, Any] = {
        "scale": ctx.settings["scale"], "out": str(out),
        "artifacts": {k: {"path": str(v), "exists": v.exists()} for k, v in artifacts.items()},
        "timings": timings, "total_seconds": total,
        "parameters": {r: _params(p[r]) for r in ("teacher", "student", "baseline")},
        "heldout_kd": heldout_kd(p["student_run"]),
        "data": _data_sizes(p),
    }
    report_file = p["report"] / "report.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text(encoding="utf-8"))
        summary["comparison"] = [r for r in report["comparison"] if r["task"] != "efficiency"]
        summary["findings"] = report.get("findings", [])
        summary["ratios"] = report["ratios"]
        summary["skipped"] = report.get("skipped", [])
    served = p["serve"] / "answer.json"
    if served.is_file():
        record = json.loads(served.read_text(encoding="utf-8"))
        export = json.loads((p["export"] / "export.json").read_text(encoding="utf-8"))
        summary["served"] = {"prompt": record["request"]["prompt"],
                             "answer": record["response"]["text"],
                             "tokens": record["response"]["completion_tokens"],
                             "total_ms": record["response"]["timings"]["total_ms"],
                             "perplexity_ratio": export["quality"]["perplexity_ratio"]}
    verify = p["verify"]
    summary["verify"] = verify.read_text(encoding="utf-8").strip().splitlines()[-1] \
        if verify.is_file() else None
    return summary


def _data_sizes(p: dict[str, Path]) -> dict[str, Any] | None:
    """Teacher's text vs the transfer set (tokens), and the tokens the teacher trained on."""
    if not p["split_sizes"].is_file():
        return None
    sizes = json.loads(p["split_sizes"].read_text(encoding="utf-8"))
    metrics = p["teacher_run"] / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()
                if line.strip()]
        seen = [r["train/tokens_seen"] for r in rows if "train/tokens_seen" in r]
        sizes["teacher_tokens_seen"] = int(seen[-1]) if seen else None
    return sizes


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def render_summary(s: dict[str, Any]) -> str:
    out = Path(s["out"])
    lines = ["", "=" * 78, f"logitstore demo ({s['scale']}) finished in {s['total_seconds']:.1f}s",
             "", "stage timings (wall, CPU):"]
    for name, t in s["timings"].items():
        cpu = f"{t['cpu_seconds']:7.1f}s" if t.get("cpu_seconds") is not None else "      -"
        lines.append(f"  {name:10s} {t['seconds']:7.1f}s {cpu}"
                     + ("  (reused: time of the run that made it)" if t["reused"] else ""))
    lines += ["", "artifacts:"]
    for name, a in s["artifacts"].items():
        lines.append(f"  {name:13s} {rel_path(a['path'], out)}"
                     + ("" if a["exists"] else "  (missing)"))
    params = s["parameters"]
    if params.get("teacher"):
        lines += ["", f"parameters: teacher {params['teacher'] / 1e6:.2f}M, student "
                      f"{(params.get('student') or 0) / 1e6:.2f}M"]
    if s.get("verify"):
        lines.append(f"verify: {s['verify']}")
    if s["heldout_kd"]:
        (s0, k0), (s1, k1) = s["heldout_kd"][0], s["heldout_kd"][-1]
        lines.append(f"student held-out KD (teacher || student): {k0:.4f} at step {s0} -> "
                     f"{k1:.4f} at step {s1}")
    data = s.get("data")
    if data:
        seen = data.get("teacher_tokens_seen")
        lines.append(f"teacher's text {data['teacher_tokens']:,} tokens"
                     + (f" ({seen:,} seen in training)" if seen else "")
                     + f"; transfer set {data['transfer_tokens']:,} tokens "
                       f"({data['teacher_to_transfer']:.1f}x less)")
    if s.get("comparison"):
        lines += ["", "value ± standard error; * = student - baseline resolved (> 2 SE, paired)",
                  f"  {'task':16s} {'metric':14s} {'teacher':>15s} {'student':>15s} "
                  f"{'baseline':>15s} {'gap closed':>10s}"]
        for r in s["comparison"]:
            errors = r.get("stderr") or {}
            cells = [_fmt(r[role]) + (f" ±{errors[role]:.2g}" if errors.get(role) else "")
                     for role in ("teacher", "student", "baseline")]
            mark = "*" if (r.get("student_vs_baseline") or {}).get("resolved") else " "
            lines.append(f"  {r['task'][:16]:16s} {r['metric'][:14]:14s} {cells[0]:>15s} "
                         f"{cells[1]:>15s} {cells[2]:>15s} {_fmt(r['gap_closed']):>10s} {mark}")
    if s.get("findings"):
        lines += ["", "student vs baseline:"] + [f"  {f}" for f in s["findings"]]
    if s.get("ratios"):
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in s["ratios"].items() if v is not None)
        lines += ["", f"teacher/student ratios: {shown}"]
    for skip in s.get("skipped") or []:
        lines.append(f"skipped {skip['task']}: {skip['reason'][:100]}")
    if s.get("served"):
        served = s["served"]
        lines += ["", f"served by distill-serve (INT8 ONNX, perplexity ratio "
                      f"{served['perplexity_ratio']:.4f} vs the student):",
                  f"  {served['prompt']!r}", f"  -> {served['answer'].strip()!r} "
                  f"({served['tokens']} tokens, {served['total_ms']:.0f} ms)"]
    lines.append("=" * 78)
    return "\n".join(lines)


