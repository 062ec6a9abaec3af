"""Contrastive representation distillation (CRD; Tian, Krishnan and Isola, ICLR 2020).

Follows the paper's reference code (RepDistiller: CRDLoss, ContrastMemory, ContrastLoss):

* embedding heads: student features [B, D_s] and teacher features [B, D_t] each go through a
  Linear to a shared `embed_dim` and are l2-normalised: v_s, v_t [B, E]. Both heads train (they
  are parameters of CRDLoss); the teacher's features themselves are constants (detached).
* two memory banks, buffers of [N, E] indexed by the sample's position in the training set
  (0..N-1): `student_bank` of student embeddings and `teacher_bank` of teacher embeddings.
  Initialised uniform in [-s, s], s = 1/sqrt(E/3) (expected norm ~1), from `generator`. The
  stored teacher features make the teacher side exact from the start: `fill_teacher_bank`
  writes embed_teacher(features) of every stored sample into it (instead of random vectors).
* after each training forward, the banks move towards this batch's embeddings:
      bank[i] <- normalise(momentum * bank[i] + (1 - momentum) * v_i)
  (no gradient; skipped in eval mode or with update_banks=False, see `update_banks` for DDP).
* negatives: for each sample, k indices drawn uniformly from the OTHER N - 1 samples (never the
  positive; with replacement, as the reference code), from `generator` when given, so a seeded
  torch.Generator makes them deterministic. `sample_contrast_indices` -> [B, k+1], column 0 the
  positive.
* scores: s_i,j = <v_s,i, teacher_bank[idx_i,j]> (student against the teacher bank) and
  <v_t,i, student_bank[idx_i,j]> (teacher against the student bank); each gives an NCE loss,
  and the CRD loss is their sum.
* NCE with a constant normaliser Z: P = exp(s / T) / Z, noise P_n = 1/N, k noise samples:
      loss = -(1/B) * sum_i [ log(P_i0 / (P_i0 + k/N)) + sum_j>0 log((k/N) / (P_ij + k/N)) ]
  Z = mean(exp(s / T)) * N over the first batch's [B, k+1] scores, then fixed (a buffer,
  `log_z`, saved like the banks; NaN until set). Computed in log space (logaddexp), which drops
  the reference code's eps = 1e-7 inside the two ratios.

Defaults follow the paper's code: embed_dim 128, temperature 0.07, momentum 0.5; k defaults to
4096 (the paper's 16384 exceeds the small sets here) and must be <= N - 1.

Interface: CRDLoss(student_dim, teacher_dim, n_samples, CRDConfig(...), generator=None);
loss = crd(student_features, teacher_features, sample_index, generator=g). Everything the loss
depends on (heads, banks, Z) is in its state_dict, so a resumed run continues exactly.
A straightforward reference (loops over samples) lives in tests/reference_classify_losses.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


@dataclass(frozen=True)
class CRDConfig:
    embed_dim: int = 128
    k_negatives: int = 4096
    temperature: float = 0.07
    momentum: float = 0.5

    def check(self, n_samples: int) -> None:
        problems = []
        if not (isinstance(self.embed_dim, int) and self.embed_dim >= 1):
            problems.append(f"embed_dim must be an integer >= 1, found {self.embed_dim!r}")
        if not (isinstance(self.k_negatives, int) and 1 <= self.k_negatives <= n_samples - 1):
            problems.append(f"k_negatives must be an integer in [1, n_samples - 1 = "
                            f"{n_samples - 1}], found {self.k_negatives!r}; lower k or train on "
                            f"more samples")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            problems.append(f"temperature must be a finite number > 0, found {self.temperature!r}")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1), found {self.momentum!r}")
        if problems:
            raise ValueError("CRD settings: " + "; ".join(problems))


def sample_contrast_indices(index: Tensor, n_samples: int, k: int,
                            generator: torch.Generator | None = None) -> Tensor:
    """[B] positives -> [B, k+1] long: column 0 the positive, then k uniform draws from the
    other n_samples - 1 indices (with replacement). Drawn on the generator's device."""
    device = generator.device if generator is not None else index.device
    draws = torch.randint(0, n_samples - 1, (index.shape[0], k), generator=generator,
                          device=device).to(index.device)                  # [B, k] in [0, N-1)
    positive = index.long()[:, None]                                       # [B, 1]
    negatives = draws + (draws >= positive).long()  # skip the positive: uniform over the rest
    return torch.cat([positive, negatives], dim=1)


def nce_loss(scores: Tensor, log_z: Tensor, temperature: float, n_samples: int) -> Tensor:
    """NCE of [B, k+1] scores (column 0 positive) with normaliser Z (log_z 0-d) -> 0-d."""
    k = scores.shape[1] - 1
    log_p = scores / temperature - log_z                                   # [B, k+1] log P
    log_noise = torch.full_like(log_p, math.log(k / n_samples))            # log(k * P_n)
    log_d_positive = log_p[:, 0] - torch.logaddexp(log_p[:, 0], log_noise[:, 0])       # [B]
    log_d_negative = log_noise[:, 1:] - torch.logaddexp(log_p[:, 1:], log_noise[:, 1:])  # [B, k]
    return -(log_d_positive.sum() + log_d_negative.sum()) / scores.shape[0]


def momentum_update(bank: Tensor, index: Tensor, embeddings: Tensor, momentum: float) -> None:
    """bank[i] <- normalise(momentum * bank[i] + (1 - momentum) * v) in place, no gradient.
    bank [N, E], index [B] (distinct), embeddings [B, E]."""
    with torch.no_grad():
        mixed = bank[index] * momentum + embeddings.detach().to(bank.dtype) * (1 - momentum)
        bank.index_copy_(0, index, F.normalize(mixed, dim=1))


