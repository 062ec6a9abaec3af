"""Teacher targets for student positions inside a teacher token, from the stored top-k.

A student with a finer tokenizer predicts tokens that start strictly inside a teacher token t
(`token_alignment.SkipReason.INSIDE_TEACHER_TOKEN`): no teacher position predicts them. The
teacher's prediction at t's start (byte b0) still says what comes next, conditioned on the
bytes the student has emitted since b0. With the vocabulary map's decompositions
(`vocab_map.VocabMap.pieces`: the student's tokenization of each teacher token's bytes):

* anchors (`token_alignment.inside_anchors`): the student's tokens since b0 are contiguous
  text starting at b0, after a student position aligned with the teacher position that
  predicts t; else the position stays skipped (`inside_unanchored`);
* the student's in-context pieces a_1..a_d since b0 AND its next token must be the first d + 1
  pieces of t's decomposition (so the student's own tokenization agrees with the map's there
  and its CE target lies in the KD target's support); else `inside_mismatch`;
* each valid top-k entry t' at the teacher position before b0 whose first d pieces are
  a_1..a_d and that has more than d pieces CONTRIBUTES its probability to student piece
  pieces(t')[d] (the one after a_1..a_d); t itself need not be in the top-k;
* the target is the contributing mass per student piece (the loss merges entries of one
  piece: cross_token_losses.project_topk_target with `conditioned_ids`), normalised over
  C + E with E's mass as its "other" bin (`inside_other_bin`, the default; last item) or,
  without it, renormalised over the contributing mass C alone; C = 0 (nothing survives the
  conditioning) -> `inside_no_mass`;
* the share C / (C + E + tail) must reach `min_share`, else `inside_low_share`. E is the mass
  of entries whose pieces are exactly a_1..a_d (their continuation is the NEXT teacher
  token's, not known here), the tail the stored top-k's missing mass (not known one by one,
  so all of it counts). C and E make up the piece-consistent set: the stored entries whose
  pieces start with a_1..a_d. Entries outside it are in neither the target nor the share,
  even where their bytes agree with the bytes so far: a strict prefix of a_1..a_d (the
  teacher would end its token inside the student's pieces), or the same bytes split into
  other pieces. So the renormalised target is the teacher's distribution over the
  piece-consistent set (plus the part of the tail in it) with E and that tail part left out;
  it differs from the teacher's conditional on that set by at most 1 - share in total
  variation: the threshold bounds its error there, not against the conditional on the bytes
  so far. With the "other" bin only the tail part is left out, so the share, which still
  counts E as lost, is stricter than that bound needs; counting E as kept (more targets,
  each mostly "other") made students C of teacher B and of both teachers worse
  (bench/results/xtok_ends_kept.*), so the stricter share stays.
* E's entries are marked ENDS_HERE in `piece_ids`: with `inside_other_bin` the loss keeps
  their mass as the target's "other" bin (the student's mass outside the pieces), so the
  target is the stored piece-consistent distribution with E lumped instead of left out; the
  renormalisation over C alone overstates every continuation by (C + E) / C. E's own
  continuation may start with one of the pieces (a next teacher token ".", say), which that
  bin then misses: a lower bound there, not an overstatement.
All work is vectorised numpy over the inside positions (a loop over piece depth only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitstore.toolkit.token_alignment import InsideAnchors

INSIDE_REASONS = ("inside_unanchored", "inside_mismatch", "inside_no_mass", "inside_low_share")
# piece id of an entry in E (its pieces end where the student stands): -1 contributes nothing,
# ENDS_HERE lets the loss keep E's mass in an "other" bin (project_topk_target's
# `ends_in_other`) instead of renormalising it away
ENDS_HERE = -2


@dataclass(frozen=True)
class InsideTargets:
    """Conditioned teacher targets of one sample's inside positions, and why the rest have none.

    `student_pos[m]` gets the stored top-k of teacher position `teacher_pos[m]`, each entry
    continuing with student piece `piece_ids[m, e]` (-1: the entry does not contribute;
    ENDS_HERE: it is in E).
    `skipped[reason]`: the student positions skipped for that reason (INSIDE_REASONS).
    """

    student_pos: np.ndarray  # int64 [M]
    teacher_pos: np.ndarray  # int64 [M]
    piece_ids: np.ndarray  # int64 [M, k]
    topk_mass: np.ndarray  # float64 [M]: stored top-k mass at teacher_pos
    conditioned_mass: np.ndarray  # float64 [M]: the contributing mass C
    skipped: dict[str, np.ndarray]


def _matching_prefix(tokens: np.ndarray, n: np.ndarray, first_piece: np.ndarray,
                     student_ids: np.ndarray, offsets: np.ndarray, pieces: np.ndarray):
    """(match, start, count), shaped like `tokens` ([M] or [M, k]; n, first_piece broadcast):
    match = the token's decomposition has at least n pieces and its first n are the student's
    tokens first_piece .. first_piece + n - 1; start, count: where its pieces sit."""
    inside = (tokens >= 0) & (tokens < len(offsets) - 1)
    safe = np.where(inside, tokens, 0)
    start = offsets[safe]
    count = offsets[safe + 1] - start
    n = np.broadcast_to(n, tokens.shape)
    match = inside & (count >= n)
    for d in range(int(n.max()) if n.size else 0):
        check = match & (d < n)
        piece = pieces[np.where(check, start + d, 0)]
        student = student_ids[np.where(check, first_piece + d, 0)]
        match &= ~check | (piece == student)
    return match, start, count


def condition_inside(anchors: InsideAnchors, teacher_ids: np.ndarray, student_ids: np.ndarray,
                     topk_ids: np.ndarray, topk_logprobs: np.ndarray, piece_offsets: np.ndarray,
                     piece_ids: np.ndarray, min_share: float) -> InsideTargets:
    """The conditioned targets (module docstring) of one sample.

    teacher_ids [Tt], student_ids [Ts]: the two tokenizations' ids; topk_ids / topk_logprobs
    [Tt, k]: the signal's stored top-k (teacher position i predicts teacher token i + 1, T=1
    log-probs, padding id < 0 or -inf); piece_offsets [Vt + 1] / piece_ids: the map's
    decompositions of teacher tokens into student tokens.
    """
    pos, u, v, depth = anchors.student_pos, anchors.teacher_token, anchors.first_piece, \
        anchors.depth
    student_ids = np.asarray(student_ids).astype(np.int64, copy=False)
    # the teacher's own token: pieces since b0 and the next token are its first depth + 1
    agrees, _, _ = _matching_prefix(np.asarray(teacher_ids)[u].astype(np.int64), depth + 1, v,
                                    student_ids, piece_offsets, piece_ids)
    pos, u, v, depth, mismatch = pos[agrees], u[agrees], v[agrees], depth[agrees], pos[~agrees]
    t_pos = u - 1
    ids = topk_ids[t_pos].astype(np.int64)  # [M, k]
    lp = topk_logprobs[t_pos].astype(np.float64)
    valid = (ids >= 0) & np.isfinite(lp)
    p = np.where(valid, np.exp(np.where(valid, lp, 0.0)), 0.0)
    consistent, start, count = _matching_prefix(np.where(valid, ids, -1), depth[:, None],
                                                v[:, None], student_ids, piece_offsets,
                                                piece_ids)
    contributes = consistent & (count > depth[:, None])
    ends_here = consistent & (count == depth[:, None])
    piece = np.where(contributes, piece_ids[np.where(contributes, start + depth[:, None], 0)],
                     np.where(ends_here, ENDS_HERE, -1))
    stored = p.sum(-1)
    conditioned = (p * contributes).sum(-1)
    rest = (p * ends_here).sum(-1) + np.maximum(1.0 - stored, 0.0)
    share = np.where(conditioned > 0, conditioned / np.maximum(conditioned + rest, 1e-300), 0.0)
    empty, low = conditioned <= 0, (conditioned > 0) & (share < min_share)
    keep = ~empty & ~low
    return InsideTargets(
        student_pos=pos[keep], teacher_pos=t_pos[keep], piece_ids=piece[keep].astype(np.int64),
        topk_mass=stored[keep], conditioned_mass=conditioned[keep],
        skipped={"inside_unanchored": anchors.unanchored, "inside_mismatch": mismatch,
                 "inside_no_mass": pos[empty], "inside_low_share": pos[low]})
