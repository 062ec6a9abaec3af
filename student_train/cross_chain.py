"""Teacher targets for a student token that spans several teacher tokens, from the stored top-k.

At an aligned pair (token_alignment: both next tokens start at byte b0) the student's next
token s* may end after the teacher's next token t1: the student spells in one token ("coarser")
what the teacher spells t1 t2 .. tm. The vocabulary map sends t1 to its student first piece, a
token other than s*, so the plain mapped target gives s* no mass and the KD term pulls against
the student's own label. The teacher's probability of s*'s bytes along its own tokenization is
the chain
    P(t1) * C,    C = P(t2 | .. t1) * ... * P(tm | .. t(m-1)),
and every factor is in the store: tj is the teacher's actual next token at teacher position
i + j - 1, whose T=1 log-prob sits in that position's stored top-k when the teacher ranked tj
there. The target then splits t1's entry (cross_token_losses.project_topk_target `chain_*`):
P(t1) C goes to s*, P(t1) (1 - C) stays on t1's first piece (the teacher continuing t1 some
other way). It is exact up to other teacher tokenizations of s*'s bytes (not stored; the
teacher was run on its own). Pairs where the chain cannot be read are counted
(`chain_skipped_<reason>/<signal>` in cross_batch's stats) and get no KD target
(`skip_unchained_pairs`, the default; off: the plain mapped target, which gives s* no mass):
* `unended`: s* ends inside a teacher token, or a special / zero-width token or a gap
  sits among t1 .. tm;
* `unranked`: t1 is not in the top-k at i, or some tj is not in its position's top-k.
All vectorised numpy over the sample's pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitstore.toolkit.token_alignment import PositionAlignment

CHAIN_REASONS = ("unended", "unranked")


@dataclass(frozen=True)
class ChainTargets:
    """The coarser pairs of one sample that get a chain, and why the others do not.

    Pair `pair[m]` (an index into the alignment's pairs) splits top-k column `entry[m]` (t1)
    at its teacher position: exp(log_c[m]) of that entry's mass goes to the student's next
    token. `skipped[reason]`: pair indexes (CHAIN_REASONS).
    """

    pair: np.ndarray  # int64 [M]
    entry: np.ndarray  # int64 [M]
    log_c: np.ndarray  # float32 [M], <= 0
    skipped: dict[str, np.ndarray]

    def kept(self, pair_keeps: np.ndarray) -> "ChainTargets":
        """Only the pairs whose `pair_keeps` [A] is True (those with a target at all)."""
        return ChainTargets(self.pair[pair_keeps[self.pair]], self.entry[pair_keeps[self.pair]],
                            self.log_c[pair_keeps[self.pair]],
                            {why: p[pair_keeps[p]] for why, p in self.skipped.items()})


def actual_logprobs(teacher_ids: np.ndarray, topk_ids: np.ndarray,
                    topk_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(column [Tt-1] int64, log-prob [Tt-1] float64) of each teacher position's actual next
    token in its stored top-k; column -1 and log-prob NaN where it is not there."""
    nxt = np.asarray(teacher_ids, np.int64)[1:]
    ids = np.asarray(topk_ids)[:len(nxt)].astype(np.int64)
    lp = np.asarray(topk_logprobs)[:len(nxt)].astype(np.float64)
    hit = (ids == nxt[:, None]) & np.isfinite(lp)  # [Tt-1, k]
    found = hit.any(-1)
    column = np.where(found, hit.argmax(-1), -1)
    value = np.where(found, lp[np.arange(len(nxt)), np.maximum(column, 0)], np.nan)
    return column.astype(np.int64), value


def _joined(spans: np.ndarray, special: np.ndarray) -> np.ndarray:
    """[Tt] bool: token x is clean text starting where clean text token x - 1 ends."""
    text = ~special & (spans[:, 1] > spans[:, 0])
    out = np.zeros(len(spans), bool)
    out[1:] = text[1:] & text[:-1] & (spans[1:, 0] == spans[:-1, 1])
    return out


def chain_targets(a: PositionAlignment, teacher_spans: np.ndarray, teacher_special: np.ndarray,
                  teacher_ids: np.ndarray, topk_ids: np.ndarray,
                  topk_logprobs: np.ndarray) -> ChainTargets:
    """The chains (module docstring) of one sample's coarser aligned pairs.

    teacher_spans [Tt, 2] / teacher_special [Tt] / teacher_ids [Tt]: the tokenization `a`
    aligned; topk_ids / topk_logprobs [Tt, k]: the signal's stored top-k (position i predicts
    token i + 1; T=1 log-probs, padding id < 0 or -inf).
    """
    spans = np.asarray(teacher_spans, np.int64)
    special = np.asarray(teacher_special, bool)
    pair = np.flatnonzero(a.student_next_bytes > a.teacher_next_bytes)
    i = a.teacher_pos[pair]
    end = spans[i + 1, 0] + a.student_next_bytes[pair]  # where the student's token ends
    # the last teacher token of the chain: the first whose end reaches the student's end
    # (span ends never decrease in a tokenization that tiles its text; a check below)
    q = np.minimum(np.searchsorted(spans[:, 1], end, side="left"), len(spans) - 1)
    breaks = np.cumsum(~_joined(spans, special))  # breaks[q] - breaks[i + 1]: gaps in t2..tm
    # ... and the last of the tokens with that span (a normaliser can give several one span)
    after = np.minimum(q + 1, len(spans) - 1)
    last = (q + 1 == len(spans)) | (spans[after, 0] >= end)
    ended = (spans[q, 1] == end) & (q > i + 1) & (breaks[q] - breaks[i + 1] == 0) & last
    column, value = actual_logprobs(teacher_ids, topk_ids, topk_logprobs)
    missing = np.concatenate([[0], np.cumsum(column < 0)])  # over positions 0 .. p-1
    total = np.concatenate([[0.0], np.cumsum(np.nan_to_num(value, nan=0.0))])
    # positions i+1 .. q-1 predict t2 .. tm; position i predicts t1 (its column is the entry)
    ranked = ended & (column[i] >= 0) & (missing[q] - missing[np.minimum(i + 1, q)] == 0)
    keep = ended & ranked
    log_c = np.minimum(total[q] - total[np.minimum(i + 1, q)], 0.0)
    return ChainTargets(pair=pair[keep], entry=column[i][keep],
                        log_c=log_c[keep].astype(np.float32),
                        skipped={"unended": pair[~ended], "unranked": pair[ended & ~ranked]})
