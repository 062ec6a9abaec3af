"""Knowledge-distillation losses on tensors: divergences, sparse teacher targets, CE, temperature.

Everything here is a small function on tensors (no model, no transformers). Math runs in fp32
or wider (half inputs are cast up; float64 stays float64, so tests can check gradients to
~1e-12); per-position losses come back as `[...]` tensors. Training never holds [B, S, V]
logits: fused_head_loss.py runs the lm_head chunk by chunk, reduces the student to O(K) numbers
per position and calls `kd_from_student_bins` here; `sparse_kd_per_position` and
`cross_entropy_per_position` compute the same values from full logits (fused_head_loss redoes
the rare positions whose tail underflows with them). objective.py weights and sums the
per-position values; hidden-state and attention alignment live in alignment.py. The dense
full-vocabulary references the tests and benchmarks compare against live in
tests/reference_losses.py.

Divergences (`KD_LOSSES`, picked by `--loss`), teacher p, student q, both at temperature T, and
every one multiplied by T^2 (Hinton et al. 2015: keeps gradient scale independent of T; applied
to all of them so switching `--loss` does not change the scaling convention):
  kl    KL(p || q)                                    forward KL
  rkl   KL(q || p)                                    reverse KL
  jsd   b*KL(p || m) + (1-b)*KL(q || m), m = b*p + (1-b)*q   generalised JSD(b), 0 < b < 1
        (the GKD convention, Agarwal et al. 2024; b = 0.5 is the ordinary JSD)
  skl   KL(p || a*p + (1-a)*q)                        skew KL, 0 <= a < 1 (DistiLLM, Ko et al. 2024)
  srkl  KL(q || a*q + (1-a)*p)                        skew reverse KL, 0 <= a < 1
  tvd   1/2 * sum |p - q|                             total variation

Teacher targets are sparse. Both kinds are turned into a `SparseTarget`: teacher log-probs at
the training temperature over K "bins" (the stored ids), plus optionally one tail bin holding
the teacher's mass outside them. The student is collapsed onto the same bins:

* top-k, mode "tail" (DEFAULT): bins = k ids + 1 tail bucket. The teacher's tail mass is
  1 - sum(exp(logprobs)) (logprobs are normalised over the full vocabulary); the student's tail
  bucket is its mass outside the k ids. Temperature: both distributions are first collapsed to
  the k+1 bins at T=1, then tempered bin-wise, p_T(bin) ~ p(bin)^(1/T) - i.e. the tail is a
  single pseudo-token carrying its total mass, on BOTH sides. Tempering the teacher's tail as one
  token but the student's tail token by token would make the minimiser differ from the teacher
  (the student's tempered tail would have to equal the teacher's pseudo-token mass); treating
  both sides alike keeps "loss == 0 iff the collapsed distributions agree" at every T.
  Why default: the loss is then a proper divergence between two full-vocabulary distributions
  (seen through the same k+1-way partition), the student is told how much mass belongs off the
  top-k, and k=1 still carries signal.
* top-k, mode "renormalised": the teacher is renormalised over its k ids, p_T ~ p^(1/T), and the
  tail is dropped - what DistillKit-like tools do. For "kl" the student is its full-vocabulary
  softmax(z/T) gathered at the ids (sum_i p_i (log p_i - log q_i), which pushes all of the
  student's off-top-k mass towards 0: a known bias).
* sampled (random-sampling KD, Anshumann et al. 2025, arXiv 2503.16870): ids drawn N times from
  the teacher at tau_dump; weights w_i = counts_i / N are an unbiased estimate of p_tau_dump.
  For a training temperature tau != tau_dump they are importance-reweighted,
  w_i ~ counts_i * exp(logprob_i * (1/tau - 1/tau_dump)), and normalised (self-normalised,
  hence consistent rather than unbiased). For "kl" the student is its full-vocab log-softmax
  gathered at the ids, so the loss is sum_i w_i (log w_i - log q(i)) = CE(w, q) - H(w): its
  gradient is the RS-KD cross-entropy gradient, an unbiased estimate of grad KL(p || q) (the
  value itself is KL(w || q) >= 0, which tends to KL(p || q) as N grows).
* Zero-tail targets (renormalised top-k, sampled) and the other divergences: KL(q || p) is
  infinite when p is zero off the support, so for rkl, jsd, skl, srkl and tvd both sides are
  restricted to the support and renormalised there (the student's off-support logits then get
  no gradient). With the tail bucket every divergence uses the k+1 bins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

TOPK_MODES = ("tail", "renormalised")
DEFAULT_TOPK_MODE = "tail"
TEMPERATURE_SCHEDULES = ("constant", "linear", "exponential")
# Label of positions that are not targets (torch's cross_entropy ignore_index).
IGNORE = -100
# A finite stand-in for log(0): -inf would turn 0 * (-inf) into NaN in values and gradients.
# Must survive division by a temperature without overflowing fp32 (max ~3.4e38).
LOG_ZERO = -1e30


def at_least_fp32(x: Tensor) -> Tensor:
    """x in float32, or float64 when it already is (never narrower than fp32)."""
    return x if x.dtype == torch.float64 else x.float()


# ----------------------------------------------------------------------------- divergences

def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    return log_a.exp() * (log_a - log_b)  # a * log(a / b) per bin; 0 where a == 0


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed in log space."""
    log_wa = math.log(weight_a) if weight_a > 0 else -math.inf
    return torch.logaddexp(log_a + log_wa, log_b + math.log1p(-weight_a))


