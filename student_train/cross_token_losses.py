"""Cross-tokenizer KD losses on tensors: the vocabulary-mapped KL and ULD.

The student and the teacher have different vocabularies. The caller has already aligned the
positions (both next tokens start at the same byte, see issue 15) and gathered, at those n
positions only, the student's logits [n, Vs] and the teacher's stored top-k signal: ids [n, k]
in the TEACHER's vocabulary and their log-probs [n, k] at T=1 over the teacher's full vocabulary
(padding: id < 0 or log-prob -inf; the tail mass is 1 - sum exp(log-probs), exactly as
losses.build_topk_target reads the same tensors).

Vocabulary-mapped KL (the X-Token P-KL / TRL GOLD idea). A sparse map sends teacher token t to
the student token that starts its text, `teacher_to_student_first[t]` (-1: unmapped); `exact[t]`
says that student token spells t exactly (else it is only the first piece of t's student
decomposition). The student's probability of teacher token t is read as p_S(map(t)): the
student's mass on texts that start with that piece.
* Many-to-one: teacher tokens of one position's top-k that map to the same student token s
  form ONE bin, of teacher mass P(s) = sum of their probabilities, student mass p_S(s). This
  is the same as sharing p_S(s) among them in proportion to the teacher's own probabilities
  (q(t) = p_S(s) p_T(t) / P(s)): every divergence here then only sees P(s) vs p_S(s), and the
  projected student stays a sub-distribution (each student token is counted once). The student
  gets no signal about how the teacher splits a bin: it has one token for all of them.
* "Other": the teacher's unmapped top-k mass plus its tail form one bin; on the student side it
  is everything outside the bins' student tokens. Both sides are then distributions over the
  same (bins + other) partition, and the temperature acts like losses.py's "tail" mode: both
  sides collapsed at T=1, then tempered bin-wise, times T^2. Every `--loss` of losses.KD_LOSSES
  works unchanged on these bins.
* The result IS a losses.SparseTarget in "tail" mode over STUDENT ids (`MappedTarget.target`):
  losses.sparse_kd_per_position and fused_head_loss (via HeadLossTerms.targets) take it as it
  is, so the lm_head path needs nothing new. With the identity map (same tokenizer) it is bit
  for bit the target build_topk_target makes from the same tensors.
* Conditioned rows (`conditioned_ids`, a student position inside a teacher token; see
  student_train/cross_inside.py): the entries' student ids are given (the piece each entry
  continues the student's bytes with, -1: the entry does not contribute) instead of read from
  the map, and the target is the contributing mass renormalised: no "other" bin (its teacher
  mass is 0, the tail and the other entries being outside the condition), so the student is
  pulled onto the pieces the teacher's conditional holds; with `ends_in_other`, the entries
  marked cross_inside.ENDS_HERE (teacher tokens ending where the student stands) are that
  "other" bin instead of being left out.
* Chain rows (`chain_*`, an aligned position whose student token spans several teacher
  tokens; see student_train/cross_chain.py): the top-k entry of the teacher's first token t1
  is split, exp(chain_logc) of its mass going to the student's token (appended as entry k + 1)
  and the rest staying on t1's mapped piece; the row's tail is unchanged.
* `mapped_share` [n] = the share of the stored top-k mass whose tokens map (at T=1). A position
  whose mass is mostly unmapped gives a finite, small loss (most of the mass sits in "other",
  which the student matches cheaply; all unmapped gives exactly 0 and no gradient), never
  garbage; the caller skips positions under a threshold with `MappedTarget.usable` and counts
  them.

ULD (Boizard et al. 2024, Universal Logit Distillation; TRL's ULDLoss): the L1 distance between
the two distributions' probabilities sorted in decreasing order, the shorter vector padded with
zeros (no vocabulary map). With a stored teacher only its top-k is known individually, so both
sides are cut the same way: the teacher's k largest probabilities + its tail mass as one bin,
the student's k' largest (k' = the position's count of valid teacher entries unless
`student_k` says otherwise) + its remaining mass as one bin; each side collapsed at T=1 and
tempered bin-wise (as above), then
    T^2 * ( sum_i |s_(i) - t_(i)|  +  |s_rest - t_tail| ),   i over max(k, k') ranks.
Comparing the tails as one number is a lower bound of the full-vocabulary ULD (triangle
inequality), equal to it when the teacher's top-k is its whole vocabulary. With k' != k the
padded ranks count mass that the other side holds in its rest bin, so identical distributions
give a non-zero loss; k' = k (the default) has no such bias.

Chunking: the `*_sum` functions take positions in chunks of `chunk_size`, each under
torch.utils.checkpoint, so the autograd graph keeps no [n, V] intermediate: at most one chunk's
[chunk, V] buffers exist at a time, in forward and in backward. They return the weighted SUM
over positions (the trainer divides, as for the other losses).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from student_train.cross_inside import ENDS_HERE
from student_train.losses import LOG_ZERO, SparseTarget, at_least_fp32, sparse_kd_per_position

Tensor = torch.Tensor
DEFAULT_CHUNK_SIZE = 1024


# ----------------------------------------------------------------------------- teacher top-k

def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, found {temperature!r}")


def _teacher_topk(ids: Tensor, logprobs: Tensor, vocab_size: int | None) -> tuple[Tensor, Tensor]:
    """(log-probs with padding set to LOG_ZERO, valid bool), both [..., k], after checks."""
    if ids.dim() < 1 or ids.shape != logprobs.shape:
        raise ValueError(f"teacher top-k: expected ids and log-probs of the same shape [n, k], "
                         f"found {tuple(ids.shape)} and {tuple(logprobs.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"teacher top-k: ids must be an integer tensor, found {ids.dtype}")
    lp = at_least_fp32(logprobs.detach())
    valid = (ids >= 0) & (lp > -math.inf)
    if vocab_size is not None and bool((valid & (ids >= vocab_size)).any()):
        raise ValueError(f"teacher top-k: ids must be < the teacher vocabulary size "
                         f"{vocab_size} (the vocabulary map's length), found "
                         f"{int(ids[valid].max())}; the map belongs to another tokenizer")
    keyed = torch.where(valid, ids.long(), -1 - torch.arange(ids.shape[-1], device=ids.device))
    ordered = keyed.sort(-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError("teacher top-k: ids must be distinct among the valid entries of a "
                         "position, found a repeated id")
    return torch.where(valid, lp, torch.full_like(lp, LOG_ZERO)), valid


def _tail_logprob(lp: Tensor) -> Tensor:
    """[...] log(1 - sum exp(lp)): the teacher's mass outside its stored top-k (as
    losses.build_topk_target computes it; quantised log-probs summing over 1 give LOG_ZERO)."""
    stored_mass = torch.logsumexp(lp, -1).clamp_max(0.0)
    return torch.log(-torch.expm1(stored_mass)).clamp_min(LOG_ZERO)


# ----------------------------------------------------------------------------- vocab-mapped KL

@dataclass(frozen=True)
class MappedTarget:
    """A teacher top-k projected onto the student vocabulary.

    target:       SparseTarget over STUDENT ids, "tail" mode, at the training temperature;
                  one valid entry per distinct student token reached (at the position of its
                  first teacher token in the top-k), the tail bin = "other"
    mapped_share: [...] fp32, share of the stored top-k mass (T=1) whose tokens map; 0 where
                  the position holds no valid entry
    """

    target: SparseTarget
    mapped_share: Tensor

    def usable(self, min_mapped_share: float) -> Tensor:
        """[...] bool: positions whose mapped share is at least `min_mapped_share`."""
        return self.mapped_share >= min_mapped_share


def _group_by_student_id(student_ids: Tensor, usable: Tensor,
                         lp: Tensor) -> tuple[Tensor, Tensor]:
    """Merge the entries of a row that map to the same student id.

    student_ids [..., k] long (any value where not usable), usable [..., k] bool, lp [..., k].
    returns (group_lp, leader): leader[j] is True for the first usable entry (in the row's
    order) of each student id, and group_lp[j] there is the logsumexp of the lp of all entries
    with that id (LOG_ZERO at non-leaders). A group of one keeps its lp bit for bit.
    """
    k = lp.shape[-1]
    key = torch.where(usable, student_ids, torch.iinfo(torch.int64).max)
    sorted_key, order = key.sort(dim=-1, stable=True)  # stable: a run starts at its first entry
    position = torch.arange(k, device=lp.device).expand_as(order)
    starts = torch.ones_like(usable)
    starts[..., 1:] = sorted_key[..., 1:] != sorted_key[..., :-1]
    run_start = torch.where(starts, position, 0).cummax(-1).values
    first = torch.empty_like(order).scatter_(-1, order, order.gather(-1, run_start))
    leader = usable & (first == position)
    top = torch.full_like(lp, LOG_ZERO).scatter_reduce(-1, first, lp, "amax")
    total = torch.zeros_like(lp).scatter_add(-1, first, (lp - top.gather(-1, first)).exp())
    group_lp = torch.where(leader, top + total.log(), torch.full_like(lp, LOG_ZERO))
    return group_lp, leader


def _mapped_share(lp: Tensor, valid: Tensor, usable: Tensor) -> Tensor:
    p = lp.exp()
    stored = torch.where(valid, p, 0.0).sum(-1)
    mapped = torch.where(usable, p, 0.0).sum(-1)
    return torch.where(stored > 0, mapped / torch.where(stored > 0, stored, 1.0), 0.0)


def _ends_here_logprob(lp: Tensor, valid: Tensor, conditioned_ids: Tensor | None) -> Tensor:
    """[...] log of the mass of a row's entries marked ENDS_HERE (LOG_ZERO: none, or no ids)."""
    if conditioned_ids is None:
        return torch.full_like(lp[..., 0], LOG_ZERO)
    ends = valid & (conditioned_ids == ENDS_HERE)
    total = torch.logsumexp(torch.where(ends, lp, LOG_ZERO), -1)
    return torch.where(ends.any(-1), total, torch.full_like(total, LOG_ZERO))


