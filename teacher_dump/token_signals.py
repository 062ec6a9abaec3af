"""Per-position teacher signals from the logits: top-k log-probs with the exact tail mass,
and sampled draws by inverse CDF, in as few passes over the [positions x vocab] logits as
keep them exact.

    topk, sampled = capture_token_signals(logits, lengths, sample_ids, spec)

Per chunk of P positions, x = the fp32 logits [P, V] (V = the tokenizer's vocabulary):

    logp  = log_softmax(x)                 one fused kernel (max, sum of exp, write)
    top-k = _topk(logp, k)                 ids and their log-probs at once; two stages,
                                           a full pass only for the group maxima
    probs = exp(logp)                      the sampling weights at T = 1, and the tail's terms
    cdf   = cumsum(probs)                  draws: searchsorted of the uniforms in it
    tail  = log(sum of probs outside the top-k): the small terms summed themselves, so no
            cancellation however close the top-k mass is to 1 (not log(1 - sum p))

Five full [P, V] kernels (log_softmax, group maxima, exp, cumsum, sum), plus a copy only
where short samples are packed (below), against about ten before (a gather copy,
log_softmax, a full topk, a scatter copy, logsumexp's four, exp, cumsum) plus fresh
[P, V] allocations per chunk. On [4096 x 32000] fp32 logits, one CPU thread, top-32 + 16
draws: 0.73-0.90 s of CPU time, against 2.2-3.5 s before.

Why exp(log_softmax(x)) rather than exp(x - logsumexp(x)): the draws are part of the
store's contract (resume, multi-rank dumps and a rerun must give the same draws for the
same seed), and they are the inverse-CDF rule applied to exactly these fp32 weights; a
weight one ulp off moves a draw whose uniform falls between the two cdf values. The fused
log_softmax is also cheaper than logsumexp (which materialises x - max and its exp).

Chunks: a sample of at least `logits_chunk / 4` positions is cut into chunks of its own
positions, read in place (a view of the logits, when they are fp32); shorter samples are
packed into one chunk by copying them into a buffer, so a batch of short samples still
makes few, large tensor ops. Every row's values depend on that row
alone, so the chunking never changes a result.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from logitstore.sample import Sampled, TopK

Tensor = torch.Tensor

# Columns per group of the two-stage top-k (`_topk`); 64 measured fastest of 16..250 at
# V = 32000, k = 32 on the CPU (half of torch.topk's time).
_TOPK_GROUP = 64

# Below this mass outside the top-k, fp32 probabilities that underflowed to 0 (each
# < 1.2e-38, at most V of them) could be a visible part of the tail: such rows get the
# exact logsumexp of their log-probs instead (for V <= 1e6 the error bound is 1e-12 above).
_TAIL_EXACT_BELOW = 1e-20


def sample_seed(seed: int, sample_id: str) -> int:
    """63-bit generator seed from (seed, sample_id): same draws in every batch, rank and run."""
    digest = hashlib.sha256(f"{seed}\0{sample_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_uniforms(seed: int, sample_id: str, length: int, n_draws: int) -> Tensor:
    """[length, n_draws] float32 uniforms in [0, 1) of one sample (CPU, device-independent)."""
    generator = torch.Generator(device="cpu").manual_seed(sample_seed(seed, sample_id))
    return torch.rand((length, n_draws), generator=generator, dtype=torch.float32)


Piece = tuple[int, int, int]  # (sample b, first position, stop position)


def plan_chunks(lengths: list[int], chunk: int) -> list[list[Piece]]:
    """The real positions of a batch, in order (sample by sample), as chunks of at most
    `chunk` rows: one piece of one sample (read in place), or several whole short samples
    (packed by copying)."""
    packed_below = max(1, chunk // 4)
    chunks: list[list[Piece]] = []
    packing: list[Piece] = []
    packed_rows = 0
    for b, n in enumerate(lengths):
        if n >= packed_below:
            if packing:
                chunks.append(packing)
                packing, packed_rows = [], 0
            chunks += [[(b, t, min(t + chunk, n))] for t in range(0, n, chunk)]
            continue
        if packed_rows + n > chunk:
            chunks.append(packing)
            packing, packed_rows = [], 0
        packing.append((b, 0, n))
        packed_rows += n
    if packing:
        chunks.append(packing)
    return chunks


class _Buffers:
    """[rows, V] fp32 work buffers reused by every chunk of a batch (allocated on first use:
    fresh multi-MB tensors per chunk would cost page faults on the CPU)."""

    def __init__(self, rows: int, vocab: int, device: torch.device):
        self.shape, self.device = (rows, vocab), device
        self._tensors: dict[str, Tensor] = {}

    def get(self, name: str, rows: int) -> Tensor:
        if name not in self._tensors:
            self._tensors[name] = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        return self._tensors[name][:rows]


def _chunk_logits(logits: Tensor, pieces: list[Piece], vocab: int, buffers: _Buffers) -> Tensor:
    """fp32 logits [P, vocab] of a chunk's positions: a view when possible, else a copy."""
    if len(pieces) == 1:
        b, t0, t1 = pieces[0]
        view = logits[b, t0:t1, :vocab]  # [P, vocab], rows strided by V' >= vocab
        if view.dtype == torch.float32:
            return view
    rows = sum(t1 - t0 for _, t0, t1 in pieces)
    out = buffers.get("logits", rows)
    at = 0
    for b, t0, t1 in pieces:
        out[at:at + t1 - t0].copy_(logits[b, t0:t1, :vocab])  # casts bf16/fp16 to fp32
        at += t1 - t0
    return out


