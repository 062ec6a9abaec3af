"""Batches for a student whose tokenizer differs from the store's: the stored samples re-cut.

`CrossCollate` stands in for `collate.collate` in a StoreStream (its `collate_fn`). Per
stored (teacher) sample, in the data path and vectorised with numpy (nothing per step in
Python):
  1. the sample's stored text is tokenized with the student's tokenizer
     (`token_spans.stored_text_tokens`: the student's own BOS/EOS, byte spans of every
     token); a chat sample (stored roles) is rendered by the student's chat template when it
     has one (on the turns `text_spans.stored_messages` rebuilds, as teacher-dump renders
     chats): the student trains on its own turn markers, special and
     zero-width, never aligned (a turn's markup is a target only after target text of its
     own role: the end-of-turn after an answer, never the next user turn's header).
     Without a template, or when the template cannot render those turns, the sample is
     tokenized as plain text (cross_tokenizer.probe_first_segment warns before training);
     the stats count `chat_samples` and `chat_templated` (samples, on every batch). The
     template renders once per turn plus twice per chat sample (about 2 ms for 3 turns,
     9 ms for 20 on this CPU, against 0.4 / 1.6 ms plain): data-path work, like the rest;
  2. student and teacher positions are aligned by byte spans (`token_alignment.align_positions`:
     position j of the student and i of the teacher both predict a token starting at the same
     byte after the same text; every other position is skipped with its reason, never guessed);
  3. a student-side `Sample` is built: the student's ids; its loss mask taken from the stored
     one (`student_loss_mask`); per KD signal the teacher's stored top-k GATHERED at the
     aligned teacher positions (teacher ids, T=1 log-probs: the loss maps or sorts them; a
     sampled signal's draws read as one, student_train/cross_sampled.py); hidden states and
     attention grids (per-sequence pools) unchanged;
  4. `collate.collate` lays the student samples out as for any store, and the batch gets, per
     top-k signal, `kd_mask` [B, S] bool (student position t has a teacher target: aligned and,
     for the vocabulary-mapped loss, no one-sided dummy prefix (below) and a mapped share of
     its top-k mass >= min_mapped_share),
     and `cross_stats` (counts over the batch's trained positions, see `sample_stats`).
An aligned pair where exactly one of the two next tokens carries a prefix space the text lacks
(a SentencePiece dummy "▁" at the text's or a section's start facing a tokenizer without one:
its own bytes, `byte_lengths` from the vocabulary map, are longer than its span) covers the
same text, but the map spells teacher tokens by their own bytes, so its first piece is not the
token the student writes there: for a signal given byte lengths (the pkl loss) the pair gets
no target, counted as `skipped_dummy_prefix/<signal>` (the inside positions after it are
anchored as before and fail the piece check: `skipped_inside_mismatch/<signal>`).
Positions whose next token starts inside a teacher token: for a signal given its map's
decompositions (`piece_maps`, the pkl loss's switch `inside_token_targets`), those whose
student pieces since the teacher token's start agree with the map get the teacher's top-k at
that start conditioned on those pieces (student_train/cross_inside.py): `kd_mask` True, the
top-k gathered from that teacher position, and per entry `inside_ids` [B, S, k] (the student
piece it continues with, -1: none, cross_inside.ENDS_HERE: the entry ends there) under
`inside_mask` [B, S]; the rest stay skipped, counted
per reason and signal (`skipped_inside_<why>/<signal>`); `inside/<signal>` counts the
targets, `inside_topk_mass` / `conditioned_mass` their masses. The global
`skipped_inside_teacher_token` then counts the inside positions that no signal on the store's
own tokenization conditions, `inside_conditioned` the others.
An aligned pair whose student token ends after the teacher's next token (it spans teacher
tokens t1 .. tm; for a signal in `chain_signals`, the pkl loss's switch
`chained_token_targets`) gets the chain of their stored log-probs (student_train/
cross_chain.py): per signal `chain_entry` / `chain_ids` / `chain_logc` [B, S] (-1 / -1 / 0
where none) for the loss to split t1's entry, `chained/<signal>` counting them and
`chain_skipped_<why>/<signal>` the pairs without a readable chain: skipped (`kd_mask`
False; `skip_unchained`, the switch `skip_unchained_pairs`) or else keeping the plain
target, which gives the student's own next token no mass.
A signal on another tokenization of the store (format 2.2: a second teacher with its own
tokenizer) is aligned by THAT tokenization's spans, with its own vocabulary map; student
positions past the bytes that tokenization covers (a sample it cut at its max length) have
no target from it and are counted as `uncovered/<signal>`, not as skipped. Per signal the
stats hold `aligned/<signal>` and `uncovered/<signal>` (finish_stats: their shares).
Positions without a teacher target hold a harmless uniform top-k (ids 0..k-1) so every loss
stays finite before `kd_mask` removes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from logitstore.sample import Sample, SignalData, TopK
from logitstore.tokenized import loss_mask_by_bytes
from logitstore.toolkit.token_alignment import (PositionAlignment, SkipReason, align_positions,
                                                inside_anchors)
from logitstore.toolkit.token_spans import Tokenization, stored_text_tokens
from student_train.collate import collate
from student_train.cross_chain import ChainTargets, chain_targets
from student_train.cross_inside import INSIDE_REASONS, InsideTargets, condition_inside
from student_train.cross_sampled import draws_as_topk

STAT_PREFIX = "cross/"
REASONS = [r.name.lower() for r in SkipReason if r != SkipReason.ALIGNED]


@dataclass
class StudentSample:
    """One stored sample re-cut for the student, with its per-signal KD masks and counts."""

    sample: Sample
    kd_mask: dict[str, np.ndarray]  # signal -> [Ls] bool
    stats: dict[str, float]
    # signal -> (inside_ids [Ls, k] int64, inside_mask [Ls] bool): conditioned targets
    inside: dict[str, tuple[np.ndarray, np.ndarray]]
    # signal -> (chain_entry [Ls] int64, chain_ids [Ls] int64, chain_logc [Ls] float32)
    chain: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


def student_loss_mask(teacher: Sample, student_spans: np.ndarray,
                      student_roles: np.ndarray) -> np.ndarray:
    """[Ls] bool: a student token is a target when the teacher text token holding its
    first byte (a zero-width token: the byte before it; the student's template markup: of
    the same turn's role) is one (tokenized.loss_mask_by_bytes)."""
    return loss_mask_by_bytes(teacher.text_spans, teacher.loss_mask, student_spans,
                              student_roles)


def student_tokens(tokenizer, teacher: Sample) -> tuple[Tokenization, dict[str, float]]:
    """(the student's tokenization of a stored sample's text, its chat counts): a chat sample
    rendered by the student's chat template where it can be (module docstring, step 1)."""
    whole, chat, why_plain = stored_text_tokens(tokenizer, teacher.text_spans,
                                                teacher.sample_id)
    # the same keys for every sample: ranks reduce the summed stats key by key
    return whole, {"chat_samples": float(chat), "chat_templated": float(chat and not why_plain)}


def cut_to_teacher(tok, teacher_text) -> tuple[np.ndarray, ...]:
    """(ids, spans, special, role) of the student's tokenization, without the tokens that start
    after the teacher's last text byte when the teacher's tokens stop before the end of the
    text (a teacher cut at its max length): the student never trains on text the teacher
    did not see."""
    t = teacher_text
    text = ~t.special & (t.spans[:, 1] > t.spans[:, 0])
    seen = int(t.spans[text, 1].max()) if text.any() else 0
    if seen >= len(t.text.encode("utf-8")):
        return tok.ids, tok.spans, tok.special, tok.role
    n = int((tok.spans[:, 0] < seen).sum())  # starts never decrease: a prefix
    return tok.ids[:n], tok.spans[:n], tok.special[:n], tok.role[:n]


def _gathered_topk(topk: TopK, teacher_pos: np.ndarray, student_pos: np.ndarray,
                   length: int) -> TopK:
    """The teacher's top-k at the aligned teacher positions, placed at the student ones;
    a uniform distribution over ids 0..k-1 elsewhere."""
    k = topk.ids.shape[1]
    ids = np.broadcast_to(np.arange(k, dtype=np.int64), (length, k)).copy()
    logprobs = np.full((length, k), -np.log(k), np.float32)
    tail = np.full(length, -1e4, np.float32)  # the uniform filler holds all the mass
    ids[student_pos] = topk.ids[teacher_pos]
    logprobs[student_pos] = topk.logprobs[teacher_pos]
    tail[student_pos] = topk.tail()[teacher_pos]
    return TopK(ids, logprobs, tail)


def mapped_share(ids: np.ndarray, logprobs: np.ndarray,
                 first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mapped mass [A], stored mass [A]) of top-k rows through a teacher->student first-piece
    map (ids outside the map count as unmapped), in float64."""
    p = np.exp(logprobs.astype(np.float64))
    inside = (ids >= 0) & (ids < len(first))
    mapped = inside & (first[np.where(inside, ids, 0)] >= 0)
    return (p * mapped).sum(-1), p.sum(-1)


def dummy_prefix_pairs(a: PositionAlignment, teacher_ids: np.ndarray, student_ids: np.ndarray,
                       teacher_byte_lengths: np.ndarray,
                       student_byte_lengths: np.ndarray) -> np.ndarray:
    """[A] bool: the aligned pairs where exactly one of the two next tokens carries a prefix
    space the text lacks (a dummy prefix: its own bytes, per `*_byte_lengths` [V] by id, are
    longer than its span; ids outside them count as 0 bytes). The map spells the teacher's
    token by its own bytes, so there its first piece is not the token the student writes."""
    def prefixed(lengths, token_ids, span_bytes):
        token_ids = np.asarray(token_ids, np.int64)
        known = (token_ids >= 0) & (token_ids < len(lengths))
        own = np.where(known, np.asarray(lengths)[np.where(known, token_ids, 0)], 0)
        return own > span_bytes

    return prefixed(teacher_byte_lengths, np.asarray(teacher_ids)[a.teacher_pos + 1],
                    a.teacher_next_bytes) != \
        prefixed(student_byte_lengths, np.asarray(student_ids)[a.student_pos + 1],
                 a.student_next_bytes)


def _inside_stats(name: str, cond: InsideTargets, trained: np.ndarray) -> dict[str, float]:
    """Counts and masses of one signal's inside positions, over the trained ones."""
    counted = trained[cond.student_pos]
    out = {f"inside/{name}": float(counted.sum()),
           f"inside_topk_mass/{name}": float(cond.topk_mass[counted].sum()),
           f"conditioned_mass/{name}": float(cond.conditioned_mass[counted].sum())}
    out.update({f"skipped_{why}/{name}": float(trained[cond.skipped[why]].sum())
                for why in INSIDE_REASONS})
    return out


def _inside_arrays(cond: InsideTargets, length: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(inside_ids [length, k] int64, -1 where no piece, ENDS_HERE where the entry ends
    there; inside_mask [length] bool)."""
    piece = np.full((length, k), -1, np.int64)
    piece[cond.student_pos] = cond.piece_ids
    mask = np.zeros(length, bool)
    mask[cond.student_pos] = True
    return piece, mask


def _chain_arrays(chain: ChainTargets, a: PositionAlignment, ids: np.ndarray,
                  length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chain_entry [length] int64, -1 where none; chain_ids [length]: the student's next
    token there; chain_logc [length] float32)."""
    entry, cid = np.full(length, -1, np.int64), np.full(length, -1, np.int64)
    log_c = np.zeros(length, np.float32)
    pos = a.student_pos[chain.pair]
    entry[pos], cid[pos], log_c[pos] = chain.entry, ids[pos + 1], chain.log_c
    return entry, cid, log_c


class CrossCollate:
    """collate_fn of a StoreStream for a foreign-tokenizer student (module docstring).

    tokenizer: the student's (fast) tokenizer; topk_signals: the signals whose top-k is a KD
    target; first_maps: signal -> teacher_to_student_first [Vt] for the vocabulary-mapped
    loss (absent: ULD, no share threshold); min_mapped_share: see `kd_mask`;
    piece_maps: signal -> (piece_offsets [Vt + 1], piece_ids) of its vocabulary map, for the
    signals whose inside-token positions get conditioned targets (absent: skipped);
    byte_lengths: signal -> (teacher_byte_lengths [Vt], student_byte_lengths [Vs]) of its
    vocabulary map, for the signals whose aligned pairs with a one-sided dummy prefix are
    skipped (`dummy_prefix_pairs`; absent: kept; ULD, which compares sorted probabilities
    rather than ids, passes none); chain_signals: the signals whose aligned pairs with a
    coarser student token get a chain (student_train/cross_chain.py; absent: the plain
    mapped target); skip_unchained: those pairs' chain cannot be read -> no target there
    (else the plain one); draw_signals: signal -> (n_draws, sample temperature) of the
    topk_signals whose target is their sampled draws (cross_sampled.draws_as_topk).
    Picklable (DataLoader workers get a copy).
    """

    def __init__(self, tokenizer, topk_signals: list[str], first_maps: dict[str, np.ndarray],
                 min_mapped_share: float, tokenizations: dict[str, str | None] | None = None,
                 piece_maps: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 byte_lengths: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 chain_signals: list[str] | None = None,
                 draw_signals: dict[str, tuple[int, float]] | None = None,
                 skip_unchained: bool = False):
        self.tokenizer = tokenizer
        self.topk_signals = list(topk_signals)
        self.first_maps = {k: np.asarray(v) for k, v in first_maps.items()}
        self.piece_maps = {k: (np.asarray(o, np.int64), np.asarray(p, np.int64))
                           for k, (o, p) in (piece_maps or {}).items()}
        self.byte_lengths = {k: (np.asarray(t, np.int32), np.asarray(s, np.int32))
                             for k, (t, s) in (byte_lengths or {}).items()}
        self.chain_signals = set(chain_signals or ())
        self.draw_signals = dict(draw_signals or {})
        self.skip_unchained = bool(skip_unchained)
        self.min_mapped_share = float(min_mapped_share)
        # signal -> the store tokenization its positions index (None: the store's own)
        self.tokenizations = dict(tokenizations or {})

    @staticmethod
    def _teacher_side(teacher: Sample, tokenization: str | None):
        """(spans, special, covered bytes, ids) of the teacher tokens a signal's positions
        index."""
        if tokenization is None:
            t = teacher.text_spans
            return t.spans, t.special, len(t.text.encode("utf-8")), teacher.input_ids
        cut = teacher.tokenizations[tokenization]
        return cut.spans, cut.special, cut.covered_bytes, cut.input_ids

    def student_sample(self, teacher: Sample) -> StudentSample:
        t = teacher.text_spans
        whole, chat = student_tokens(self.tokenizer, teacher)
        ids, spans, special, roles = cut_to_teacher(whole, t)
        align = align_positions(t.spans, t.special, spans, special)
        loss_mask = student_loss_mask(teacher, spans, roles)
        trained = loss_mask[1:]  # [Ls-1]: position j trains on token j+1
        stats = {"positions": float(trained.sum()),
                 "aligned": float(trained[align.student_pos].sum()), **chat}
        counts = np.bincount(align.student_reason[trained], minlength=len(SkipReason))
        stats.update({f"skipped_{r.name.lower()}": float(counts[r]) for r in SkipReason
                      if r != SkipReason.ALIGNED})
        signals, kd_mask, inside, chain, aligned = {}, {}, {}, {}, {None: align}
        conditioned_here = np.zeros(len(ids), bool)  # by a signal on the store's tokenization
        for name, data in teacher.signals.items():
            topk, stored = None, self._stored_target(name, data)
            if stored is not None:
                tokenization = self.tokenizations.get(name)
                side = self._teacher_side(teacher, tokenization)
                if tokenization not in aligned:
                    aligned[tokenization] = align_positions(side[0], side[1], spans, special)
                topk, kd_mask[name], cond = self._signal_target(
                    name, stored, side, aligned[tokenization], ids, spans, special, trained,
                    stats, inside, chain)
                if cond is not None and tokenization is None:
                    conditioned_here[cond.student_pos] = True
            signals[name] = SignalData(topk=topk, hidden=data.hidden, attention=data.attention)
        if self.piece_maps:  # inside positions with a target are not skipped ones
            done = float((conditioned_here[:-1] & trained).sum())
            stats["inside_conditioned"] = done
            stats["skipped_inside_teacher_token"] -= done
        sample = Sample(sample_id=teacher.sample_id, input_ids=ids, loss_mask=loss_mask,
                        source=teacher.source, split=teacher.split, tags=teacher.tags,
                        signals=signals)
        return StudentSample(sample, kd_mask, stats, inside, chain)

    def _stored_target(self, name: str, data: SignalData) -> TopK | None:
        """A KD signal's stored top-k, or its draws read as one; None: not a KD target."""
        if name not in self.topk_signals:
            return None
        if name in self.draw_signals:
            return None if data.sampled is None else draws_as_topk(data.sampled,
                                                                   *self.draw_signals[name])
        return data.topk

    def _signal_target(self, name: str, topk: TopK, side: tuple, a: PositionAlignment,
                       ids: np.ndarray, spans: np.ndarray, special: np.ndarray,
                       trained: np.ndarray, stats: dict[str, float], inside: dict,
                       chain: dict) -> tuple[TopK, np.ndarray, InsideTargets | None]:
        """(gathered top-k, kd_mask [Ls], inside targets or None) of one top-k signal whose
        teacher side (`_teacher_side`) `a` aligns with the student's tokens; adds the signal's
        counts to `stats`, its inside arrays to `inside` and its chain arrays to `chain`."""
        t_spans, t_special, covered, t_ids = side
        length = len(ids)
        uncovered = np.append(spans[1:, 0] >= covered, False)  # next token past them
        stats[f"aligned/{name}"] = float(trained[a.student_pos].sum())
        stats[f"uncovered/{name}"] = float((uncovered[:-1] & trained).sum())
        t_pos, s_pos = a.teacher_pos, a.student_pos
        if name in self.byte_lengths:
            dummy = dummy_prefix_pairs(a, t_ids, ids, *self.byte_lengths[name])
            stats[f"skipped_dummy_prefix/{name}"] = float(trained[s_pos[dummy]].sum())
            t_pos, s_pos = t_pos[~dummy], s_pos[~dummy]
        cond = None
        if name in self.piece_maps:  # anchored on the whole alignment, skipped pairs included
            anchors = inside_anchors(a, t_spans, t_special, spans, special)
            cond = condition_inside(anchors, t_ids, ids, topk.ids, topk.logprobs,
                                    *self.piece_maps[name], self.min_mapped_share)
            stats.update(_inside_stats(name, cond, trained))
            inside[name] = _inside_arrays(cond, length, topk.ids.shape[1])
        gathered = _gathered_topk(
            topk, t_pos if cond is None else np.concatenate([t_pos, cond.teacher_pos]),
            s_pos if cond is None else np.concatenate([s_pos, cond.student_pos]), length)
        mask = np.zeros(length, bool)
        mask[s_pos] = True
        if name in self.first_maps:
            stats.update(self._share_stats(name, gathered, s_pos, trained, mask))
        if name in self.chain_signals:  # on the pairs that keep their target
            chained = chain_targets(a, t_spans, t_special, t_ids, topk.ids, topk.logprobs)
            chained = chained.kept(mask[a.student_pos])
            chain[name] = _chain_arrays(chained, a, ids, length)
            stats[f"chained/{name}"] = float(trained[a.student_pos[chained.pair]].sum())
            stats.update({f"chain_skipped_{why}/{name}": float(trained[a.student_pos[p]].sum())
                          for why, p in chained.skipped.items()})
            if self.skip_unchained:
                for pairs in chained.skipped.values():
                    mask[a.student_pos[pairs]] = False
        if cond is not None:
            mask[cond.student_pos] = True
        stats[f"kd_positions/{name}"] = float((mask[:-1] & trained).sum())
        return gathered, mask, cond

    def _share_stats(self, name: str, topk: TopK, aligned: np.ndarray, trained: np.ndarray,
                     mask: np.ndarray) -> dict[str, float]:
        """Clears `mask` where the mapped share is under the threshold; the counts and masses
        (over trained aligned positions) for metrics."""
        mapped, total = mapped_share(topk.ids[aligned], topk.logprobs[aligned],
                                     self.first_maps[name])
        share = np.where(total > 0, mapped / np.where(total > 0, total, 1.0), 0.0)
        low = share < self.min_mapped_share
        mask[aligned[low]] = False
        counted = trained[aligned]
        return {f"skipped_low_mapped_share/{name}": float((low & counted).sum()),
                f"topk_mass/{name}": float(total[counted].sum()),
                f"mapped_mass/{name}": float(mapped[counted].sum())}

    def __call__(self, rows: list[list[Sample]], weights: list[list[float]], signals: list[str],
                 *, packing: bool) -> dict[str, Any]:
        converted = [[self.student_sample(s) for s in row] for row in rows]
        batch = collate([[c.sample for c in row] for row in converted], weights, signals,
                        packing=packing)
        B, S = batch["input_ids"].shape
        placed = placements(converted)
        for name in self.topk_signals:
            if name not in batch["signals"]:
                continue
            mask = np.zeros((B, S), bool)
            for b, at, c in placed:
                mask[b, at] = c.kd_mask[name]
            batch["signals"][name]["kd_mask"] = torch.from_numpy(mask)
            if name in self.piece_maps:
                batch["signals"][name].update(_laid_out_inside(placed, name, B, S))
            if name in self.chain_signals:
                batch["signals"][name].update(_laid_out_chain(placed, name, B, S))
        totals: dict[str, float] = {}
        for _, _, c in placed:
            for key, value in c.stats.items():
                totals[STAT_PREFIX + key] = totals.get(STAT_PREFIX + key, 0.0) + value
        batch["cross_stats"] = totals
        return batch


def placements(rows: list[list[StudentSample]]) -> list[tuple[int, slice, StudentSample]]:
    """(batch row, its positions, sample) of each sample, as `collate` lays them out: a row's
    samples one after the other from position 0 (one per row without packing)."""
    out = []
    for b, row in enumerate(rows):
        start = 0
        for c in row:
            out.append((b, slice(start, start + len(c.sample)), c))
            start += len(c.sample)
    return out


def _laid_out_inside(placed: list, name: str, B: int, S: int) -> dict[str, torch.Tensor]:
    """The samples' inside arrays of one signal placed like kd_mask: inside_ids [B, S, k],
    inside_mask [B, S]."""
    k = next(c.inside[name][0].shape[1] for _, _, c in placed)
    ids, mask = np.full((B, S, k), -1, np.int64), np.zeros((B, S), bool)
    for b, at, c in placed:
        ids[b, at], mask[b, at] = c.inside[name]
    return {"inside_ids": torch.from_numpy(ids), "inside_mask": torch.from_numpy(mask)}


def _laid_out_chain(placed: list, name: str, B: int, S: int) -> dict[str, torch.Tensor]:
    """The samples' chain arrays of one signal placed like kd_mask, each [B, S]."""
    entry, ids = np.full((B, S), -1, np.int64), np.full((B, S), -1, np.int64)
    log_c = np.zeros((B, S), np.float32)
    for b, at, c in placed:
        entry[b, at], ids[b, at], log_c[b, at] = c.chain[name]
    return {"chain_entry": torch.from_numpy(entry), "chain_ids": torch.from_numpy(ids),
            "chain_logc": torch.from_numpy(log_c)}


def finish_stats(stats: dict[str, float]) -> dict[str, float]:
    """Adds the ratios of summed counts: the share of trained positions aligned, and per
    signal the map's coverage (mapped / stored top-k mass at the aligned positions) and the
    conditioned coverage (conditioned / stored top-k mass at the inside targets)."""
    out = dict(stats)
    positions = stats.get(STAT_PREFIX + "positions")
    if positions:
        out[STAT_PREFIX + "aligned_share"] = stats[STAT_PREFIX + "aligned"] / positions
        for key, value in stats.items():  # per signal: aligned share and byte coverage
            if key.startswith(STAT_PREFIX + "aligned/"):
                name = key[len(STAT_PREFIX + "aligned/"):]
                out[STAT_PREFIX + f"aligned_share/{name}"] = value / positions
                out[STAT_PREFIX + f"coverage/{name}"] = \
                    1.0 - stats.get(STAT_PREFIX + f"uncovered/{name}", 0.0) / positions
    for key, total in stats.items():
        if key.startswith(STAT_PREFIX + "inside_topk_mass/") and total > 0:
            name = key[len(STAT_PREFIX + "inside_topk_mass/"):]
            out[STAT_PREFIX + f"conditioned_coverage/{name}"] = \
                stats[STAT_PREFIX + f"conditioned_mass/{name}"] / total
        if key.startswith(STAT_PREFIX + "topk_mass/") and total > 0:
            name = key[len(STAT_PREFIX + "topk_mass/"):]
            out[STAT_PREFIX + f"map_coverage/{name}"] = \
                stats[STAT_PREFIX + f"mapped_mass/{name}"] / total
    return out