def _kl(p, q, **_):
    return _kl_terms(p, q)


def _rkl(p, q, **_):
    return _kl_terms(q, p)


def _jsd(p, q, *, jsd_beta, **_):
    m = _log_mix(p, q, jsd_beta)
    return jsd_beta * _kl_terms(p, m) + (1 - jsd_beta) * _kl_terms(q, m)


def _skl(p, q, *, skew_alpha, **_):
    return _kl_terms(p, _log_mix(p, q, skew_alpha))


def _srkl(p, q, *, skew_alpha, **_):
    return _kl_terms(q, _log_mix(q, p, skew_alpha))


def _tvd(p, q, **_):
    return 0.5 * (p.exp() - q.exp()).abs()


# name -> per-bin terms(teacher_logp, student_logp); the divergence is their sum over bins.
KD_LOSSES = {"kl": _kl, "rkl": _rkl, "jsd": _jsd, "skl": _skl, "srkl": _srkl, "tvd": _tvd}


def divergence(name: str, teacher_logprobs: Tensor, student_logprobs: Tensor,
               valid: Tensor | None = None, *, jsd_beta: float = 0.5,
               skew_alpha: float = 0.1) -> Tensor:
    """Divergence `name` between two normalised distributions given as log-probs over bins.

    teacher_logprobs, student_logprobs: [..., K] (entries <= LOG_ZERO mean probability 0)
    valid: [..., K] bool or None; bins with False contribute nothing
    returns [...] (not multiplied by T^2; the callers below do that)
    """
    if name not in KD_LOSSES:
        raise ValueError(f"loss must be one of {sorted(KD_LOSSES)}, found {name!r}")
    if not 0 < jsd_beta < 1:
        raise ValueError(f"jsd_beta must be in (0, 1), found {jsd_beta}")
    if not 0 <= skew_alpha < 1:
        raise ValueError(f"skew_alpha must be in [0, 1), found {skew_alpha}")
    if teacher_logprobs.shape != student_logprobs.shape:
        raise ValueError(f"teacher and student log-probs must have the same shape, found "
                         f"{tuple(teacher_logprobs.shape)} vs {tuple(student_logprobs.shape)}")
    p = at_least_fp32(teacher_logprobs).clamp_min(LOG_ZERO)
    q = at_least_fp32(student_logprobs).clamp_min(LOG_ZERO)
    terms = KD_LOSSES[name](p, q, jsd_beta=jsd_beta, skew_alpha=skew_alpha)
    if valid is not None:
        terms = torch.where(valid, terms, torch.zeros_like(terms))  # where, not *: no 0*NaN
    return terms.sum(-1)


def _check_temperature(temperature: float, what: str = "temperature") -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"{what} must be a finite number > 0, found {temperature!r}")


