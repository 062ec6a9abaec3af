"""Straightforward references for student_train/cross_token_losses.py (no production code calls
these). One position at a time, in Python floats (float64), from the definitions in that
module's docstring: explicit dicts for the vocabulary-mapped bins, explicit sorted lists for
ULD, textbook divergence formulas. Written for clarity, not speed: keep the vocabularies small.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

JSD_BETA, SKEW_ALPHA = 0.3, 0.2  # non-default, so a swapped convention shows


def textbook_divergence(name: str, p: Sequence[float], q: Sequence[float]) -> float:
    """The divergences of losses.KD_LOSSES on explicit probability lists (0 * log 0 = 0), with
    jsd_beta = JSD_BETA and skew_alpha = SKEW_ALPHA."""
    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    if name == "kl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "jsd":
        m = [JSD_BETA * x + (1 - JSD_BETA) * y for x, y in zip(p, q)]
        return JSD_BETA * kl(p, m) + (1 - JSD_BETA) * kl(q, m)
    if name == "skl":
        return kl(p, [SKEW_ALPHA * x + (1 - SKEW_ALPHA) * y for x, y in zip(p, q)])
    if name == "srkl":
        return kl(q, [SKEW_ALPHA * y + (1 - SKEW_ALPHA) * x for x, y in zip(p, q)])
    if name == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    raise AssertionError(name)


def temper(probs: Sequence[float], temperature: float) -> list[float]:
    """p^(1/T), normalised (a zero stays zero)."""
    powered = [x ** (1 / temperature) if x > 0 else 0.0 for x in probs]
    return [x / sum(powered) for x in powered]


def softmax(logits: Sequence[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    return [x / sum(exps) for x in exps]


def mapped_kd_reference(student_logits: torch.Tensor, teacher_probs: Mapping[int, float],
                        tail_mass: float, teacher_to_student_first: Sequence[int],
                        exact: Sequence[bool] | None = None, *, exact_only: bool = False,
                        temperature: float = 1.0, loss: str = "kl") -> float:
    """T^2 * divergence between the teacher's and the student's (student token bins + other).

    student_logits: [Vs] one position; teacher_probs: {teacher id: probability at T=1} for the
    teacher tokens known one by one (a top-k, or the whole vocabulary); tail_mass: the
    teacher's mass outside them. A bin per student token that a known, usable teacher token
    maps to (teacher mass summed over those tokens); everything else is "other".
    """
    teacher_bins: dict[int, float] = {}
    teacher_other = tail_mass
    for t, p in teacher_probs.items():
        s = teacher_to_student_first[t]
        if s >= 0 and (not exact_only or exact[t]):
            teacher_bins[s] = teacher_bins.get(s, 0.0) + p
        else:
            teacher_other += p
    student = softmax([float(x) for x in student_logits])
    order = sorted(teacher_bins)
    p = [teacher_bins[s] for s in order] + [teacher_other]
    q = [student[s] for s in order]
    q.append(max(0.0, 1.0 - sum(q)))
    return temperature ** 2 * textbook_divergence(loss, temper(p, temperature),
                                                  temper(q, temperature))


def shared_mass_kl(student_logits: torch.Tensor, teacher_probs: Mapping[int, float],
                   tail_mass: float, teacher_to_student_first: Sequence[int]) -> float:
    """KL at T=1 over the TEACHER's tokens, each mapped token t given the student mass
    q(t) = p_S(s) * p_T(t) / P(s) (its share of its student token s, in proportion to the
    teacher), unmapped tokens and the tail as one "other" token on both sides."""
    student = softmax([float(x) for x in student_logits])
    group_mass: dict[int, float] = {}
    for t, p in teacher_probs.items():
        s = teacher_to_student_first[t]
        if s >= 0:
            group_mass[s] = group_mass.get(s, 0.0) + p
    total, teacher_other = 0.0, tail_mass
    for t, p in teacher_probs.items():
        s = teacher_to_student_first[t]
        if s < 0:
            teacher_other += p
        elif p > 0:
            total += p * math.log(p / (student[s] * p / group_mass[s]))
    student_other = 1.0 - sum(student[s] for s in group_mass)
    if teacher_other > 0:
        total += teacher_other * math.log(teacher_other / student_other)
    return total


def dense_uld(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
              temperature: float = 1.0) -> float:
    """ULD as Boizard et al. / TRL compute it on full distributions: both softmax(logits / T)
    sorted in decreasing order, the shorter padded with zeros, the L1 distance; times T^2."""
    s = sorted(softmax([float(x) / temperature for x in student_logits]), reverse=True)
    t = sorted(softmax([float(x) / temperature for x in teacher_logits]), reverse=True)
    size = max(len(s), len(t))
    s += [0.0] * (size - len(s))
    t += [0.0] * (size - len(t))
    return temperature ** 2 * sum(abs(a - b) for a, b in zip(s, t))


def topk_uld_reference(student_logits: torch.Tensor, teacher_topk_probs: Sequence[float],
                       tail_mass: float, *, temperature: float = 1.0,
                       student_k: int | None = None) -> float:
    """ULD against a stored top-k: the teacher's known probabilities sorted + its tail as one
    bin, the student's k' largest sorted + the rest of its mass as one bin (k' = student_k or
    the number of known teacher probabilities), each tempered bin-wise; sorted ranks padded
    with zeros; L1 over the ranks plus |rest - tail|; times T^2."""
    k = len(teacher_topk_probs)
    k_student = min(k if student_k is None else student_k, len(student_logits))
    student = sorted(softmax([float(x) for x in student_logits]), reverse=True)
    s = temper(student[:k_student] + [sum(student[k_student:])], temperature)
    t = temper(sorted(teacher_topk_probs, reverse=True) + [tail_mass], temperature)
    s_ranks, t_ranks = s[:-1], t[:-1]
    size = max(len(s_ranks), len(t_ranks))
    s_ranks += [0.0] * (size - len(s_ranks))
    t_ranks += [0.0] * (size - len(t_ranks))
    distance = sum(abs(a - b) for a, b in zip(s_ranks, t_ranks)) + abs(s[-1] - t[-1])
    return temperature ** 2 * distance


def chained_kd_reference(student_logits: torch.Tensor, teacher_probs: Mapping[int, float],
                         tail_mass: float, teacher_to_student_first: Sequence[int],
                         t1: int, student_token: int, chain: float, *,
                         temperature: float = 1.0) -> float:
    """mapped_kd_reference with teacher token t1's probability split: `chain` of it on
    `student_token` (a student token spanning t1 and the teacher tokens after it: a pseudo
    teacher id mapped to it), the rest on t1's first piece as usual."""
    pseudo = len(teacher_to_student_first)
    probs = {**teacher_probs, t1: teacher_probs[t1] * (1.0 - chain),
             pseudo: teacher_probs[t1] * chain}
    return mapped_kd_reference(student_logits, probs, tail_mass,
                               [*teacher_to_student_first, student_token],
                               temperature=temperature)


def draws_distribution_reference(ids: Sequence[int], counts: Sequence[int],
                                 logprobs: Sequence[float] | None,
                                 sample_temperature: float) -> dict[int, float]:
    """One position's draws as the teacher's estimated T=1 distribution {id: p}: counts / n
    at sample temperature 1, else counts * p^(1 - 1/tau) (p = exp(logprob)), normalised."""
    weights = [c * (1.0 if sample_temperature == 1.0 else
                    math.exp(lp * (1.0 - 1.0 / sample_temperature)))
               for c, lp in zip(counts, logprobs if logprobs is not None else [0.0] * len(ids))]
    total = sum(weights)
    return {int(i): w / total for i, w in zip(ids, weights)}
