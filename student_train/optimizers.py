"""student-train's optimizers (`--optimizer`): `make_optimizer(cfg, model)` and their state size.

    adamw             torch.optim.AdamW: two fp32 moments, 8 bytes per parameter (fp32 params)
    adamw-8bit        bitsandbytes AdamW8bit: both moments quantised to 8 bits in blocks of 256
                      values (one fp32 absmax per block): ~2 bytes per parameter
    paged-adamw-8bit  bitsandbytes PagedAdamW8bit: adamw-8bit whose large states (>= 100k
                      values) live in CUDA unified memory, paged out to the host when the GPU
                      runs short; on the CPU it is adamw-8bit (nothing to page)
    adafactor         transformers' Adafactor without momentum: a matrix keeps one fp32 value
                      per row and per column, (rows + cols) * 4 bytes; 1-D tensors a full one

All take the same two parameter groups: weight decay on matrices, none on biases and norm
scales (1-D), and the run's learning-rate schedule sets their `lr`. Adafactor therefore runs
with a fixed lr (relative_step, scale_parameter and warmup_init off) and ignores adam_beta1,
adam_beta2 and adam_epsilon (it has its own decay and epsilons). bitsandbytes keeps tensors
under 4096 values (norms, small LoRA matrices) in 32-bit state; `state_bytes` counts that.

bitsandbytes is imported only for the 8-bit optimizers. Their state (uint8 moments, absmax,
quantisation maps) is saved and restored whole by accelerate's save_state / load_state, so a
resume continues bit for bit; bitsandbytes' load_state_dict puts paged states back in ordinary
device memory, so `make_optimizer`'s paged optimizer pages them again after a load.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Sequence

import torch

from logitstore.errors import ConfigError
from student_train.config import FIELDS, OPTIMIZERS

log = logging.getLogger(__name__)

EIGHT_BIT = ("adamw-8bit", "paged-adamw-8bit")
ADAM_ONLY = ("adam_beta1", "adam_beta2", "adam_epsilon")  # settings adafactor has no use for
# bitsandbytes' defaults (0.45-0.50): smaller tensors keep 32-bit state; one absmax per block.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK_SIZE = 256
BNB_MIN_PAGED_SIZE = 100_000  # bitsandbytes pages only states this large
_CPU_PAGED_WARNING = "Paged optimizers are not supported on CPU"

BITSANDBYTES_MISSING = (
    "optimizer {name} needs bitsandbytes, which cannot be imported here ({error}): install it "
    "with `pip install 'bitsandbytes>=0.45'` (CUDA, or its CPU backend), or choose --optimizer "
    "adamw or adafactor")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in two groups: decayed matrices, undecayed 1-D tensors (biases
    and norm scales, as usual for transformers); an empty group is left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names over `model`'s trainable parameters, at `cfg.lr`."""
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.adam_epsilon)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        ignored = [k for k in ADAM_ONLY if getattr(cfg, k) != FIELDS[k].default]
        if ignored:
            log.warning("optimizer adafactor ignores %s: it has its own decay rate and "
                        "epsilons", ", ".join(ignored))
        return Adafactor(groups, lr=cfg.lr, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    if cfg.optimizer in EIGHT_BIT:
        return _eight_bit(cfg, groups)
    raise ConfigError([f"optimizer: {cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}"])


def bitsandbytes_optim(name: str):
    """`bitsandbytes.optim`, or a ConfigError saying how to install it."""
    try:
        import bitsandbytes.optim as bnb_optim
    except Exception as exc:  # ImportError, or a broken install failing while it loads
        raise ConfigError([BITSANDBYTES_MISSING.format(name=name, error=f"{type(exc).__name__}: "
                                                                      f"{exc}")]) from None
    return bnb_optim


def _eight_bit(cfg, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    bnb_optim = bitsandbytes_optim(cfg.optimizer)
    params = [p for g in groups for p in g["params"]]
    quantised = sum(1 for p in params if p.numel() >= BNB_MIN_8BIT_SIZE)
    log.info("optimizer %s: %d of %d trainable tensors keep 8-bit state (bitsandbytes keeps "
             "those under %d values in 32-bit)", cfg.optimizer, quantised, len(params),
             BNB_MIN_8BIT_SIZE)
    kwargs = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    if cfg.optimizer == "adamw-8bit":
        return bnb_optim.AdamW8bit(groups, **kwargs)
    if any(p.device.type == "cpu" for p in params):
        # bitsandbytes warns at the first step and falls back to ordinary memory: say it once
        # here, in the run's log, instead of a UserWarning in the middle of the progress bar.
        warnings.filterwarnings("ignore", message=_CPU_PAGED_WARNING, category=UserWarning)
        log.info("optimizer paged-adamw-8bit: the parameters are on the CPU, where "
                 "bitsandbytes does not page; the state stays in ordinary memory (the same "
                 "numbers as adamw-8bit)")
    return _repaging_class(bnb_optim)(groups, **kwargs)


def _repaging_class(bnb_optim) -> type:
    """PagedAdamW8bit whose load_state_dict (a resume) puts the large states back in paged
    memory: bitsandbytes' own moves them to the parameter's device as ordinary tensors."""

    class RepagingPagedAdamW8bit(bnb_optim.PagedAdamW8bit):
        def load_state_dict(self, state_dict, move_to_device=True):
            super().load_state_dict(state_dict, move_to_device=move_to_device)
            repage_states(self)

    return RepagingPagedAdamW8bit


def repage_states(optimizer) -> int:
    """Copy each CUDA state tensor that bitsandbytes would page (>= 100k values, not paged)
    into a paged buffer from the optimizer's own allocator; returns how many were moved."""
    moved = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key in ("state1", "state2"):
                value = state.get(key)
                if (value is None or p.device.type != "cuda" or getattr(value, "is_paged", False)
                        or value.numel() < BNB_MIN_PAGED_SIZE):
                    continue
                paged = optimizer.get_state_buffer(p, dtype=value.dtype)
                paged.copy_(value.view(paged.shape))
                state[key] = paged
                moved += 1
    return moved


def state_bytes(optimizer: str, shape: Sequence[int], element_size: int = 4) -> int:
    """Bytes of optimizer state one parameter tensor of `shape` holds (its values taking
    `element_size` bytes); shared constants (bitsandbytes' two 256-entry maps) not counted."""
    n = math.prod(shape)
    if optimizer == "adamw":
        return 2 * n * element_size + 4  # exp_avg, exp_avg_sq in the parameter's dtype; step
    if optimizer in EIGHT_BIT:
        if n < BNB_MIN_8BIT_SIZE:
            return 2 * n * 4  # two fp32 moments
        return 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK_SIZE)  # two uint8 moments + absmax
    if optimizer == "adafactor":
        if len(shape) >= 2:  # factored: a row and a column statistic per matrix
            rows, cols = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
            return (rows + cols) * 4 + 4  # + the RMS scalar
        return n * 4 + 4
    raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
