"""Training a student whose tokenizer differs from the store's (issue 15): setup and ULD term.

`cross_setup` runs once, when the sources are opened, for a store whose tokenizer fingerprint
is not the student's:
* refusals that stay: a store without sample text and token spans (written before format 2.1,
  or dumped without text): nothing to re-tokenize; a sampled signal drawn at a temperature
  other than 1 and stored without log-probs (its draws estimate no T=1 distribution); an
  eval_store cut by another teacher tokenizer than the store;
* a signal whose KD target is its sampled draws (teacher-dump's default capture) enters the
  losses below as the top-k its draws estimate (student_train/cross_sampled.py);
* `cross_loss: pkl` (default): the teacher's tokenizer is loaded from the files the store keeps
  and the teacher -> student vocabulary map (`vocab_map.vocab_map_for`) is built once per
  tokenizer pair and cached under `cache_dir/vocab_maps` (else the user cache,
  `vocab_map.default_cache_dir()`: $LOGITSTORE_CACHE/vocab_maps or
  $XDG_CACHE_HOME/logitstore/vocab_maps);
  the objective projects the stored top-k through it (`cross_token_losses.project_topk_target`,
  an ordinary SparseTarget, so the fused lm_head path computes it like any top-k target);
  with `inside_token_targets` (default) the map's decompositions also give the positions
  inside a teacher token a conditioned target (student_train/cross_inside.py), and with
  `chained_token_targets` (default) an aligned student token spanning several teacher tokens
  gets their chained probability (student_train/cross_chain.py), and one whose chain cannot
  be read is skipped (`skip_unchained_pairs`, default; else the plain target); the map's
  per-id byte lengths skip the aligned pairs where only one tokenizer wrote a dummy prefix
  space (`cross_batch.dummy_prefix_pairs`: there the map's first piece is not the student's
  token);
* `cross_loss: uld`: no map; `uld_values` computes ULD on the student logits of the aligned
  positions, chunk by chunk under checkpointing. ULD compares sorted probabilities, never
  ids, and a dummy-prefix pair still predicts the same text on both sides, so it keeps those
  pairs (and loads no teacher tokenizer to find them);
* signals of the store's other tokenizations (format 2.2: a second teacher with its own
  tokenizer) are aligned by their own tokenization's spans and mapped with their own
  tokenizer's vocabulary map (from the files the store keeps for that tokenization); a
  student whose tokenizer is the store's own takes this path too when it trains on such a
  signal (every signal then goes through the cross path: its own aligns one to one);
* the student's tokens per teacher token (`length_ratio`, measured on the first segment's
  texts by `probe_first_segment`, which also warns when chats there cannot be rendered by
  the student's chat template) scales the stream's token budget, so a student that cuts
  text finer keeps its batches near `batch_tokens` of its own tokens.
The data path (tokenize, align, gather) is `cross_batch.CrossCollate`.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from logitstore.errors import SchemaMismatchError
from logitstore.toolkit.token_spans import stored_text_tokens
from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint, vocab_size_of
from student_train.cross_batch import CrossCollate
from student_train.cross_token_losses import uld_per_position

RATIO_SAMPLES = 64  # texts of the first segment tokenized to estimate the length ratio
log = logging.getLogger(__name__)


@dataclass
class CrossTokenizer:
    """What a foreign-tokenizer run adds to its sources."""

    loss: str  # "pkl" | "uld"
    collate: CrossCollate
    vocab_maps: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    length_ratio: float = 1.0  # student tokens per teacher token
    provenance: dict[str, Any] = field(default_factory=dict)


def is_foreign(tokenizer, settings) -> bool:
    """Whether the student's tokenizer is not the one the store's token ids belong to."""
    return tokenizer_fingerprint(tokenizer) != settings.tokenizer_fingerprint


def no_text_problem(url: str, settings, tokenizer) -> str:
    return (f"tokenizer mismatch: store {url} was dumped with tokenizer "
            f"{settings.tokenizer_name or '?'} (fingerprint {settings.tokenizer_fingerprint}, "
            f"vocabulary size {settings.vocab_size}), the student's tokenizer has fingerprint "
            f"{tokenizer_fingerprint(tokenizer)} (vocabulary size {vocab_size_of(tokenizer)}), "
            f"and the store holds no sample text nor token byte spans (written before store "
            f"format 2.1, or dumped without text). A student with another tokenizer "
            f"re-tokenizes each sample's stored text and aligns its positions with the "
            f"teacher's by byte spans, so it needs both: add them with `logitstore add-text "
            f"{url} NEW_STORE --tokenizer <the teacher's tokenizer>` (recovered from the "
            f"stored ids where that is exact; not for chats whose template markup is special "
            f"tokens), or dump the store again with this version's teacher-dump, or train a "
            f"student that shares the teacher's tokenizer")


def draws_problems(draws: dict[str, tuple[int, float]], cfg, reader, eval_reader) -> list[str]:
    """What keeps the signals whose targets are draws (`draws`: name -> the store's n_draws
    and sample temperature) from giving an estimate of the teacher's T=1 distribution, in
    the store and in the eval_store (whose draws the same collate reads the same way)."""
    out = []
    for name, (n_draws, temperature) in draws.items():
        specs = {cfg.store: reader.settings.signals[name].sampled}
        signal = eval_reader.settings.signals.get(name) if eval_reader is not None else None
        if signal is not None:  # a signal the eval_store lacks is refused by the caller
            spec = signal.sampled
            if spec is None or (spec.n_draws, spec.temperature) != (n_draws, temperature):
                held = "no draws" if spec is None else \
                    f"{spec.n_draws} draws at temperature {spec.temperature:g}"
                out.append(f"eval_store {cfg.eval_store}: signal {name!r} holds {held}, store "
                           f"{cfg.store} {n_draws} at temperature {temperature:g}; evaluate on "
                           f"a store whose draws were taken the same way")
            else:
                specs[cfg.eval_store] = spec
        out += [f"signal {name!r} of store {url} would give this run sampled targets drawn at "
                f"sample temperature {temperature:g} and stored without log-probs: a student "
                f"with another tokenizer reads the draws as an estimate of the teacher's T=1 "
                f"distribution, which draws at another temperature give only with their "
                f"log-probs. Use --target topk where the signal holds top-k, dump the signal "
                f"again with --sampled-logprobs (or --sample-temperature 1), or train a student "
                f"that shares the teacher's tokenizer"
                for url, spec in specs.items() if temperature != 1.0 and not spec.logprobs]
    return out


def stored_teacher_tokenizer(reader, url: str, tokenization: str | None = None):
    """The teacher's tokenizer from the files the store keeps (`tokenization`: those of
    that extra tokenization, format 2.2), checked against its fingerprint;
    SchemaMismatchError when the store keeps none or others."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    files = reader.tokenizer_files(tokenization)
    expected = reader.settings.tokenizer_fingerprint if tokenization is None else \
        reader.settings.tokenizations[tokenization].tokenizer_fingerprint
    if "tokenizer.json" not in files:
        raise SchemaMismatchError(
            f"store {url} keeps no tokenizer.json of its teacher, which cross_loss pkl needs to "
            f"map the teacher's vocabulary onto the student's: use --cross-loss uld (no map), "
            f"or dump the store again with this version's teacher-dump (it stores the "
            f"tokenizer's files)")
    with tempfile.TemporaryDirectory() as folder:
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
        try:
            teacher = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError):  # no tokenizer_config.json: the bare tokenizer file
            teacher = PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"))
    if tokenizer_fingerprint(teacher) != expected:
        raise SchemaMismatchError(
            f"the tokenizer files kept in store {url} have fingerprint "
            f"{tokenizer_fingerprint(teacher)}, the store's token ids were cut by "
            f"{expected}: the store is inconsistent; run "
            f"`logitstore verify {url}` and dump it again")
    return teacher