def _check_map(first: Tensor, exact: Tensor | None, exact_only: bool) -> None:
    if first.dim() != 1 or first.is_floating_point() or first.dtype == torch.bool:
        raise ValueError(f"teacher_to_student_first must be an integer tensor [Vt], found "
                         f"{first.dtype} {tuple(first.shape)}")
    if exact is not None and (exact.dtype != torch.bool or exact.shape != first.shape):
        raise ValueError(f"exact must be a bool tensor shaped like teacher_to_student_first "
                         f"{tuple(first.shape)}, found {exact.dtype} {tuple(exact.shape)}")
    if exact_only and exact is None:
        raise ValueError("exact_only=True needs the map's `exact` tensor, found None")


def _split_chain(lp: Tensor, valid: Tensor, student_ids: Tensor, usable: Tensor,
                 entry: Tensor, chain_ids: Tensor, log_c: Tensor):
    """Each row's entry `entry` (t1; -1: none) split in two (student_train/cross_chain.py):
    exp(log_c) of its mass onto student id `chain_ids`, the rest kept where it was. Returns
    (lp, valid, student_ids, usable), each [..., k + 1] (the moved part last)."""
    if not (entry.shape == chain_ids.shape == log_c.shape == lp.shape[:-1]):
        raise ValueError(f"chain_entry, chain_ids and chain_logc must be shaped like the top-k's "
                         f"rows {tuple(lp.shape[:-1])}, found {tuple(entry.shape)}, "
                         f"{tuple(chain_ids.shape)} and {tuple(log_c.shape)}")
    column = entry.long().clamp_min(0)[..., None]  # [..., 1]
    has = (entry >= 0) & (chain_ids >= 0) & valid.gather(-1, column)[..., 0]  # [...]
    first = lp.gather(-1, column)  # [..., 1]: P(t1)
    c = log_c.to(lp.dtype).clamp_max(0.0)[..., None]
    kept = (first + torch.log(-torch.expm1(c))).clamp_min(LOG_ZERO)  # P(t1) (1 - C)
    at = has[..., None] & (torch.arange(lp.shape[-1], device=lp.device) == column)
    lp = torch.cat([torch.where(at, kept, lp),
                    torch.where(has[..., None], first + c, LOG_ZERO)], -1)
    student_ids = torch.cat([student_ids, torch.where(has, chain_ids.long(), 0)[..., None]], -1)
    return (lp, torch.cat([valid, has[..., None]], -1), student_ids,
            torch.cat([usable, has[..., None]], -1))


