"""Per-position teacher signals from the logits: top-k log-probs with the exact tail mass,
and sampled draws by inverse CDF, reading the fp32 [positions x vocab] logits once.

    topk, sampled = capture_token_signals(logits, lengths, sample_ids, spec)
    # logits: [B, S, V'] tensor, or a HeadLogits that computes them chunk by chunk

Per chunk of P positions, x = the fp32 logits [P, V] (V = the tokenizer's vocabulary),
cut into groups of GROUP = 64 columns (`teacher_dump.logit_stats`, one read of x):

    maxima, sums       per group: max and sum of exp(x - max)            [P, G]
    lse                log sum exp of the row, from the [P, G] statistics
    top-k              only in the k groups with the largest maxima (exact: see _topk_and_tail)
    tail               log of the mass outside the top-k: the mass of the other groups plus
                       the other columns of the k searched groups, summed term by term (no
                       1 - sum cancellation; exact logsumexp when it underflows)
    draws              inverse CDF in two levels: the group whose cumulative mass passes
                       the target, then the column inside it (64 values re-read per draw)

Against the single-level rule (cumsum over all V columns) a draw is the same id except
where its uniform lies within fp32 rounding of a CDF boundary; either way the counts follow
the teacher's distribution. Reproducibility: the uniforms come from a CPU
generator seeded per sample from (seed, sample_id), so the draws of a sample do not depend
on its batch, its rank or a resume (for one `capture_kernel`: logit_stats).

Chunks: a sample of at least `logits_chunk / 4` positions is cut into chunks of its own
positions, read in place (a view of the logits, when they are fp32); shorter samples are
packed into one chunk by copying them into a buffer, so a batch of short samples still
makes few, large tensor ops. Every row's values depend on that row alone, so the chunking
never changes a result.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from logitstore.sample import Sampled, TopK
from teacher_dump.logit_stats import GROUP, GroupStats, group_stats

Tensor = torch.Tensor

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


class HeadLogits:
    """The logits of a batch computed chunk by chunk from the last hidden states, so the
    [B, S, V] tensor a Hugging Face forward returns is never made: on the CPU its fresh
    allocation alone (page faults over S x V x 4 bytes) costs a third of a small teacher's
    LM head; on a GPU it is the largest tensor of the step.

    hidden [B, S, d] (the decoder's output, after the final norm) and `head` (the model's
    output embedding) give head(hidden)[..., :vocab] in fp32: the rows a forward computes.
    """

    def __init__(self, hidden: Tensor, head: torch.nn.Module):
        self.hidden, self.head = hidden, head
        plain = type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
        self._weight = head.weight if plain else None  # [V', d]: matmul into the buffer
        self._bias = head.bias if plain else None

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def chunk(self, pieces: list[Piece], vocab: int, out: Tensor) -> Tensor:
        rows = [self.hidden[b, t0:t1] for b, t0, t1 in pieces]
        h = rows[0] if len(rows) == 1 else torch.cat(rows)  # [P, d]
        out = out[:h.shape[0]]
        if self._weight is not None:
            w = self._weight[:vocab]  # [vocab, d]: padded embedding rows never computed
            if self._bias is None:
                return torch.mm(h, w.t(), out=out)
            return torch.addmm(self._bias[:vocab], h, w.t(), out=out)
        return out.copy_(self.head(h)[:, :vocab])  # quantised or half-precision heads


class _Buffer:
    """One [rows, V] fp32 buffer for the logits of every chunk of a batch that needs a
    copy or a matmul (allocated on first use: fresh multi-MB tensors per chunk would cost
    page faults on the CPU)."""

    def __init__(self, rows: int, vocab: int, device: torch.device):
        self.shape, self.device = (rows, vocab), device
        self._tensor: Tensor | None = None

    def get(self, rows: int) -> Tensor:
        if self._tensor is None:
            self._tensor = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        return self._tensor[:rows]


def _chunk_logits(logits: Tensor | HeadLogits, pieces: list[Piece], vocab: int,
                  buffer: _Buffer) -> Tensor:
    """fp32 logits [P, vocab] of a chunk's positions: a view when possible, else a copy."""
    rows = sum(t1 - t0 for _, t0, t1 in pieces)
    if isinstance(logits, HeadLogits):
        return logits.chunk(pieces, vocab, buffer.get(rows))
    if len(pieces) == 1:
        b, t0, t1 = pieces[0]
        view = logits[b, t0:t1, :vocab]  # [P, vocab], rows strided by V' >= vocab
        if view.dtype == torch.float32:
            return view
    out = buffer.get(rows)
    at = 0
    for b, t0, t1 in pieces:
        out[at:at + t1 - t0].copy_(logits[b, t0:t1, :vocab])  # casts bf16/fp16 to fp32
        at += t1 - t0
    return out