def capture_token_signals(logits: Tensor, lengths: list[int], sample_ids: list[str], spec
                          ) -> tuple[list[TopK] | None, list[Sampled] | None]:
    """logits [B, S, V'] (V' >= spec.vocab_size; real positions 0..lengths[b]-1 of row b)
    -> per sample TopK and Sampled (numpy, CPU), each None when `spec` does not ask for it.
    `spec`: a teacher_dump.capture.CaptureSpec."""
    vocab, k, n_draws, temperature = spec.vocab_size, min(spec.top_k, spec.vocab_size), \
        spec.n_draws, spec.temperature
    chunks = plan_chunks(lengths, spec.logits_chunk)
    widest = max(sum(t1 - t0 for _, t0, t1 in pieces) for pieces in chunks)
    buffers = _Buffers(widest, vocab, logits.device)
    uniforms = None
    if n_draws:
        uniforms = torch.cat([sample_uniforms(spec.seed, sid, n, n_draws)
                              for sid, n in zip(sample_ids, lengths)])  # [total, N]
    need_probs = bool(k) or (bool(n_draws) and temperature == 1.0)
    top_ids, top_lps, tails = [], [], []
    draw_rows, draw_ids, draw_counts, draw_lps = [], [], [], []
    start = 0
    for pieces in chunks:
        x = _chunk_logits(logits, pieces, vocab, buffers)  # [P, V]
        rows = x.shape[0]
        logp = torch.log_softmax(x, -1, out=buffers.get("logp", rows))  # [P, V]
        if k:
            lps, ids = _topk(logp, k)  # [P, k]
        probs = torch.exp(logp, out=buffers.get("probs", rows)) if need_probs else None
        if n_draws:
            u = uniforms[start:start + rows].to(x.device)  # [P, N]
            weights = probs if temperature == 1.0 else torch.softmax(x / temperature, dim=-1)
            r, d, counts = _draw(weights, u, cdf=buffers.get("cdf", rows))
            draw_rows.append(r.cpu() + start)
            draw_ids.append(d.cpu())
            draw_counts.append(counts.cpu())
            draw_lps.append(logp[r, d].cpu())  # log p at T = 1, whatever T drew them
        if k:
            top_ids.append(ids.cpu())
            top_lps.append(lps.cpu())
            tails.append(_tail_logmass(probs, logp, ids).cpu())  # overwrites probs
        start += rows

    bounds = np.concatenate([[0], np.cumsum(lengths)])
    topk = sampled = None
    if k:
        ids, lps = torch.cat(top_ids).numpy(), torch.cat(top_lps).numpy()
        tail = torch.cat(tails).numpy()
        topk = [TopK(ids[a:z], lps[a:z], tail[a:z]) for a, z in zip(bounds[:-1], bounds[1:])]
    if n_draws:
        rows = torch.cat(draw_rows).numpy()
        ids, counts = torch.cat(draw_ids).numpy(), torch.cat(draw_counts).numpy()
        lps = torch.cat(draw_lps).numpy()
        per_row = np.bincount(rows, minlength=start)  # unique ids per position
        entry_bounds = np.concatenate([[0], np.cumsum(per_row)])
        sampled = []
        for a, z in zip(bounds[:-1], bounds[1:]):
            ea, ez = entry_bounds[a], entry_bounds[z]
            offsets = entry_bounds[a:z + 1] - ea
            sampled.append(Sampled(offsets.astype(np.int64), ids[ea:ez], counts[ea:ez],
                                   lps[ea:ez]))
    return topk, sampled