def project_topk_target(teacher_ids: Tensor, teacher_logprobs: Tensor,
                        teacher_to_student_first: Tensor, exact: Tensor | None = None, *,
                        temperature: float = 1.0, exact_only: bool = False,
                        conditioned_ids: Tensor | None = None,
                        conditioned: Tensor | None = None,
                        ends_in_other: bool = False,
                        chain_entry: Tensor | None = None, chain_ids: Tensor | None = None,
                        chain_logc: Tensor | None = None) -> MappedTarget:
    """The teacher's stored top-k as a target over the student vocabulary (module docstring).

    teacher_ids [..., k] int (teacher vocab; < 0 = padding), teacher_logprobs [..., k] at T=1
    (-inf = padding); teacher_to_student_first [Vt] int (-1 = unmapped); exact [Vt] bool or
    None; exact_only: count teacher tokens without an exact student twin as unmapped;
    conditioned [...] bool and conditioned_ids [..., k] int (both or neither): rows given
    their entries' student ids (-1: not contributing), renormalised (module docstring);
    ends_in_other: their entries marked cross_inside.ENDS_HERE (-2: the teacher token ends
    where the student stands) keep their mass, as the "other" bin, instead;
    chain_entry [...] int (-1: none), chain_ids [...] int, chain_logc [...] float (all or
    none): rows whose top-k column chain_entry gives exp(chain_logc) of its mass to student
    id chain_ids (a student token spanning several teacher tokens, cross_chain.py); the
    target then has k + 1 entries per row.
    """
    _check_temperature(temperature)
    _check_map(teacher_to_student_first, exact, exact_only)
    lp, valid = _teacher_topk(teacher_ids, teacher_logprobs, teacher_to_student_first.shape[0])
    safe_ids = torch.where(valid, teacher_ids.long(), 0)
    student_ids = teacher_to_student_first.to(lp.device).long()[safe_ids]
    usable = valid & (student_ids >= 0)
    if exact_only:
        usable &= exact.to(lp.device)[safe_ids]
    if (conditioned is None) != (conditioned_ids is None):
        raise ValueError("conditioned and conditioned_ids go together: pass both or neither")
    if conditioned is not None:
        if conditioned_ids.shape != teacher_ids.shape or conditioned.shape != lp.shape[:-1]:
            raise ValueError(f"conditioned_ids must be shaped like the top-k "
                             f"{tuple(teacher_ids.shape)} and conditioned like its rows "
                             f"{tuple(lp.shape[:-1])}, found {tuple(conditioned_ids.shape)} "
                             f"and {tuple(conditioned.shape)}")
        row = conditioned.bool()[..., None]
        student_ids = torch.where(row, conditioned_ids.long(), student_ids)
        usable = torch.where(row, valid & (conditioned_ids >= 0), usable)
    tail = _tail_logprob(lp)  # before a split, which keeps each row's stored mass
    ends_lp = _ends_here_logprob(lp, valid, conditioned_ids if ends_in_other else None)
    chain = (chain_entry, chain_ids, chain_logc)
    if any(x is not None for x in chain):
        if any(x is None for x in chain):
            raise ValueError("chain_entry, chain_ids and chain_logc go together: pass all "
                             "three or none")
        lp, valid, student_ids, usable = _split_chain(lp, valid, student_ids, usable, *chain)
    group_lp, leader = _group_by_student_id(student_ids, usable, lp)
    unmapped = valid & ~usable
    unmapped_lp = torch.logsumexp(torch.where(unmapped, lp, LOG_ZERO), -1)
    # only where something is unmapped, so an identity map reproduces build_topk_target's bits
    other = torch.where(unmapped.any(-1), torch.logaddexp(unmapped_lp, tail), tail)
    if conditioned is not None:  # renormalised over the contributing entries (and E)
        other = torch.where(conditioned.bool(), ends_lp, other)
    bins = F.log_softmax(torch.cat([group_lp, other[..., None]], -1) / temperature, -1)
    first_leader = leader.long().argmax(-1, keepdim=True)  # fill: a valid id of the row
    fill = student_ids.gather(-1, first_leader)
    ids = torch.where(leader, student_ids, fill).clamp_min(0)
    target = SparseTarget(ids, bins[..., :-1], leader, bins[..., -1], float(temperature))
    return MappedTarget(target, _mapped_share(lp, valid, usable))