def _tokenizer_of(reader, signal: str) -> str | None:
    """Fingerprint of the tokenizer whose tokens a signal's positions index (None: the
    store lacks the signal)."""
    spec = reader.settings.signals.get(signal)
    if spec is None:
        return None
    if spec.tokenization is None:
        return reader.settings.tokenizer_fingerprint
    return reader.settings.tokenizations[spec.tokenization].tokenizer_fingerprint


def probe_first_segment(reader, tokenizer) -> tuple[float, dict[str, Any]]:
    """(student tokens per teacher token, chat rendering counts) over the first segment's
    samples (at most RATIO_SAMPLES of them; 1.0 and no chats for an empty store). Chats the
    student's tokenizer cannot render with its template are said once, here, before any
    step: they train as plain text (token_spans.stored_text_tokens)."""
    if not reader.segments:
        return 1.0, {}
    samples, rendered = _first_segment_cuts(reader, tokenizer)
    teacher = sum(len(s) for s in samples)
    student = sum(len(whole.ids) for whole, _, _ in rendered)
    plain = [why for _, chat, why in rendered if chat and why]
    chats = {"chat_samples": sum(chat for _, chat, _ in rendered),
             "chat_templated": sum(chat and not why for _, chat, why in rendered)}
    if plain:
        log.warning("%d of the %d chat samples read from the store's first segment are "
                    "trained as plain text, without the student's turn markers: %s. Give the "
                    "student's tokenizer a chat template that renders these turns, or ignore "
                    "this for a base (non-chat) student", len(plain), chats["chat_samples"],
                    plain[0])
    return (student / teacher if teacher else 1.0), chats