def capture_token_signals(logits: Tensor | HeadLogits, lengths: list[int], sample_ids: list[str],
                          spec) -> tuple[list[TopK] | None, list[Sampled] | None]:
    """logits [B, S, V'] (V' >= spec.vocab_size; real positions 0..lengths[b]-1 of row b),
    or a HeadLogits over such a batch -> per sample TopK and Sampled (numpy, CPU), each None
    when `spec` (a teacher_dump.capture.CaptureSpec) does not ask for it."""
    vocab, k, n_draws, temperature = spec.vocab_size, min(spec.top_k, spec.vocab_size), \
        spec.n_draws, spec.temperature
    chunks = plan_chunks(lengths, spec.logits_chunk)
    widest = max(sum(t1 - t0 for _, t0, t1 in pieces) for pieces in chunks)
    device = logits.device
    buffer = _Buffer(widest, vocab, device)
    uniforms = None
    if n_draws:
        uniforms = torch.cat([sample_uniforms(spec.seed, sid, n, n_draws)
                              for sid, n in zip(sample_ids, lengths)])  # [total, N]
    top_ids, top_lps, tails = [], [], []
    draw_rows, draw_ids, draw_counts, draw_lps = [], [], [], []
    start = 0
    for pieces in chunks:
        x = _chunk_logits(logits, pieces, vocab, buffer)  # [P, V]
        rows = x.shape[0]
        stats = group_stats(x, temperature if n_draws else 1.0, spec.kernel)  # [P, G] each
        lse = _logsumexp(stats)  # [P]
        if k:
            ids, lps, tail = _topk_and_tail(x, stats, lse, k)  # [P, k], [P, k], [P]
            top_ids.append(ids.cpu())
            top_lps.append(lps.cpu())
            tails.append(tail.cpu())
        if n_draws:
            u = uniforms[start:start + rows].to(device)  # [P, N]
            r, d, counts = draw(x, stats, u, temperature)
            draw_rows.append(r.cpu() + start)
            draw_ids.append(d.cpu())
            draw_counts.append(counts.cpu())
            draw_lps.append((x[r, d] - lse[r]).cpu())  # log p at T = 1, whatever T drew them
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


def _logsumexp(stats: GroupStats) -> Tensor:
    """log sum exp of each row [P] from its groups' maxima and sums."""
    top = stats.maxima.amax(-1, keepdim=True)  # [P, 1]
    total = (stats.sums * (stats.maxima - top).exp()).sum(-1)
    return top.squeeze(-1) + total.log()