# ----------------------------------------------------------------------------- chunked sums

def _check_rows(student_logits: Tensor, n_rows: int, weights: Tensor | None,
                chunk_size: int) -> Tensor:
    """The weights [n] (ones when None) after checking the shapes the sums need."""
    if student_logits.dim() != 2 or student_logits.shape[0] != n_rows:
        raise ValueError(f"student logits must be [n, Vs] with n = {n_rows} positions like the "
                         f"teacher signal, found {tuple(student_logits.shape)}")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, found {chunk_size!r}")
    if weights is None:
        return torch.ones(n_rows, device=student_logits.device)
    if weights.shape != (n_rows,):
        raise ValueError(f"weights must be [n]={(n_rows,)}, found {tuple(weights.shape)}")
    if bool((weights < 0).any()):
        raise ValueError("weights must be >= 0, found a negative weight")
    return weights


def _weighted_sum(per_position: Callable[..., Tensor], logits: Tensor, weights: Tensor,
                  *rows: Tensor) -> Tensor:
    values = per_position(logits, *rows)
    w = weights.to(values.dtype)
    return torch.where(w != 0, values * w, torch.zeros_like(values)).sum()  # no 0 * NaN


def _chunked_sum(per_position: Callable[..., Tensor], student_logits: Tensor, weights: Tensor,
                 chunk_size: int, rows: tuple[Tensor, ...]) -> Tensor:
    """sum_i weights[i] * per_position(student_logits, *rows)[i], chunk by chunk.

    Each chunk runs under a non-reentrant checkpoint when gradients flow: it saves only its
    inputs (views) and recomputes its [chunk, V] work in backward.
    """
    track = torch.is_grad_enabled() and student_logits.requires_grad
    total = None
    for start in range(0, max(student_logits.shape[0], 1), chunk_size):  # >= 1 chunk: graph
        piece = slice(start, start + chunk_size)
        args = (per_position, student_logits[piece], weights[piece], *(r[piece] for r in rows))
        part = (checkpoint(_weighted_sum, *args, use_reentrant=False, preserve_rng_state=False)
                if track else _weighted_sum(*args))
        total = part if total is None else total + part
    return total


