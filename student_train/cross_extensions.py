"""Student tokens coarser than a teacher token: counted in that token's bin (`extension_bins`).

The vocabulary-mapped KL (cross_token_losses.py) gives each top-k teacher token t the
student's probability of t's FIRST student piece: p_S(first[t]). A student token c that
spells MORE than one teacher token ("ĠTheory" where the teacher spells "ĠThe" "ory") is
nobody's first piece, so its probability falls in the "other" bin, whose teacher mass is the
tail: KD pulls every such token towards zero at every position, although the teacher's
P("ĠThe") includes the texts that go on "ory". Read the other way, the student's probability
that the teacher's next token is t is the mass of every student token whose bytes the
teacher spells starting with t (its first teacher piece, from the reverse map
`vocab_map_for(student, teacher)`), first[t] included:

    bin(t) = {first[t]}  +  ext(t),   ext(t) = {c : reverse first piece of c is t, c spans
                                                 more than t (not an exact match)}

and the divergence compares P_T(bin) with the student's summed mass over it. This module
does that without touching the loss kernels: each bin's teacher mass is split over its
student tokens in proportion to the student's own (detached) probabilities,
P(c) = P(bin) q(c) / q(bin). For KL at T = 1 that gives exactly the bin objective's value
and gradient (-sum_c P(c) log q(c) differs from -P(bin) log q(bin) by a constant in q, and
both have gradient q - P at every token); other divergences and T != 1 (the split is made at
T = 1, then each token tempered) are an approximation of it.

* `extension_table`: ext(t) for every teacher id, as CSR arrays (at most `cap` per teacher
  id, lowest student ids first: a BPE's earlier, more frequent merges; the rest stay in
  "other", counted in its summary as `cut_by_cap`).
* `extend_bins`: a row's bins grown by the extensions of its teacher entries. An extension
  that already leads a bin of the row (the first piece of another of its entries, or the
  student token a chain target appends) stays there. Rows conditioned inside a teacher token
  (cross_inside.py) get none: their pieces are already the student's continuations.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from student_train.losses import LOG_ZERO

Tensor = torch.Tensor
EXTENSION_CAP = 64  # student tokens per teacher token (Llama 3 <-> Mistral: "▁t" has thousands)
SCORE_ROWS = 256  # rows per chunk of student logits gathered at the bins' ids
# logits_at computes a row's full logits when its ids are at least 1/DENSE_SHARE of the
# vocabulary: on the bench's CPU a matmul costs ~1 % of a gathered weight element per entry
DENSE_SHARE = 64


def extension_table(forward, reverse,
                    cap: int = EXTENSION_CAP) -> tuple[np.ndarray, np.ndarray, dict]:
    """(offsets int64 [Vt + 1], ids int32 [total], summary): ext(t) of teacher id t (module
    docstring) is ids[offsets[t]:offsets[t + 1]], lowest student ids first, at most `cap`.

    forward: the teacher -> student VocabMap (first pieces of teacher tokens); reverse: the
    student -> teacher VocabMap of the same pair (`vocab_map_for(student, teacher)`).
    """
    if reverse.teacher_vocab_size != forward.student_vocab_size or \
            reverse.student_vocab_size != forward.teacher_vocab_size:
        raise ValueError(f"extension_table: the reverse map must map the forward map's student "
                         f"vocabulary ({forward.student_vocab_size}) onto its teacher's "
                         f"({forward.teacher_vocab_size}), found {reverse.teacher_vocab_size} "
                         f"-> {reverse.student_vocab_size}")
    parent = reverse.teacher_to_student_first.astype(np.int64)  # student id -> teacher id
    student = np.arange(len(parent))
    own_first = forward.teacher_to_student_first[np.maximum(parent, 0)]
    is_ext = (parent >= 0) & ~reverse.exact & (student != own_first)
    c, t = student[is_ext], parent[is_ext]
    order = np.lexsort((c, t))  # by teacher id, then student id
    c, t = c[order], t[order]
    kept = np.arange(len(t)) - np.searchsorted(t, t, side="left") < cap  # place among t's
    counts = np.bincount(t[kept], minlength=forward.teacher_vocab_size)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    summary = {"extended_teacher_tokens": int((counts > 0).sum()),
               "extension_tokens": int(kept.sum()), "cut_by_cap": int((~kept).sum()),
               "cap": int(cap)}
    return offsets, c[kept].astype(np.int32), summary


def _row_items(take: Tensor, teacher_ids: Tensor, offsets: Tensor, flat: Tensor):
    """The extensions of the entries `take` [R, K] marks: (row, entry column, student id),
    each [items], ordered by row (a CSR expansion: no [R, K, cap] buffer)."""
    r, j = take.nonzero(as_tuple=True)
    t = teacher_ids[r, j]
    start, count = offsets[t], offsets[t + 1] - offsets[t]
    which = torch.repeat_interleave(torch.arange(len(t), device=t.device), count)
    within = torch.arange(len(which), device=t.device) - (count.cumsum(0) - count)[which]
    return r[which], j[which], flat[start[which] + within].long()


def extend_bins(group_lp: Tensor, leader: Tensor, student_ids: Tensor, entry_bin: Tensor,
                teacher_ids: Tensor, extensions: tuple[Tensor, Tensor], row_ok: Tensor,
                scores: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """A row's bins grown by its entries' extensions, each bin's mass split by the student.

    group_lp [..., K'] (T = 1 log-mass at leaders), leader [..., K'] bool, student_ids [..., K']
    (the leaders' ids): the bins of cross_token_losses.project_topk_target; entry_bin
    [..., K] long: the leader column of each of the K stored entries, -1 where the entry is
    in no bin; teacher_ids [..., K]: their teacher ids (any where entry_bin is -1);
    extensions: extension_table's (offsets, ids); row_ok [...] bool: rows that take
    extensions; scores(ids [..., M]) -> the student's logits there [..., M] (no gradient).
    Returns (log-mass, valid, student ids), each [..., K' + X]: the leaders' share of their
    bins, then X extension entries (the inputs themselves when no row takes any).
    """
    lead, kp = leader.shape[:-1], leader.shape[-1]
    leader_2d, ids_2d = leader.reshape(-1, kp), student_ids.reshape(-1, kp)
    bins_2d = entry_bin.reshape(-1, entry_bin.shape[-1])
    take = (bins_2d >= 0) & row_ok.reshape(-1, 1)
    row, col, ext = _row_items(take, teacher_ids.reshape(take.shape), *extensions)
    vocab = int(torch.cat([ext, ids_2d.flatten(), ext.new_zeros(1)]).max()) + 1  # a key base
    lead_keys = (torch.arange(len(ids_2d), device=ext.device)[:, None] * vocab + ids_2d)[leader_2d]
    fresh = ~torch.isin(row * vocab + ext, lead_keys)  # not already a bin's token in its row
    row, ext, ext_bin = row[fresh], ext[fresh], bins_2d[row, col][fresh]
    if not len(ext):  # nothing to add: the bins as they were, bit for bit
        return group_lp, leader, student_ids
    per_row = torch.bincount(row, minlength=len(ids_2d))
    place = torch.arange(len(row), device=row.device) - (per_row.cumsum(0) - per_row)[row]
    width = int(per_row.max())
    def placed(values: Tensor) -> Tensor:  # [R, width]: each row's items first, then zeros
        return values.new_zeros(len(ids_2d), width).index_put_((row, place), values)

    has, ext_ids, ext_bins = placed(torch.ones_like(fresh[fresh])), placed(ext), placed(ext_bin)
    ids = torch.cat([torch.where(leader_2d, ids_2d, 0), ext_ids], -1).reshape(*lead, -1)
    member = torch.cat([leader_2d, has], -1).reshape(*lead, -1)
    bin_of = torch.cat([torch.arange(kp, device=ids.device).expand_as(leader_2d), ext_bins],
                       -1).reshape(*lead, -1)
    with torch.no_grad():
        z = torch.where(member, scores(ids).to(group_lp.dtype), LOG_ZERO)
    top = torch.full_like(group_lp, LOG_ZERO).scatter_reduce(-1, bin_of, z, "amax")
    total = torch.zeros_like(group_lp).scatter_add(
        -1, bin_of, torch.where(member, (z - top.gather(-1, bin_of)).exp(), 0.0))
    bin_lse = top + total.clamp_min(1e-30).log()  # [..., K']: log q(bin) + a row constant
    share = z - bin_lse.gather(-1, bin_of)  # log q(c) / q(bin)
    lp = torch.where(member, group_lp.gather(-1, bin_of) + share, LOG_ZERO)
    return lp.clamp_min(LOG_ZERO), member, ids


def logits_at(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor) -> Tensor:
    """[n, M] the head's logits of rows hidden [n, d] at ids [n, M], without gradient,
    SCORE_ROWS rows at a time: the rows' full logits, gathered, when M is a large enough
    share of the vocabulary (a matmul beats gathering M weight rows per row), else the
    weight rows at the ids (no [rows, V] buffer)."""
    dense = ids.shape[-1] * DENSE_SHARE >= weight.shape[0]
    parts = []
    with torch.no_grad():
        for start in range(0, ids.shape[0], SCORE_ROWS):
            h, at = hidden[start:start + SCORE_ROWS], ids[start:start + SCORE_ROWS]
            if dense:
                z = (h.to(weight.dtype) @ weight.T).gather(-1, at)
            else:
                z = torch.einsum("rd,rmd->rm", h.to(weight.dtype), weight[at])  # [r, M, d]
            parts.append(z if bias is None else z + bias[at])
    return torch.cat(parts) if parts else ids.new_zeros(ids.shape, dtype=torch.float32)
