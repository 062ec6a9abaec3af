"""Sharded student training (`--fsdp`): FSDP2 (`fully_shard`) through accelerate.

What is sharded, and how:
  * each transformer block of the student (the classes its `_no_split_modules` names, e.g.
    LlamaDecoderLayer) is one FSDP unit: its weights are gathered for its own forward and
    backward only; its gradients and optimizer state stay sharded over the processes;
  * everything else (embeddings, final norm, lm_head, the alignment projections) belongs to the
    root unit, the DistillationObjective. FSDP gathers those when the objective's forward starts
    and, the root being gathered from forward to the end of backward, they stay whole while the
    objective reads the lm_head weight directly for the fused lm_head + KD loss; the gradient
    that loss builds is reduce-scattered like every other.
Gradient accumulation reduce-scatters after every micro-batch (accelerate's `sync_each_batch`),
so only sharded gradients are kept between micro-batches: one more collective per micro-batch
instead of a whole unsharded gradient held for the step.

Why FSDP2 rather than FSDP1: parameters are sharded one by one (DTensors), so frozen and
trainable parameters share a unit without FSDP1's flat-parameter constraint (LoRA: frozen base
weights next to trainable adapters; FSDP1 needs use_orig_params=True and still keeps frozen
flat-parameter shards in the optimizer's view), and torch 2.13 runs it on CPU gloo processes,
which is how the tests check it against an unsharded run.

Checkpoints are SHARDED_STATE_DICT (torch.distributed.checkpoint): every process writes its own
shards, no process ever holds the whole model or optimizer, and a resume restores them exactly
(with the same number of processes, which the stream state needs anyway). `final/` is built
from the full state dict gathered on the main process (`unsharded_student`).

QLoRA is refused: FSDP cannot shard bitsandbytes' packed 4-bit (uint8) base weights, which would
stay whole on every process (see `config_problems`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from logitstore.errors import ConfigError, LogitStoreError
from logitstore.toolkit.local_server import free_port

if TYPE_CHECKING:  # torch is imported where it is used: config.py imports this module
    import torch
    from torch import nn

STATE_DICT_TYPE = "SHARDED_STATE_DICT"


def config_problems(values: dict[str, Any]) -> list[str]:
    """Combinations with --fsdp that cannot work (config.py's cross-field checks)."""
    if values.get("fsdp") and values.get("qlora"):
        return ["fsdp with qlora: FSDP cannot shard the 4-bit base weights bitsandbytes packs "
                "as uint8 (each process would hold them all, and their quantisation state "
                "would not survive sharding). Use --fsdp with --lora-r (LoRA on a sharded "
                "full-precision base), or --qlora without --fsdp"]
    return []


def join_process_group() -> None:
    """Prepare accelerate's process state for FSDP; call before creating the Accelerator.

    Not launched by torchrun (one process): start a process group of one, so `--fsdp` runs the
    same sharded code and writes the same sharded checkpoints (sharding over one process saves
    no memory). CPU processes (gloo): accelerate 1.16 enables FSDP only for accelerator devices
    (its AcceleratorState turns MULTI_GPU/XPU/... into FSDP, never MULTI_CPU), although torch's
    FSDP2 runs on gloo; presenting the CPU group as a multi-device one lets the Accelerator take
    the same FSDP path on the CPU as on GPUs. The device stays the CPU (already set here).
    """
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, get_int_from_env, str_to_bool

    world = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"], 1)
    if "LOCAL_RANK" not in os.environ and world <= 1:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(free_port())
    on_cpu = (str_to_bool(os.environ.get("ACCELERATE_USE_CPU", "false")) == 1
              or not torch.accelerator.is_available())
    state = PartialState(cpu=on_cpu)
    if state.distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def fsdp_plugin():
    """accelerate's FSDP2 plugin: transformer blocks as units (named by `shard_blocks`, once
    the student is loaded), sharded checkpoints, no CPU-RAM-efficient loading (every process
    loads the student; the alignment projections are initialised alike from the seed)."""
    import warnings

    from accelerate import FullyShardedDataParallelPlugin

    # The objective returns views of one [groups, terms] tensor, which FSDP2 warns about in
    # case a caller changes them in place; `combine` only reads them.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        state_dict_type=STATE_DICT_TYPE, cpu_ram_efficient_loading=False,
        activation_checkpointing=False)  # --gradient-checkpointing is the student's own


def check_sharding(accelerator, fsdp: bool) -> None:
    """Refuse a run whose sharding is not the one asked for: --fsdp that accelerate did not
    enable, or FSDP enabled by an accelerate config without --fsdp (its default FSDP1 setup
    would wrap the student without the units, checkpoints and final save made for it here)."""
    from accelerate.utils import DistributedType

    sharded = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and not sharded:
        raise LogitStoreError(
            f"fsdp: accelerate runs this process as {accelerator.distributed_type}, not FSDP, so "
            f"nothing would be sharded. Launch with `accelerate launch --num_processes N -m "
            f"student_train --fsdp ...` (or plain `student-train --fsdp` for one process), "
            f"without a DeepSpeed or Megatron accelerate config")
    if sharded and not fsdp:
        raise LogitStoreError(
            "the accelerate config or launch flags turn FSDP on (use_fsdp), but student-train "
            "was not given --fsdp: pass --fsdp, which sets up FSDP for the student itself "
            "(the accelerate FSDP settings are then not needed), or launch without use_fsdp")


def block_classes(student: nn.Module) -> list[str]:
    """Class names of the student's transformer blocks: those its `_no_split_modules` names
    that the model instantiates."""
    base = student.get_base_model() if hasattr(student, "get_base_model") else student
    present = {type(m).__name__ for m in base.modules()}
    return [name for name in getattr(base, "_no_split_modules", None) or [] if name in present]


def shard_blocks(accelerator, student: nn.Module) -> list[str]:
    """Make the student's transformer blocks the FSDP units (before `accelerator.prepare`)."""
    names = block_classes(student)
    if not names:
        raise ConfigError([f"fsdp: the student ({type(student).__name__}) names no transformer "
                           f"block class in _no_split_modules, so there is nothing to shard "
                           f"block by block; train it without --fsdp"])
    accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = names
    return names


def unsharded_student(cfg, student: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """On the main process: a plain (unsharded, CPU) copy of the trained student holding
    `state_dict` (the student's full state, gathered from the shards), for `final/`.

    The copy is built from the student's config, in `student_dtype` (FSDP may have upcast the
    trained weights to fp32 master copies under mixed precision), with the same LoRA adapters
    when --lora-r is set, so `save_final` merges and saves it as it would an unsharded run's.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from student_train.student import apply_lora

    base = student.get_base_model() if hasattr(student, "get_base_model") else student
    copy = AutoModelForCausalLM.from_config(base.config, dtype=getattr(torch, cfg.student_dtype),
                                            trust_remote_code=cfg.trust_remote_code)
    if cfg.lora_r:
        copy = apply_lora(copy, cfg)
    copy.load_state_dict(state_dict, strict=True)
    copy.config.use_cache = base.config.use_cache
    return copy.eval()