# ----------------------------------------------------------------------------- sparse targets

@dataclass(frozen=True)
class SparseTarget:
    """A teacher distribution over a sparse support, already at the training temperature.

    ids:          [B, S, K] long   support ids (invalid entries point at a valid id of the row)
    logprobs:     [B, S, K] fp32   teacher log-prob of each bin at `temperature` (LOG_ZERO if
                                   invalid)
    valid:        [B, S, K] bool   which of the K entries are real
    tail_logprob: [B, S] fp32 or None  teacher log-mass outside the support ("tail" mode);
                  None = the teacher is treated as zero off the support (renormalised, sampled)
    temperature:  the training temperature T the student is compared at
    """

    ids: Tensor
    logprobs: Tensor
    valid: Tensor
    tail_logprob: Tensor | None
    temperature: float


def _check_sparse(ids: Tensor, values: Tensor, what: str) -> None:
    if ids.dim() != 3 or ids.shape != values.shape:
        raise ValueError(f"{what}: expected ids and values of the same shape [B, S, K], found "
                         f"{tuple(ids.shape)} and {tuple(values.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what}: ids must be an integer tensor, found {ids.dtype}")


def _sanitised_ids(ids: Tensor, valid: Tensor) -> Tensor:
    """Point invalid entries at the row's first valid id, so a scatter of the support is exact."""
    first_valid = valid.long().argmax(-1, keepdim=True)
    fill = ids.gather(-1, first_valid)
    return torch.where(valid, ids, fill).clamp_min(0).long()