def first_segment_length_ratios(reader, tokenizer) -> tuple[float, float]:
    """(mean, largest) student tokens per stored token of the first segment's samples (at
    most RATIO_SAMPLES; 1.0, 1.0 for an empty store), read without any warning: what the
    memory plan sizes rows with (the mean is probe_first_segment's ratio)."""
    if not reader.segments:
        return 1.0, 1.0
    samples, rendered = _first_segment_cuts(reader, tokenizer)
    student = np.asarray([len(whole.ids) for whole, _, _ in rendered], np.float64)
    stored = np.asarray([len(s) for s in samples], np.float64)
    if not stored.sum():
        return 1.0, 1.0
    return float(student.sum() / stored.sum()), float((student / np.maximum(stored, 1)).max())


def _first_segment_cuts(reader, tokenizer) -> tuple[list, list]:
    """(the first segment's first RATIO_SAMPLES samples, the student's cut of each:
    token_spans.stored_text_tokens' triples)."""
    samples = reader.read_segment(0, [])[:RATIO_SAMPLES]
    return samples, [stored_text_tokens(tokenizer, s.text_spans, s.sample_id) for s in samples]


def cross_setup(cfg, reader, eval_reader, tokenizer, plans, problems: list[str]):
    """The run's CrossTokenizer (None when the store's tokenizer is the student's and no
    signal trained on is of another tokenization). A store without text raises
    SchemaMismatchError (`no_text_problem`); the other refusals are appended to `problems`
    (and None is returned)."""
    on_tokenization = {p.name: reader.settings.signals[p.name].tokenization for p in plans}
    if not is_foreign(tokenizer, reader.settings) and not any(on_tokenization.values()):
        return None
    for url, r in ((cfg.store, reader), (cfg.eval_store, eval_reader)):
        if r is not None and not r.has_text:
            raise SchemaMismatchError(no_text_problem(url, r.settings, tokenizer))
    start = len(problems)
    if eval_reader is not None and \
            eval_reader.settings.tokenizer_fingerprint != reader.settings.tokenizer_fingerprint:
        problems.append(f"eval_store {cfg.eval_store} was cut by another tokenizer than store "
                        f"{cfg.store}: a foreign-tokenizer student aligns with one teacher "
                        f"tokenizer per run; evaluate on a store of the same teacher tokenizer")
    if eval_reader is not None:  # 2.2: a signal's tokenization must be the same tokenizer
        problems += [f"eval_store {cfg.eval_store}: signal {name!r} is not on the tokenization "
                     f"{tokenization!r} it has in store {cfg.store}; evaluate on a store whose "
                     f"teachers cut the text the same way" for name, tokenization in
                     on_tokenization.items() if tokenization is not None and
                     _tokenizer_of(eval_reader, name) != _tokenizer_of(reader, name)]
    draws = {p.name: (p.n_draws, p.sample_temperature) for p in plans if p.target == "sampled"}
    problems += draws_problems(draws, cfg, reader, eval_reader)
    if len(problems) > start:
        return None
    topk = [p.name for p in plans if p.target]  # top-k, or draws read as one
    maps, first_maps, piece_maps, byte_lengths, summary = {}, {}, {}, {}, {}
    if cfg.cross_loss == "pkl" and topk:
        from logitstore.toolkit.vocab_map import vocab_map_for

        # shared by every run of the pair (the key hashes both tokenizers)
        cache = Path(cfg.cache_dir) / "vocab_maps" if cfg.cache_dir else None
        built = {}  # per tokenization: one map per teacher tokenizer
        for tokenization in dict.fromkeys(on_tokenization[name] for name in topk):
            teacher = stored_teacher_tokenizer(reader, cfg.store, tokenization)
            built[tokenization] = vocab_map_for(teacher, tokenizer, cache_dir=cache)
        maps = {name: (built[on_tokenization[name]].teacher_to_student_first,
                       built[on_tokenization[name]].exact) for name in topk}
        first_maps = {name: pair[0] for name, pair in maps.items()}
        if cfg.skip_dummy_prefix_pairs:
            byte_lengths = {name: (built[on_tokenization[name]].teacher_byte_lengths,
                                   built[on_tokenization[name]].student_byte_lengths)
                            for name in topk}
        if cfg.inside_token_targets:
            piece_maps = {name: (built[on_tokenization[name]].piece_offsets,
                                 built[on_tokenization[name]].piece_ids) for name in topk}
        summary = {"vocab_map": {**built[on_tokenization[topk[0]]].summary(),
                                 "key": built[on_tokenization[topk[0]]].key},
                   "vocab_maps": {name: {**built[on_tokenization[name]].summary(),
                                         "key": built[on_tokenization[name]].key}
                                  for name in topk}}
    chain_signals = topk if maps and cfg.chained_token_targets else []
    skip_unchained = bool(chain_signals) and cfg.skip_unchained_pairs
    ratio, chats = probe_first_segment(reader, tokenizer)
    return CrossTokenizer(
        loss=cfg.cross_loss, collate=CrossCollate(tokenizer, topk, first_maps,
                                                  cfg.min_mapped_share, on_tokenization,
                                                  piece_maps, byte_lengths, chain_signals,
                                                  draws, skip_unchained),
        vocab_maps=maps, length_ratio=ratio,
        provenance={"cross_tokenizer": {"loss": cfg.cross_loss, "length_ratio": ratio,
                                        "first_segment_chats": chats,
                                        "min_mapped_share": cfg.min_mapped_share,
                                        "inside_token_targets": bool(piece_maps),
                                        "inside_other_bin": bool(piece_maps)
                                        and cfg.inside_other_bin,
                                        "chained_token_targets": bool(chain_signals),
                                        "skip_unchained_pairs": skip_unchained,
                                        "skip_dummy_prefix_pairs": bool(byte_lengths),
                                        "teacher_tokenizer": reader.settings.tokenizer_name,
                                        **summary}})


def uld_values(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               ids: torch.Tensor, logprobs: torch.Tensor, temperature: float,
               chunk_size: int) -> torch.Tensor:
    """[n] ULD per position of the student logits hidden @ weight.T (+ bias) against the
    teacher's top-k (ids [n, k], T=1 log-probs [n, k]), chunk by chunk; with gradients each
    chunk runs under a non-reentrant checkpoint, so no [n, V] buffer outlives its chunk."""
    def per_chunk(h, i, lp):
        return uld_per_position(F.linear(h, weight, bias), i, lp, temperature=temperature)

    track = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        piece = slice(start, start + chunk_size)
        args = (hidden[piece], ids[piece], logprobs[piece])
        out.append(checkpoint(per_chunk, *args, use_reentrant=False, preserve_rng_state=False)
                   if track else per_chunk(*args))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
