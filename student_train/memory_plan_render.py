"""The memory plan as a table (`MemoryPlan.render`), as `student-train --plan` prints it."""

from __future__ import annotations

import os

GiB = 1 << 30


def _size(n: int | float) -> str:
    return f"{n / GiB:8.2f} GiB"


def _setting_line(f: dict) -> str:
    mode = (f"QLoRA r={f['lora_r']}" if f["qlora"] else f"LoRA r={f['lora_r']}" if f["lora_r"]
            else "full fine-tune")
    spread = f"{f['processes']} process(es)" + (", FSDP" if f["fsdp"] else "")
    return (f"{mode}, optimizer {f['optimizer']}, {spread}, batch_tokens {f['batch_tokens']}, "
            f"gradient checkpointing {'on' if f['gradient_checkpointing'] else 'off'}, "
            f"student_dtype {f['student_dtype']}, "
            f"{'autocast' if f['device'] == 'cuda' and f['mixed_precision'] != 'no' else 'no autocast'}"
            f" ({f['device']})")


def render_plan(plan) -> str:
    """A readable table of the plan's rows per device, the total, and what fits."""
    f = plan.facts
    ckpt = f["gradient_checkpointing"]
    lines = [
        f"memory plan for {f['student']} (per device)",
        f"  {f['parameters']:,} parameters ({f['trainable_parameters']:,} trainable"
        + (", tied embeddings" if f["tied_embeddings"] else "") + f"), {f['layers']} layers, "
        f"hidden {f['hidden']}, vocab {f['vocab']}, attention {f['attention']}"
        + (f", KD target widths {f['kd_target_widths']}" if f["kd_target_widths"] else "")
        + (f", trained across tokenizers ({f['cross_length_ratio']:.2f} student tokens per "
           f"stored token)" if f.get("cross_length_ratio") else ""),
        f"  {_setting_line(f)}",
        "",
        f"  weights                         {_size(plan.weights)}",
        f"  gradients                       {_size(plan.gradients)}",
        f"  optimizer state                 {_size(plan.optimizer)}",
        f"  activations{' (checkpointed)   ' if ckpt else '                 '}   "
        f"{_size(plan.activations_checkpointed if ckpt else plan.activations)}"
        f"   ({'without' if ckpt else 'with'} checkpointing: "
        f"{(plan.activations if ckpt else plan.activations_checkpointed) / GiB:.2f} GiB)",
        f"  KD-loss buffers (lm_head chunk) {_size(plan.kd_buffers)}",
    ]
    for name, value in plan.other_rows.items():
        lines.append(f"  {name:<32}{_size(value)}")
    # the rows peak at different moments: the total is the largest phase, not their sum
    phases = ", ".join(f"{name} {value / GiB:.2f}" + (" (peak)" if name == plan.peak_phase
                                                      else "")
                       for name, value in plan.phases.items())
    lines += [f"  phases (GiB): {phases}",
              f"  {'total (peak phase' + (' + CUDA rows)' if f['device'] == 'cuda' else ')'):<32}"
              f"{_size(plan.total)}"]
    if plan.gpu_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines += ["", f"  {verdict} in {plan.gpu_memory / GiB:.2f} GiB per device; largest "
                      f"batch_tokens that fits: {plan.max_batch_tokens or 'none'}"]
        if plan.suggestion:
            lines.append(f"  smallest change that fits: {plan.suggestion}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- training

# torch.OutOfMemoryError (torch >= 2.5) is what torch.cuda.OutOfMemoryError names now.
def _out_of_memory_type() -> type[BaseException]:
    import torch

    return getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


OUT_OF_MEMORY = _out_of_memory_type()
RESUME_HINT = "rerun with --resume to continue from the last checkpoint"


def planned_processes(cfg) -> int:
    """cfg.num_processes, else the world size accelerate launch set (1 without it)."""
    return cfg.num_processes or int(os.environ.get("WORLD_SIZE", "1"))


def _breakdown(plan) -> str:
    rows = [("weights", plan.weights), ("gradients", plan.gradients),
            ("optimizer", plan.optimizer),
            ("activations", plan.activations_checkpointed
             if plan.facts["gradient_checkpointing"] else plan.activations),
            ("KD buffers", plan.kd_buffers), ("other", plan.other)]
    return ", ".join(f"{name} {value / GiB:.2f}" for name, value in rows)


def refusal_message(plan) -> str:
    """One paragraph: the plan does not fit gpu_memory, and the change that would."""
    return (f"memory plan: this config needs {plan.total / GiB:.2f} GiB per device at its "
            f"{plan.peak_phase} peak ({_breakdown(plan)} GiB) over "
            f"{plan.facts['processes']} process(es), more than "
            f"gpu_memory {plan.gpu_memory / GiB:.2f} GiB; the smallest change that fits: "
            f"{plan.suggestion}. `student-train --plan` with the same flags prints the table")


def check_memory_plan(cfg, inputs=None) -> None:
    """Refuse (ConfigError) a config whose plan does not fit the device: cfg.gpu_memory, else
    (training on CUDA) the GPU's own memory. On the CPU without gpu_memory nothing is checked.
    inputs: sources.Inputs of check_inputs (its opened store and tokenizer read are reused).
    A plan that cannot be made (an architecture the meta-device count does not know) stops
    the run only when gpu_memory asked for the check; else it is logged and training goes on."""
    import logging

    from logitstore.errors import ConfigError, LogitStoreError
    from student_train.memory_plan import estimate

    budget = _device_memory(cfg)
    if budget is None:
        return
    try:
        plan = estimate(cfg, planned_processes(cfg), budget, inputs=inputs)
    except LogitStoreError as exc:
        if cfg.gpu_memory:
            raise
        logging.getLogger(__name__).warning("no memory plan before training: %s", exc)
        return
    if not plan.fits:
        raise ConfigError([refusal_message(plan)])


def _device_memory(cfg) -> int | None:
    from student_train.memory_plan import parse_memory_size

    if cfg.gpu_memory:
        return parse_memory_size(cfg.gpu_memory)
    import os

    import torch

    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if torch.cuda.is_available() and not on_cpu:
        # the Accelerator has not picked this process's GPU yet: it will be LOCAL_RANK's
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        return torch.cuda.get_device_properties(index).total_memory
    return None


def out_of_memory_message(cfg, exc: BaseException, inputs=None) -> str:
    """One paragraph for an out-of-memory error in training: the plan's figure and the
    change it finds for a budget below what ran out (the device's memory, or 85 % of the
    plan's total when the plan said it fits: its accuracy goal is 15 %). inputs: as for
    check_memory_plan."""
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    advice = ""
    try:
        from student_train.memory_plan import estimate

        processes = planned_processes(cfg)
        plan = estimate(cfg, processes, inputs=inputs)
        device = _device_memory(cfg)
        budget = device if device is not None and device < plan.total else int(0.85 * plan.total)
        suggestion = estimate(cfg, processes, budget, inputs=inputs).suggestion
        advice = (f"; the memory plan puts this config at {plan.total / GiB:.2f} GiB per device"
                  + (f" and suggests {suggestion}" if suggestion else ""))
    except Exception as plan_exc:  # the plan must never hide the out-of-memory error itself
        advice = f"; no memory plan ({type(plan_exc).__name__}: {plan_exc})"
    return (f"out of memory during training ({type(exc).__name__}: {first_line}){advice}. "
            f"{RESUME_HINT} (a resume keeps the run's settings but may turn on "
            f"--gradient-checkpointing or lower --lm-head-chunk; free the device's memory "
            f"first if other processes hold it), or apply the change in a new run (--out); "
            f"`student-train --plan --gpu-memory SIZE` shows what fits")