class CRDLoss(nn.Module):
    """CRD: embedding heads, momentum memory banks, NCE with k negatives (module docstring)."""

    def __init__(self, student_dim: int, teacher_dim: int, n_samples: int,
                 config: CRDConfig = CRDConfig(), generator: torch.Generator | None = None):
        super().__init__()
        if not (isinstance(n_samples, int) and n_samples >= 2):
            raise ValueError(f"CRD needs n_samples >= 2 (negatives are other samples), found "
                             f"{n_samples!r}")
        config.check(n_samples)
        self.config = config
        self.n_samples = n_samples
        self.embed_student = nn.Linear(student_dim, config.embed_dim)
        self.embed_teacher = nn.Linear(teacher_dim, config.embed_dim)
        bound = 1.0 / math.sqrt(config.embed_dim / 3)
        device = generator.device if generator is not None else None
        for name in ("student_bank", "teacher_bank"):
            bank = torch.rand(n_samples, config.embed_dim, generator=generator, device=device)
            self.register_buffer(name, (bank * 2 - 1) * bound)             # [N, E]
        # [student-vs-teacher-bank, teacher-vs-student-bank]; NaN = not yet set (first batch)
        self.register_buffer("log_z", torch.full((2,), math.nan))

    def embed(self, student_features: Tensor, teacher_features: Tensor) -> tuple[Tensor, Tensor]:
        """[B, D_s], [B, D_t] -> l2-normalised v_s, v_t [B, E] (teacher features detached)."""
        dtype = self.embed_student.weight.dtype
        v_s = F.normalize(self.embed_student(student_features.to(dtype)), dim=1)
        v_t = F.normalize(self.embed_teacher(teacher_features.detach().to(dtype)), dim=1)
        return v_s, v_t

    def _check_batch(self, student_features: Tensor, teacher_features: Tensor,
                     index: Tensor) -> None:
        d_s, d_t = self.embed_student.in_features, self.embed_teacher.in_features
        batch = index.shape[0] if index.dim() == 1 else None
        if (student_features.shape != (batch, d_s) or teacher_features.shape != (batch, d_t)):
            raise ValueError(f"CRD: expected student features [B, {d_s}], teacher features "
                             f"[B, {d_t}] and sample index [B], found "
                             f"{tuple(student_features.shape)}, {tuple(teacher_features.shape)}"
                             f" and {tuple(index.shape)}")
        self._check_index(index)

    def _check_index(self, index: Tensor) -> None:
        if index.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"CRD: the sample index must be an integer tensor, found "
                             f"{index.dtype}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.n_samples):
            raise ValueError(f"CRD: sample indices must be in [0, {self.n_samples}) (positions in "
                             f"the training set), found {int(index.min())}..{int(index.max())}")
        if index.unique().numel() != index.numel():
            raise ValueError("CRD: a batch holds the same sample index twice; each sample may "
                             "appear once per batch (its bank row is updated once)")

    @torch.no_grad()
    def fill_teacher_bank(self, index: Tensor, teacher_features: Tensor) -> None:
        """teacher_bank[index] <- embed_teacher(teacher_features), normalised (no momentum).
        Call with every stored sample (in chunks) before training: the bank is then exact."""
        if teacher_features.dim() != 2 or teacher_features.shape[0] != index.shape[0]:
            raise ValueError(f"fill_teacher_bank: expected index [B] and teacher features [B, D],"
                             f" found {tuple(index.shape)} and {tuple(teacher_features.shape)}")
        self._check_index(index)
        dtype = self.embed_teacher.weight.dtype
        v_t = F.normalize(self.embed_teacher(teacher_features.to(dtype)), dim=1)
        self.teacher_bank.index_copy_(0, index.long(), v_t.to(self.teacher_bank.dtype))

    @torch.no_grad()
    def update_banks(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """The momentum update of both banks. Under DDP call it with every process's gathered
        index and embeddings (and forward(update_banks=False)) so all banks stay identical."""
        m = self.config.momentum
        momentum_update(self.student_bank, index.long(), v_s, m)
        momentum_update(self.teacher_bank, index.long(), v_t, m)

    def forward(self, student_features: Tensor, teacher_features: Tensor, index: Tensor, *,
                generator: torch.Generator | None = None, update_banks: bool = True) -> Tensor:
        """CRD loss, 0-d. student [B, D_s], teacher [B, D_t], index [B] positions in [0, N)."""
        self._check_batch(student_features, teacher_features, index)
        v_s, v_t = self.embed(student_features, teacher_features)           # [B, E] each
        contrast = sample_contrast_indices(index, self.n_samples, self.config.k_negatives,
                                           generator)                      # [B, k+1]
        bank_dtype = self.teacher_bank.dtype
        # Bank rows are constants: gradients reach the heads through v_s and v_t only.
        scores_s = torch.einsum("bke,be->bk", self.teacher_bank[contrast], v_s.to(bank_dtype))
        scores_t = torch.einsum("bke,be->bk", self.student_bank[contrast], v_t.to(bank_dtype))
        T = self.config.temperature
        if bool(torch.isnan(self.log_z).any()):
            with torch.no_grad():  # Z = mean(exp(s / T)) * N, fixed from the first batch on
                for slot, scores in enumerate((scores_s, scores_t)):
                    self.log_z[slot] = (torch.logsumexp((scores / T).flatten(), 0)
                                        - math.log(scores.numel()) + math.log(self.n_samples))
        loss = (nce_loss(scores_s, self.log_z[0], T, self.n_samples)
                + nce_loss(scores_t, self.log_z[1], T, self.n_samples))
        if self.training and update_banks:
            self.update_banks(index, v_s, v_t)
        return loss