def _check_distinct(ids: Tensor, valid: Tensor, what: str) -> None:
    # Duplicate ids would count one token twice; padding may repeat anything.
    keyed = torch.where(valid, ids.long(), -1 - torch.arange(ids.shape[-1], device=ids.device))
    ordered = keyed.sort(-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError(f"{what}: ids must be distinct among valid entries of a position, "
                         f"found a repeated id")


def build_topk_target(ids: Tensor, logprobs: Tensor, *, temperature: float = 1.0,
                      mode: str = DEFAULT_TOPK_MODE) -> SparseTarget:
    """Top-k teacher target. ids [B,S,k] long, logprobs [B,S,k] at T=1 over the full vocab.

    Entries with id < 0 or logprob == -inf are padding. See the module docstring for the modes.
    """
    _check_sparse(ids, logprobs, "top-k target")
    _check_temperature(temperature)
    if mode not in TOPK_MODES:
        raise ValueError(f"top-k mode must be one of {TOPK_MODES}, found {mode!r}")
    lp = at_least_fp32(logprobs.detach())
    valid = (ids >= 0) & (lp > -math.inf)
    _check_distinct(ids, valid, "top-k target")
    lp = torch.where(valid, lp, torch.full_like(lp, LOG_ZERO))
    if mode == "renormalised":
        return SparseTarget(_sanitised_ids(ids, valid), F.log_softmax(lp / temperature, -1),
                            valid, None, float(temperature))
    # Tail mass = 1 - sum p_i; -expm1(lse) is accurate when the mass is small. Quantised
    # log-probs can sum to slightly more than 1: clamp, i.e. an empty tail.
    stored_mass = torch.logsumexp(lp, -1).clamp_max(0.0)
    tail = torch.log(-torch.expm1(stored_mass)).clamp_min(LOG_ZERO)  # [B, S]
    bins = F.log_softmax(torch.cat([lp, tail[..., None]], -1) / temperature, -1)  # [B, S, k+1]
    return SparseTarget(_sanitised_ids(ids, valid), bins[..., :-1], valid, bins[..., -1],
                        float(temperature))


def build_sampled_target(ids: Tensor, counts: Tensor, logprobs: Tensor | None, *,
                         n_draws: int, sample_temperature: float = 1.0,
                         temperature: float = 1.0) -> SparseTarget:
    """RS-KD target. ids/counts/logprobs [B,S,m] (counts 0 = padding; logprobs at T=1).

    w_i = counts_i / n_draws when temperature == sample_temperature, otherwise
    w_i ~ counts_i * exp(logprob_i * (1/temperature - 1/sample_temperature)), normalised.
    logprobs may be None (a signal stored without them) only at the sample temperature.
    Every position must hold either 0 draws (ignored; mask it) or exactly n_draws.
    """
    _check_sparse(ids, counts, "sampled target")
    if logprobs is None and temperature != sample_temperature:
        raise ValueError(f"sampled target: temperature {temperature:g} differs from the sample "
                         f"temperature {sample_temperature:g}, which needs the teacher's "
                         f"log-probs; none were given (a signal stored without them)")
    if logprobs is not None and logprobs.shape != ids.shape:
        raise ValueError(f"sampled target: logprobs must be {tuple(ids.shape)} like ids, "
                         f"found {tuple(logprobs.shape)}")
    if not (isinstance(n_draws, int) and n_draws >= 1):
        raise ValueError(f"n_draws must be an int >= 1, found {n_draws!r}")
    _check_temperature(sample_temperature, "sample_temperature")
    _check_temperature(temperature)
    c = counts.detach().float()
    if bool((c < 0).any()):
        raise ValueError("sampled target: counts must be >= 0, found a negative count")
    totals = c.sum(-1)
    if bool(((totals != 0) & (totals != n_draws)).any()):
        bad = totals[(totals != 0) & (totals != n_draws)][0].item()
        raise ValueError(f"sampled target: counts of a position must sum to n_draws={n_draws} "
                         f"(or 0 for padding), found {bad:g}")
    valid = c > 0
    _check_distinct(ids, valid, "sampled target")
    log_w = c.clamp_min(1).log()
    if logprobs is not None:  # the shift is 0 at the sample temperature (bit for bit)
        log_w = log_w + at_least_fp32(logprobs.detach()) * (1.0 / temperature -
                                                             1.0 / sample_temperature)
    log_w = torch.where(valid, log_w, torch.full_like(c, LOG_ZERO))
    return SparseTarget(_sanitised_ids(ids, valid), F.log_softmax(log_w, -1), valid, None,
                        float(temperature))


def student_tail_needed(target: SparseTarget, loss: str) -> bool:
    """Whether the KD compares a student tail bin (everything but zero-tail targets with a
    divergence other than kl, which compare on the support alone)."""
    return target.tail_logprob is not None or loss == "kl"


def support_size(target: SparseTarget) -> Tensor:
    """[...] long: distinct ids in the support; an all-padding row still holds its fill id."""
    return target.valid.sum(-1).clamp_min(1)


def sparse_kd_per_position(student_logits: Tensor, target: SparseTarget, *, loss: str = "kl",
                           jsd_beta: float = 0.5, skew_alpha: float = 0.1) -> Tensor:
    """T^2 * divergence(teacher, student) over the target's bins, per position.

    student_logits: [..., V]; target fields [..., K] with the same leading dims -> [...]
    The [..., V] work (gather, tail logsumexp) is here; the rest is kd_from_student_bins,
    which fused_head_loss shares.
    """
    if student_logits.shape[:-1] != target.ids.shape[:-1]:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and target ids "
                         f"{tuple(target.ids.shape)} must share leading dims [..., V] / [..., K]")
    T = target.temperature
    z = at_least_fp32(student_logits)
    tail_logit = no_tail = None
    if student_tail_needed(target, loss):
        # scatter of LOG_ZERO over the support: no [..., V] bool mask needed
        if target.tail_logprob is None:  # kl: the student's tempered softmax(z/T) over the vocab
            tail_logit = (z / T).scatter(-1, target.ids, LOG_ZERO).logsumexp(-1)
        else:  # collapse at T=1, then temper the tail like one token (see module docstring)
            tail_logit = z.scatter(-1, target.ids, LOG_ZERO).logsumexp(-1) / T
        no_tail = support_size(target) == z.shape[-1]
    return kd_from_student_bins(z.gather(-1, target.ids), tail_logit, no_tail, target,
                                loss=loss, jsd_beta=jsd_beta, skew_alpha=skew_alpha)