def _topk(logp: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest values of each row of logp [P, V] and their ids, [P, k] each, largest
    first: torch.topk's values, found in two cheaper stages when k is small against V.

    Columns fall into groups of _TOPK_GROUP; only the k groups with the largest maxima are
    searched (plus the V mod _TOPK_GROUP last columns). Exact: let m be the k-th largest
    group maximum. The k chosen maxima are k values >= m, so the k-th largest value of the
    row is >= m; every value above m lies in a group whose maximum is above m, and all such
    groups are chosen. Among exactly equal values the ids kept may differ from torch.topk's.
    """
    rows, vocab = logp.shape
    size = _TOPK_GROUP
    groups = vocab // size
    if 4 * k * size > vocab:  # the candidates would be a large part of the row
        return torch.topk(logp, k, dim=-1)
    blocks = logp[:, :groups * size].unflatten(-1, (groups, size))  # [P, G, size] view
    chosen = torch.topk(blocks.amax(-1), k, dim=-1, sorted=False).indices  # [P, k]
    row = torch.arange(rows, device=logp.device)[:, None]
    if blocks.is_contiguous():  # groups are rows of [P * G, size]: index_select, ~8x faster
        flat = (chosen + row * groups).flatten()  # [P * k]
        candidates = blocks.reshape(rows * groups, size).index_select(0, flat).view(rows, k * size)
    else:
        candidates = blocks[row, chosen].flatten(1)  # [P, k * size]
    searched = k * size
    if groups * size < vocab:  # the last V mod size columns are always candidates
        candidates = torch.cat([candidates, logp[:, groups * size:]], 1)
    values, where = torch.topk(candidates, k, dim=-1)  # [P, k] positions among candidates
    in_group = chosen.gather(1, (where // size).clamp(max=k - 1)) * size + where % size
    ids = torch.where(where < searched, in_group, where - searched + groups * size)
    return values, ids


def _tail_logmass(probs: Tensor, logp: Tensor, ids: Tensor) -> Tensor:
    """log of the probability mass outside `ids` [P, k] per row -> [P].

    probs [P, V] = exp(logp) is overwritten (the top-k columns set to 0). The mass is the sum
    of the outside terms themselves, exact to fp32 rounding however small; rows where it is
    below _TAIL_EXACT_BELOW take the logsumexp of their outside log-probs instead; -inf when
    the top-k are the whole vocabulary.
    """
    if ids.shape[-1] == probs.shape[-1]:
        return torch.full(ids.shape[:1], float("-inf"), device=probs.device)
    mass = probs.scatter_(-1, ids, 0.0).sum(-1)  # [P]
    tail = mass.log()
    tiny = (mass < _TAIL_EXACT_BELOW).nonzero().squeeze(-1)
    if len(tiny):
        outside = logp[tiny].scatter(-1, ids[tiny], float("-inf"))  # [rows, V]
        tail[tiny] = outside.logsumexp(-1)
    return tail


def _draw(weights: Tensor, u: Tensor, cdf: Tensor | None = None):
    """Inverse-CDF draws from weights [P, V] (>= 0, each row summing to ~1) for uniforms
    u [P, N] -> unique (row, id, count); `cdf` is an optional [P, V] buffer to write into.

    Returned sorted by row, then id; every row has >= 1 entry and its counts sum to N.
    """
    # fp32 is enough: id i is drawn when the target falls in [cdf[i-1], cdf[i]), whose width
    # is p_i up to one rounding (~6e-8 absolute); the accumulated cumsum error is common to
    # both ends. [P, V], non-decreasing in fp32 too (all terms >= 0).
    cdf = torch.cumsum(weights, -1, out=cdf)
    total = cdf[:, -1:]  # [P, 1]: 1 +- rounding; scaling by it keeps every draw in range
    # Strictly below the total, so the draw is never an id past the last one with p > 0.
    below = torch.nextafter(total, torch.zeros_like(total))
    target = torch.minimum(u * total, below)  # [P, N]
    # First id whose cdf exceeds the target: id i is drawn with probability p_i.
    drawn = torch.searchsorted(cdf, target, right=True)
    vocab = cdf.shape[-1]
    row = torch.arange(drawn.shape[0], device=drawn.device)[:, None].expand_as(drawn)
    keys, counts = torch.unique(row * vocab + drawn, sorted=True, return_counts=True)
    return keys // vocab, keys % vocab, counts
