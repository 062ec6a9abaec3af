"""The memory plan of the GPU presets for Llama-3.2-1B, computed on paper, into their headers.

    python bench/plan_presets.py            # print each preset's plan
    python bench/plan_presets.py --write    # and rewrite the plan block of each preset's header

No weights and no store are read: the student is Llama-3.2-1B's published config (written
out below, since the hub is not reachable here) and the store is described by the facts
`configs/med42-to-llama3.2-1b.yaml` gives it (vocabulary 128,256, top-k 32 as the trained
target, samples up to 2,048 tokens, the 2048 -> 4096 hidden-state projection of
layer_map "15:-1"). The plan is student_train/memory_plan.py's `estimate` for a CUDA run
(bf16 autocast over fp32 weights), the same one `student-train --plan` prints and the one
training checks before it loads weights (presets set gpu_memory). tests/test_gpu_presets.py
checks that every header still says what this script computes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30
# preset name -> processes it is planned for (its header's launch command says the same)
PRESETS = {"med42-to-llama3.2-1b-1x24gb-lora": 1, "med42-to-llama3.2-1b-2x24gb-fsdp": 2,
           "med42-to-llama3.2-1b-4x24gb-fsdp": 4, "med42-to-llama3.2-1b-1x16gb-qlora": 1}
BLOCK = re.compile(r"^# Memory plan .*?(?=^#\n|^train:)", re.S | re.M)


def llama_3_2_1b():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                       vocab_size=128256, tie_word_embeddings=True,
                       max_position_embeddings=131072)


def med42_store_facts(cfg):
    """What a med42 store dumped with the base preset adds to a student step."""
    from student_train.memory_plan_facts import StoreFacts

    aligner = {"aligner.med42.proj.weight": (4096, 2048), "aligner.med42.proj.bias": (4096,)}
    return StoreFacts(vocab=128256, target_widths=[32],
                      tempered_buffer=cfg.topk_mode == "renormalised" and cfg.temperature != 1,
                      aligner_shapes=aligner if cfg.hidden_weight else {},
                      longest_sample=2048, shortest_sample=64, signals=["med42"])


def paper_plan(name: str):
    """The plan of configs/<name>.yaml for its number of processes, on paper."""
    return plan_of_preset(ROOT / "configs" / f"{name}.yaml", PRESETS[name])


def plan_of_preset(path: Path, processes: int):
    """The plan of the student-train preset at `path` over `processes`, on paper."""
    from unittest import mock

    import student_train.memory_plan as memory_plan
    from student_train.config import resolve_config

    cfg = resolve_config(path, {"store": "store/", "out": "run/"})
    with mock.patch.object(memory_plan, "store_facts", lambda c, *_: med42_store_facts(c)):
        return memory_plan.estimate(cfg, processes,
                                    memory_plan.parse_memory_size(cfg.gpu_memory),
                                    model_config=llama_3_2_1b())


def header_block(name: str) -> str:
    """The preset header's plan lines (each starts with '# ')."""
    plan = paper_plan(name)
    gib = {k: getattr(plan, k) / GIB for k in ("weights", "gradients", "optimizer",
                                                "activations", "activations_checkpointed",
                                                "kd_buffers", "other", "total")}
    budget = plan.gpu_memory / GIB
    largest = f"{plan.max_batch_tokens:,}" if plan.max_batch_tokens else "none"
    lines = [
        f"# Memory plan per GPU over {PRESETS[name]} process(es), Llama-3.2-1B on paper "
        f"(python bench/plan_presets.py;",
        f"# on a real store: student-train --plan --config configs/{name}.yaml --store store/"
        + (f" --num-processes {PRESETS[name]}" if PRESETS[name] > 1 else "") + "):",
        f"#   weights {gib['weights']:.2f} GiB, gradients {gib['gradients']:.2f}, optimizer "
        f"{gib['optimizer']:.2f}, activations {gib['activations_checkpointed']:.2f} "
        f"checkpointed ({gib['activations']:.2f} without), KD buffers {gib['kd_buffers']:.2f}, "
        f"other {gib['other']:.2f}",
        f"#   total {gib['total']:.2f} GiB of {budget:.0f} GiB (peak in the {plan.peak_phase}); "
        f"fits: {'yes' if plan.fits else 'NO'}; largest batch_tokens that fits: {largest}",
    ]
    return "\n".join(lines) + "\n"


def preset_problems(name: str) -> list[str]:
    """Why configs/<name>.yaml's header does not say what the plan computes ([] when it does)."""
    text = (ROOT / "configs" / f"{name}.yaml").read_text(encoding="utf-8")
    found = BLOCK.search(text)
    expected = header_block(name)
    if found is None:
        return [f"configs/{name}.yaml: no '# Memory plan' block in the header"]
    if found.group(0) != expected:
        return [f"configs/{name}.yaml: the header says\n{found.group(0)}but the plan "
                f"computes\n{expected}(rewrite it: python bench/plan_presets.py --write)"]
    return []


def write_block(name: str) -> None:
    path = ROOT / "configs" / f"{name}.yaml"
    text = path.read_text(encoding="utf-8")
    block = header_block(name)
    found = BLOCK.search(text)
    text = text.replace(found.group(0), block) if found else text.replace("# PLAN\n", block)
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the presets' headers")
    args = parser.parse_args(argv)
    for name in PRESETS:
        if args.write:
            write_block(name)
        print(f"configs/{name}.yaml\n{header_block(name)}")
        print(paper_plan(name).render(), "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