def kd_from_student_bins(z_support: Tensor, tail_logit: Tensor | None, no_tail: Tensor | None,
                         target: SparseTarget, *, loss: str = "kl", jsd_beta: float = 0.5,
                         skew_alpha: float = 0.1) -> Tensor:
    """sparse_kd_per_position once the student is reduced to O(K) numbers per position.

    z_support:  [..., K] the student's logits at target.ids (padding entries: any value)
    tail_logit: [...] the student's tail bin, tempered: logsumexp(z off the support) / T in
                "tail" mode, logsumexp(z / T off the support) for zero-tail kl; None when
                student_tail_needed is False
    no_tail:    [...] bool, the support is the whole vocabulary (None with tail_logit None)
    returns [...]; differentiable w.r.t. z_support and tail_logit.
    """
    T = target.temperature
    z_support = z_support.masked_fill(~target.valid, LOG_ZERO * T)
    zero_tail = target.tail_logprob is None
    if tail_logit is None:
        if student_tail_needed(target, loss):
            raise ValueError(f"loss {loss!r} with this target compares a student tail bin: "
                             f"expected a tail_logit, found None")
        # Both sides restricted to the support (KL(q||p) would be infinite off it).
        q = F.log_softmax(z_support / T, -1)
        return T * T * divergence(loss, target.logprobs, q, target.valid, jsd_beta=jsd_beta,
                                  skew_alpha=skew_alpha)
    q = F.log_softmax(torch.cat([z_support / T, tail_logit[..., None]], -1), -1)  # [..., K+1]
    teacher_tail = target.tail_logprob if not zero_tail else torch.full_like(tail_logit, LOG_ZERO)
    # When the support is the whole vocabulary the student has no tail: drop the teacher's
    # (rounding-level) tail too instead of comparing it with log(0).
    teacher_tail = torch.where(no_tail, torch.full_like(teacher_tail, LOG_ZERO), teacher_tail)
    p = F.log_softmax(torch.cat([target.logprobs, teacher_tail[..., None]], -1), -1)
    bins_valid = torch.cat([target.valid, torch.ones_like(target.valid[..., :1])], -1)
    return T * T * divergence(loss, p, q, bins_valid, jsd_beta=jsd_beta, skew_alpha=skew_alpha)


# ----------------------------------------------------------------------------- hard labels

def cross_entropy_per_position(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0,
                               ignore_index: int = -100) -> Tensor:
    """(1-eps) * -log q(y) + eps * mean_j -log q(j), as F.cross_entropy; 0 where label ignored.

    logits: [..., V], labels: [...] long -> [...]
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match logits {tuple(logits.shape)} "
                         f"without the vocab dim")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], found {label_smoothing}")
    logq = F.log_softmax(at_least_fp32(logits), -1)
    keep = labels != ignore_index
    nll = -logq.gather(-1, torch.where(keep, labels, 0).long()[..., None]).squeeze(-1)
    loss = nll if label_smoothing == 0 else (  # plain NLL: no [..., V] mean pass
        (1 - label_smoothing) * nll - label_smoothing * logq.mean(-1))
    return torch.where(keep, loss, torch.zeros_like(loss))


# ----------------------------------------------------------------------------- temperature

def temperature_at(step: int, total_steps: int, t0: float, t_end: float,
                   kind: str = "constant") -> float:
    """Distillation temperature at `step` (clamped to [0, total_steps]).

    constant:    t0
    linear:      t0 + (t_end - t0) * step / total_steps
    exponential: t0 * exp(-gamma * step), gamma = ln(t0 / t_end) / total_steps (seed 003,
                 tau_0 = 8 -> tau_final = 1), i.e. t0 * (t_end / t0) ** (step / total_steps)
    """
    if kind not in TEMPERATURE_SCHEDULES:
        raise ValueError(f"schedule kind must be one of {TEMPERATURE_SCHEDULES}, found {kind!r}")
    _check_temperature(t0, "t0")
    _check_temperature(t_end, "t_end")
    if total_steps < 1 or step < 0:
        raise ValueError(f"expected total_steps >= 1 and step >= 0, found {total_steps}, {step}")
    frac = min(step / total_steps, 1.0)
    if kind == "constant":
        return float(t0)
    if kind == "linear":
        return float(t0 + (t_end - t0) * frac)
    return float(t0 * (t_end / t0) ** frac)