def _group_values(x: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """The values of x [P, V] in groups [P, n] -> (values [P, n, GROUP], -inf past the
    row's end (the last group may be short); their column ids, clamped into the row)."""
    rows, vocab = x.shape
    cols = groups.unsqueeze(-1) * GROUP + torch.arange(GROUP, device=groups.device)
    if x.is_contiguous() and vocab % GROUP == 0:  # groups are rows of [P * G, GROUP]:
        flat = (groups + torch.arange(rows, device=x.device)[:, None] * (vocab // GROUP))
        values = x.view(-1, GROUP).index_select(0, flat.flatten())  # ~5x faster than gather
        return values.view(cols.shape), cols
    real = cols < vocab
    cols = cols.clamp(max=vocab - 1)
    values = x.gather(1, cols.flatten(1)).view(cols.shape)
    return values.masked_fill_(~real, float("-inf")), cols


def _topk_and_tail(x: Tensor, stats: GroupStats, lse: Tensor, k: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The k most likely ids of each row of x [P, V], their log-probs (largest first, the
    values of torch.topk) and the log of the mass outside them -> [P, k], [P, k], [P].

    Only the k groups with the largest maxima are searched. Exact: let m be the k-th
    largest group maximum. The k chosen maxima are k values >= m, so the k-th largest value
    of the row is >= m; every value above m lies in a group whose maximum is above m, and
    all such groups are chosen. Among exactly equal values the ids kept may differ from
    torch.topk's. The tail: the mass of the groups not searched (their sums) plus the
    searched columns outside the top-k, each term computed itself.
    """
    rows, vocab = x.shape
    if k == vocab:
        values, ids = torch.topk(x, k, dim=-1)
        return ids, values - lse[:, None], torch.full_like(lse, float("-inf"))
    n_groups = stats.maxima.shape[-1]
    if k * 4 >= n_groups:  # the candidates would be a large part of the row: plain topk
        values, ids = torch.topk(x, k, dim=-1)
        probs = (x - lse[:, None]).exp().scatter_(-1, ids, 0.0)  # [P, V]
        mass = probs.sum(-1)
    else:
        chosen = torch.topk(stats.maxima, k, dim=-1, sorted=False).indices  # [P, k]
        cand, cols = _group_values(x, chosen)  # [P, k, GROUP]
        cand = cand.flatten(1)
        values, where = torch.topk(cand, k, dim=-1)  # [P, k] positions among the candidates
        ids = cols.flatten(1).gather(1, where)
        group_mass = stats.sums * (stats.maxima - lse[:, None]).exp()  # [P, G]
        outside = (cand - lse[:, None]).exp().scatter_(-1, where, 0.0)  # [P, k * GROUP]
        mass = group_mass.scatter_(-1, chosen, 0.0).sum(-1) + outside.sum(-1)
    tail = mass.log()
    tiny = (mass < _TAIL_EXACT_BELOW).nonzero().squeeze(-1)
    if len(tiny):  # terms that underflowed fp32 may be all of it: exact, in log space
        outside_lp = (x[tiny] - lse[tiny, None]).scatter(-1, ids[tiny], float("-inf"))
        tail[tiny] = outside_lp.logsumexp(-1)
    return ids, values - lse[:, None], tail


def draw(x: Tensor, stats: GroupStats, u: Tensor, temperature: float = 1.0):
    """Inverse-CDF draws from softmax(x / T) (x [P, V], `stats` its group_stats at T) for
    uniforms u [P, N] -> unique (row, id, count), sorted by row, then id; every row has
    >= 1 entry and its counts sum to N. Ids whose probability is 0 are never drawn.

    Level 1: the groups' weights W = sums_T * exp((maxima - row max) / T), their cumsum,
    and the first group whose cdf exceeds the target u * total. Level 2: the weights of
    that group's columns relative to its maximum, their cumsum, and the first column whose
    cdf exceeds what is left of the target (in the same units).
    """
    inv_t = 1.0 / temperature
    sums = stats.sums if stats.sums_t is None else stats.sums_t
    top = stats.maxima.amax(-1, keepdim=True)  # [P, 1]
    scale = ((stats.maxima - top) * inv_t).exp()  # [P, G]
    weights = sums * scale
    cdf = weights.cumsum(-1)  # [P, G]
    total = cdf[:, -1:]
    # Strictly below the total, so the draw is never a group past the last with weight > 0.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    group = torch.searchsorted(cdf, target, right=True)  # [P, N]
    before = torch.where(group > 0, cdf.gather(1, (group - 1).clamp(min=0)), 0.0)
    left = (target - before) / scale.gather(1, group)  # in units of exp((x - group max) / T)
    values, _ = _group_values(x, group)  # [P, N, GROUP]; -inf past the row's end: weight 0
    inner = ((values - stats.maxima.gather(1, group).unsqueeze(-1)) * inv_t).exp()
    inner_cdf = inner.cumsum(-1)  # [P, N, GROUP]
    inner_total = inner_cdf[..., -1:]
    left = torch.minimum(left.clamp(min=0).unsqueeze(-1),
                         torch.nextafter(inner_total, torch.zeros_like(inner_total)))
    column = torch.searchsorted(inner_cdf, left, right=True).squeeze(-1)  # [P, N]
    drawn = group * GROUP + column
    vocab = x.shape[1]
    row = torch.arange(drawn.shape[0], device=drawn.device)[:, None].expand_as(drawn)
    keys, counts = torch.unique(row * vocab + drawn, sorted=True, return_counts=True)
    return keys // vocab, keys % vocab, counts
