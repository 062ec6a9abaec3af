"""Serving benchmark (issue 16): the student as PyTorch fp32, ONNX fp32 and ONNX INT8 on this
CPU, in process at batch 1 and through the real `distill-serve` HTTP server.

    nice -n 5 python bench/serve_bench.py                  # the full run (< 20 min, 2 cores)
    python bench/serve_bench.py --quick --cache /tmp/c --out /tmp/serve.json   # smoke (< 1 min)

models      demo-student and llama-100m (bench/serve_models.py says what each is); --quick: a
            tiny Llama only
variants    torch-fp32 (the model directory, TorchLM), onnx-fp32 and onnx-int8 (exported by
            `student-export` as a subprocess, quality gate included); --quick: torch-fp32 and
            onnx-int8, the server for onnx-int8 only
batch 1     in this process, every variant loaded through logitstore.toolkit.inference (the
            loader distill-serve uses) with --threads threads, measured in rounds, the
            variants' order rotating per round: prefill tokens/s (one forward over a
            --prompt-tokens prompt) and generation tokens/s (--new-tokens greedy tokens after
            a 16-token prompt, EOS off, the short prefill included)
server      per variant, `python -m distill_serve EXPORT --port FREE --max-batch 16` on
            127.0.0.1; after a warm-up, --server-rounds rounds of one load phase per number of
            clients (1, 4, 16): each client sends --requests-per-client POST /invocations
            (demo corpus held-out prompts, --served-tokens new tokens, greedy) one after the
            other (bench/serve_load.py); throughput = generated tokens / phase wall time;
            p50/p95 latency; peak RSS of the server process (VmHWM); SIGTERM, exit 0 checked
size, ppl    weight files on disk; the perplexity ratio export / source from the export's
            quality gate (export.json "quality")
goals       int8 >= 2x fp32 PyTorch generation tokens/s at batch 1 with perplexity ratio <=
            1.02; at 16 clients, throughput >= 4x one client (bench/serve_report.py)

Outputs: --out JSON (default bench/results/serve.json), the markdown and PNG beside it;
statistics (medians, bootstrap intervals: bench/serve_report.py) from the raw per-round
figures it keeps, so `--from-json` re-renders a finished run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]

from machine_facts import cpu_facts  # noqa: E402
from serve_load import measure_server  # noqa: E402
from serve_models import build_models, demo_corpus, export, read_jsonl_texts, weight_bytes  # noqa: E402,E501
from serve_report import (goals, interval, render_markdown, summarize_server,  # noqa: E402
                          write_chart)

SHORT_PROMPT_TOKENS = 16


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, few requests (smoke)")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / "out" / "serve_cache")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=None, help="batch-1 rounds (default 6; 2)")
    ap.add_argument("--server-rounds", type=int, default=None, help="default 3; quick 2")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default 128; quick 32")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 64; quick 8")
    ap.add_argument("--served-tokens", type=int, default=None, help="default 32; quick 8")
    ap.add_argument("--requests-per-client", type=int, default=None, help="default 2; quick 2")
    ap.add_argument("--check-limit", type=int, default=32,
                    help="held-out sequences in each export's quality gate")
    ap.add_argument("--from-json", type=Path,
                    help="recompute the statistics, goals, markdown and PNG of a finished run "
                         "from its raw per-round figures (writes --out), measuring nothing")
    args = ap.parse_args(argv)
    defaults = dict(rounds=(2, 6), server_rounds=(2, 3), prompt_tokens=(32, 128),
                    new_tokens=(8, 64), served_tokens=(8, 32), requests_per_client=(2, 2))
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.concurrencies = [1, 4] if args.quick else [1, 4, 16]
    return args


def prompts(cache: Path) -> tuple[list[str], str]:
    """(server prompts: held-out records cut to 300 characters, one long text for the
    in-process prompts)."""
    texts = read_jsonl_texts(demo_corpus(cache) / "heldout.jsonl")
    return [t[:300] for t in texts[:64]], " ".join(texts[:40])


def direct_rounds(variants: dict[str, str], long_text: str, args) -> dict:
    """variant -> {"prefill_tokens_per_s", "generation_tokens_per_s"}: {"values": per round}."""
    import numpy as np

    from logitstore.toolkit.inference import GenerationSettings, load_inference_model

    models = {name: load_inference_model(path, threads=args.threads)
              for name, path in variants.items()}
    ids = models["torch-fp32"].tokenizer(long_text)["input_ids"][:args.prompt_tokens]
    short = ids[:SHORT_PROMPT_TOKENS]
    settings = GenerationSettings(max_new_tokens=args.new_tokens)
    values = {name: {"prefill": [], "generation": []} for name in models}
    for model in models.values():  # warm-up, and no early stop: every run makes N tokens
        model.eos_token_ids = ()
        model.generate([short], GenerationSettings(max_new_tokens=4))
        model.logits(np.asarray([ids]), np.ones((1, len(ids)), dtype=np.int64))
    names = list(models)
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            model = models[name]
            start = time.perf_counter()
            model.logits(np.asarray([ids]), np.ones((1, len(ids)), dtype=np.int64))
            values[name]["prefill"].append(len(ids) / (time.perf_counter() - start))
            start = time.perf_counter()
            made = model.generate([short], settings)[0].token_ids
            values[name]["generation"].append(len(made) / (time.perf_counter() - start))
    for model in models.values():
        model.close()
    return {name: {"prefill_tokens_per_s": {"values": v["prefill"]},
                   "generation_tokens_per_s": {"values": v["generation"]}}
            for name, v in values.items()}


def bench_model(model: dict, args, server_prompts, long_text) -> dict:
    """Exports, batch-1 rounds and server phases of one model."""
    quantizes = ["int8"] if args.quick else ["none", "int8"]
    variants = {"torch-fp32": {"path": model["path"],
                               "file_bytes": weight_bytes(Path(model["path"]))}}
    for quantize in quantizes:
        name = f"onnx-{'fp32' if quantize == 'none' else 'int8'}"
        print(f"[{model['name']}] student-export --quantize {quantize}", flush=True)
        done = export(model, quantize, args.cache, check_limit=args.check_limit)
        variants[name] = {"path": done["path"], "file_bytes": weight_bytes(Path(done["path"])),
                          "ppl_ratio": done["quality"].get("perplexity_ratio"),
                          "quality": done["quality"], "export_seconds": done["seconds"],
                          "export_reused": done["reused"], "command": done.get("command")}
    print(f"[{model['name']}] batch 1: {args.rounds} rounds", flush=True)
    direct = direct_rounds({k: v["path"] for k, v in variants.items()}, long_text, args)
    served = ["onnx-int8"] if args.quick else list(variants)
    server = {}
    for name in served:
        print(f"[{model['name']}] distill-serve {name}: clients {args.concurrencies}",
              flush=True)
        measured = measure_server(variants[name]["path"], server_prompts,
                                  concurrencies=args.concurrencies, repeats=args.server_rounds,
                                  requests_per_client=args.requests_per_client,
                                  max_new_tokens=args.served_tokens, max_batch=16,
                                  threads=args.threads)
        server[name] = {"ready_s": measured["ready_s"],
                        "peak_rss_bytes": measured["peak_rss_bytes"],
                        "exit_code": measured["exit_code"], "rounds": measured["rounds"]}
    return {"model": {**model, "variants": variants}, "direct": direct, "server": server}


def machine() -> dict:
    import onnxruntime
    import torch

    facts = cpu_facts()
    cpu, simd = facts["model"], "+".join(facts["vector_extensions"]) or "no AVX2"
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu": cpu,
            "vector_extensions": facts["vector_extensions"], "load_average_at_start": load,
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "summary": f"{os.cpu_count()} CPU cores ({cpu}, {simd}), torch {torch.__version__}, "
                       f"onnxruntime {onnxruntime.__version__}, load average at start "
                       f"{load[0]:.1f}"}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return finish(summarize(json.loads(args.from_json.read_text())), args.out)
    started = time.perf_counter()
    env = machine()
    models = build_models(args.cache, args.quick)
    server_prompts, long_text = prompts(args.cache)
    results = [bench_model(m, args, server_prompts, long_text) for m in models]
    result = {
        "command": "python bench/serve_bench.py " + " ".join(shlex.quote(a) for a in
                                                              (argv or sys.argv[1:])),
        "machine": env, "seconds": time.perf_counter() - started,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {"short_prompt_tokens": SHORT_PROMPT_TOKENS, "max_batch": 16,
           "new_tokens_served": args.served_tokens},
        "models": [r["model"] for r in results],
        "direct": {r["model"]["name"]: r["direct"] for r in results},
        "server": {r["model"]["name"]: r["server"] for r in results},
    }
    return finish(summarize(result), args.out)


def summarize(result: dict) -> dict:
    """The result with every interval and goal computed from its raw per-round figures."""
    for variants in result["direct"].values():
        for figures in variants.values():
            for name, iv in figures.items():
                figures[name] = interval(iv["values"])
    concurrencies = result["settings"]["concurrencies"]
    for variants in result["server"].values():
        for served in variants.values():
            served.update(summarize_server(served["rounds"], concurrencies))
    quality = {m["name"]: {k: v.get("quality", {}) for k, v in m["variants"].items()}
               for m in result["models"]}
    result["goals"] = goals(result["direct"], result["server"], quality)
    return result


def finish(result: dict, out: Path) -> int:
    """JSON, markdown and PNG of a summarized result; the goals printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    markdown = out.with_suffix(".md")
    markdown.write_text(render_markdown(result), encoding="utf-8")
    write_chart(result, out.with_suffix(".png"))
    for g in result["goals"]:
        print(f"goal [{g['model']} {g['variant']}] {g['goal']}: {g['ratio']['value']:.3g}x -> "
              f"{g['verdict']}", flush=True)
    print(f"wrote {out}, {markdown} ({result['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