def _check_student_ids(target: SparseTarget, student_vocab: int) -> None:
    if target.ids.numel() and int(target.ids.max()) >= student_vocab:
        raise ValueError(f"the vocabulary map sends a teacher token to student id "
                         f"{int(target.ids.max())}, but the student has {student_vocab} logits; "
                         f"the map was built for another student tokenizer: rebuild it")


def mapped_kd_sum(student_logits: Tensor, mapped: MappedTarget, weights: Tensor | None = None,
                  *, loss: str = "kl", jsd_beta: float = 0.5, skew_alpha: float = 0.1,
                  chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """sum_i weights[i] * T^2 * divergence(teacher bins, student bins) at position i.

    student_logits [n, Vs] (any float dtype; computed in fp32, fp64 stays fp64); mapped: from
    project_topk_target with fields [n, k]; weights [n] >= 0 or None (all 1). Zero the weight
    of positions to skip (e.g. weights * mapped.usable(share)). Returns a scalar.
    """
    if mapped.target.ids.dim() != 2:
        raise ValueError(f"mapped target fields must be [n, k], found "
                         f"{tuple(mapped.target.ids.shape)}")
    weights = _check_rows(student_logits, mapped.target.ids.shape[0], weights, chunk_size)
    _check_student_ids(mapped.target, student_logits.shape[-1])
    t = mapped.target

    def per_position(logits, ids, logprobs, valid, tail):
        rows = SparseTarget(ids, logprobs, valid, tail, t.temperature)
        return sparse_kd_per_position(logits, rows, loss=loss, jsd_beta=jsd_beta,
                                      skew_alpha=skew_alpha)

    return _chunked_sum(per_position, student_logits, weights, chunk_size,
                        (t.ids, t.logprobs, t.valid, t.tail_logprob))


# ----------------------------------------------------------------------------- ULD

def _student_sorted_bins(z: Tensor, ranks: int, row_ranks: Tensor | None,
                         temperature: float) -> Tensor:
    """[..., ranks + 1] probabilities: the student's `ranks` largest (the ones past a row's
    `row_ranks` moved into the rest) and its remaining mass, collapsed at T=1, tempered."""
    top_z, top_idx = z.topk(ranks, -1)  # sorted, largest first
    # the rest is summed directly (not 1 - top mass): no cancellation, finite gradients
    rest_z = z.scatter(-1, top_idx, LOG_ZERO).logsumexp(-1)
    if row_ranks is not None:
        beyond = torch.arange(ranks, device=z.device) >= row_ranks[..., None]
        rest_z = torch.logaddexp(rest_z, torch.where(beyond, top_z, LOG_ZERO).logsumexp(-1))
        top_z = torch.where(beyond, LOG_ZERO, top_z)
    return F.log_softmax(torch.cat([top_z, rest_z[..., None]], -1) / temperature, -1).exp()


def uld_per_position(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, *,
                     temperature: float = 1.0, student_k: int | None = None) -> Tensor:
    """T^2 * (sum_i |s_(i) - t_(i)| + |s_rest - t_tail|) per position (module docstring).

    student_logits [..., Vs]; teacher_ids, teacher_logprobs [..., k] (the stored top-k at T=1;
    padding as in losses.build_topk_target; the ids only mark padding); student_k: how many of
    the student's largest probabilities to sort (at most Vs); default: as many as the
    position's valid teacher entries, so k' = k row by row. -> [...]
    """
    _check_temperature(temperature)
    lp, valid = _teacher_topk(teacher_ids, teacher_logprobs, None)
    if student_logits.shape[:-1] != lp.shape[:-1]:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher top-k "
                         f"{tuple(lp.shape)} must share leading dims [..., Vs] / [..., k]")
    if student_k is not None and not (isinstance(student_k, int) and student_k >= 1):
        raise ValueError(f"student_k must be an int >= 1 or None, found {student_k!r}")
    z = at_least_fp32(student_logits)
    k = lp.shape[-1]
    k_student = min(k if student_k is None else student_k, z.shape[-1])
    student = _student_sorted_bins(z, k_student, valid.sum(-1) if student_k is None else None,
                                   temperature)
    teacher_sorted = lp.sort(-1, descending=True).values  # padding (LOG_ZERO) last
    teacher = F.log_softmax(torch.cat([teacher_sorted, _tail_logprob(lp)[..., None]], -1)
                            / temperature, -1).exp()
    ranks = max(k, k_student)
    s_ranks = F.pad(student[..., :-1], (0, ranks - k_student))
    t_ranks = F.pad(teacher[..., :-1], (0, ranks - k))
    distance = (s_ranks - t_ranks).abs().sum(-1) + (student[..., -1] - teacher[..., -1]).abs()
    return temperature * temperature * distance


def uld_sum(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
            weights: Tensor | None = None, *, temperature: float = 1.0,
            student_k: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """sum_i weights[i] * uld_per_position(...)[i]; student_logits [n, Vs], teacher [n, k],
    weights [n] >= 0 or None (all 1). Returns a scalar."""
    if teacher_ids.dim() != 2:
        raise ValueError(f"teacher ids must be [n, k], found {tuple(teacher_ids.shape)}")
    weights = _check_rows(student_logits, teacher_ids.shape[0], weights, chunk_size)

    def per_position(logits, ids, logprobs):
        return uld_per_position(logits, ids, logprobs, temperature=temperature,
                                student_k=student_k)

    return _chunked_sum(per_position, student_logits, weights, chunk_size,
                        (teacher_ids, teacher_logprobs))
