"""lm_head + CE + sparse KD per chunk of positions, with analytic gradients and no recompute.

Training's lm_head + loss: objective.py calls `fused_head_loss` on the hidden states of the
positions it trains. Why not the textbook chunked path (each chunk of positions under
torch.utils.checkpoint, as tests/chunked_loss.py keeps it for reference): it runs the lm_head
matmul and every [n, V] op of the loss twice (forward, then recompute in backward), and
autograd keeps several [n, V] buffers (support mask, masked copy, log-softmax, their
gradients). Here each chunk of n positions goes once through ONE fp32 [n, V] buffer:

  z = h @ W.T + b                                  the logits (buffer)
  gather z at each target's ids [n, K], at the labels [n]; mean(z) if label smoothing
  e = exp(z - max z)                               in place: the softmax numerators
  per KD target with a student tail bin: the sum of e off its support (support entries
      zeroed, summed, put back: a sum of positives, no cancellation as in sum(e) - support)
  values: KD from O(n K) numbers (losses.kd_from_student_bins, which
      losses.sparse_kd_per_position also runs on full logits),
      CE from logsumexp = max + log(sum e)
  gradient w.r.t. the logits, written over e (coefficients c [n, terms], see below):
      g = e * r  [+ e_T * r_T]  - c_ce * eps / V  + O(n K) scattered corrections
  grad_hidden_rows = g @ W,  grad_W += g.T @ h,  grad_b += sum g    (3 matmuls in all)

Math, per position (softmax p = e / sum e; S = a target's support; T its temperature):
  CE, smoothing eps, label y:   dCE/dz_j = p_j - (1 - eps) [j = y] - eps / V
  KD (any divergence): the student enters only through its bins, u_k = z_{id_k} / T and a
    tail bin u_tail; dL/du comes from autograd over those K+1 numbers (cheap), then
      dL/dz_{id_k} = dL/du_k / T                                          (on the support)
      tail mode, u_tail = logsumexp_{j off S}(z_j) / T    (collapsed at T=1, then tempered):
        dL/dz_j = dL/du_tail / T * e_j / sum_{off S} e                    (off the support)
      zero-tail kl (renormalised top-k, sampled), u_tail = logsumexp_{j off S}(z_j / T):
        dL/dz_j = dL/du_tail / T * e_T,j / sum_{off S} e_T,   e_T = exp((z - max z) / T)
    e_T is e at T = 1; at T != 1 it is a second [n, V] buffer, the one case that needs one.
    Zero-tail targets with other divergences compare on the support only: no dense term.
    E.g. forward KL, tail mode, T = 1 (q = teacher): dL/dz_j = p_j - q_j on the support and
    p_j * (1 - q_tail / p_tail) off it (p_tail = student mass off the support).
  A position whose off-support sum falls below TINY_TAIL (the tail is > 57 nats under the top
  logit, so exp() of it would lose precision) is redone exactly on its own logits with
  head_loss_terms.dense_terms and autograd (rare; values and gradients stay those of the
  dense computation).

Gradient coefficients. When the caller's loss is linear in the per-position values (the
trainer's is: weighted sums over denominators known before any forward, see objective.py),
its gradient w.r.t. them (grad_output, [n, terms]) is known before the forward up to one
scalar (loss scaling, accelerate's division by the accumulation steps). The caller passes it
as `expected_grad`; the forward builds the weight/hidden/bias gradients while the logits
exist (one [V, d] accumulator, what the weight's .grad needs anyway), and backward multiplies
them by the factor it finds after checking that grad_output really is that multiple of
expected_grad (one host sync). Anything else arriving (no expected_grad, another use of the
values) is handled exactly by running the chunks again with grad_output as the coefficients
(4 matmuls per chunk). Keeping one gradient set per term instead, combined in backward, would
need a [V, d] accumulator per term and group: twice the lm_head gradient memory for KD + CE.

Precision: the matmuls run in autocast's dtype when it is on, else the weight's (as F.linear
would); everything between them in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from student_train.head_loss_terms import HeadLossTerms, dense_terms
from student_train.losses import (IGNORE, LOG_ZERO, SparseTarget, at_least_fp32,
                                  kd_from_student_bins, student_tail_needed, support_size)

Tensor = torch.Tensor
DEFAULT_CHUNK_SIZE = 1024
# Off-support sums of exp(z - max) below this are redone exactly (see the module docstring):
# above it, terms that underflow fp32 (< 1.2e-38 each) change the sum by < 1e-7 relatively.
TINY_TAIL = 1e-25
# grad_output may differ from factor * expected_grad by rounding only (same formula, the
# scalar applied at another point): this many ulps of the largest entry.
ULPS_OF_ROUNDING = 1000


# ----------------------------------------------------------------------------- one chunk

def _off_support_sum(buffer: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of buffer off the support [n], buffer at ids [n, K]); buffer is left unchanged."""
    kept = buffer.gather(-1, ids)
    buffer.scatter_(-1, ids, 0.0)
    total = buffer.sum(-1)
    buffer.scatter_(-1, ids, kept)  # padding ids repeat a valid id: same value written twice
    return total, kept


def _support_entries(target: SparseTarget) -> Tensor:
    """[n, K] bool: one entry per distinct support id (an all-padding row keeps its fill id)."""
    entries = target.valid.clone()
    entries[:, 0] |= ~target.valid.any(-1)
    return entries


@dataclass
class _ChunkLogits:
    """What one chunk's losses need of its logits z, once z is overwritten by e = exp(z - top).

    total starts as None and is filled by the first term that sums e over the vocabulary.
    """

    e: Tensor  # [n, V] exp(z - top), in place of z: the one [n, V] buffer
    top: Tensor  # [n] max z
    tempered: dict[float, Tensor]  # T -> exp((z - top) / T) [n, V]; zero-tail kl at T != 1 only
    z_support: list[Tensor]  # z at each target's ids, [n, K] each
    label_ids: Tensor | None  # [n, 1] the labels (ignored ones replaced by 0)
    z_label: Tensor | None  # [n] z at the labels
    z_mean: Tensor | None  # [n] mean of z over the vocabulary (label smoothing only)
    total: Tensor | None = None  # [n] sum of e over the vocabulary


@dataclass
class _StudentTail:
    """A target's student tail bin, from the sum of a buffer (e or e_T) off its support."""

    logit: Tensor  # [n] the tempered tail logit kd_from_student_bins takes
    no_tail: Tensor  # [n] bool: the support is the whole vocabulary
    off_sum: Tensor  # [n] the buffer summed off the support
    kept: Tensor  # [n, K] the buffer at the support ids
    entries: Tensor  # [n, K] bool: one entry per distinct support id
    on_tempered: bool  # the buffer is logits.tempered[T] (zero-tail kl at T != 1), not e


@dataclass
class _LogitGradient:
    """g = e * rate + sum_T e_T * rate_t[T] - uniform + the scattered sparse corrections."""

    rate: Tensor  # [n]
    rate_t: dict[float, Tensor]  # T -> [n]
    sparse: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (ids [n, k], add [n, k])
    uniform: Tensor | None = None  # [n], subtracted from every logit (label smoothing)

    def add_kd(self, target: SparseTarget, grads: tuple[Tensor, ...],
               tail: _StudentTail | None) -> None:
        """A KD term's gradients w.r.t. its bins (support logits, tail logit) -> the logits."""
        on_support = grads[0]  # [n, K]; 0 on padding entries (masked in the bins)
        if tail is not None:
            T = target.temperature
            off = torch.where(tail.off_sum > 0, grads[1] / (T * tail.off_sum), 0.0)  # [n]
            (self.rate_t[T] if tail.on_tempered else self.rate).add_(off)
            # the dense term e * off covers the support too: take it back there, once per id
            on_support = on_support - torch.where(tail.entries, off[:, None] * tail.kept, 0.0)
        self.sparse.append((target.ids, on_support))

    def assemble(self, logits: _ChunkLogits) -> Tensor:
        """g [n, V], written over logits.e (and the tempered buffers): they are spent after."""
        g = logits.e.mul_(self.rate[:, None])
        for T, e_t in logits.tempered.items():
            g.add_(e_t.mul_(self.rate_t[T][:, None]))
        if self.uniform is not None:
            g.sub_(self.uniform[:, None])
        for ids, added in self.sparse:
            g.scatter_add_(-1, ids, added.to(g.dtype))
        return g


def _exponentiate(terms: HeadLossTerms, h: Tensor, weight: Tensor, bias: Tensor | None,
                  has_tail: list[bool]) -> _ChunkLogits:
    """The chunk's logits, gathered where the terms need them, then exponentiated in place."""
    z = at_least_fp32(F.linear(h, weight, bias))  # [n, V]: the one buffer
    z_support = [z.gather(-1, t.ids) for t in terms.targets]  # [n, K] each
    label_ids = z_label = z_mean = None
    if terms.labels is not None:
        label_ids = torch.where(terms.labels != IGNORE, terms.labels, 0).long()[:, None]
        z_label = z.gather(-1, label_ids)[:, 0]
        z_mean = z.mean(-1) if terms.label_smoothing > 0 else None
    top = z.amax(-1)  # [n]
    tempered = {}  # made while z still exists
    for t, tail in zip(terms.targets, has_tail):
        T = t.temperature
        if tail and t.tail_logprob is None and T != 1 and T not in tempered:
            tempered[T] = (z - top[:, None]).div_(T).exp_()
    e = z.sub_(top[:, None]).exp_()  # [n, V], in place: z is gone from here on
    return _ChunkLogits(e, top, tempered, z_support, label_ids, z_label, z_mean)


def _student_tail(target: SparseTarget, logits: _ChunkLogits) -> _StudentTail:
    """The student's tail bin for `target`: logsumexp of its logits off the support, tempered
    as losses.sparse_kd_per_position does (fills logits.total when it sums e)."""
    T = target.temperature
    tail_mode = target.tail_logprob is not None
    on_tempered = not (tail_mode or T == 1)
    buffer = logits.tempered[T] if on_tempered else logits.e
    off_sum, kept = _off_support_sum(buffer, target.ids)
    no_tail = support_size(target) == logits.e.shape[1]
    entries = _support_entries(target)
    if not on_tempered and logits.total is None:  # positives only: as exact as e.sum(-1)
        logits.total = off_sum + torch.where(entries, kept, 0.0).sum(-1)
    log_tail = off_sum.log()
    logit = (logits.top + log_tail) / T if tail_mode else logits.top / T + log_tail
    # what sparse_kd_per_position's logsumexp gives over an all-LOG_ZERO row
    logit = torch.where(no_tail, LOG_ZERO / T if tail_mode else LOG_ZERO, logit)
    return _StudentTail(logit, no_tail, off_sum, kept, entries, on_tempered)


def _kd_term(terms: HeadLossTerms, target: SparseTarget, z_support: Tensor,
             tail: _StudentTail | None, coef: Tensor | None,
             gradient: _LogitGradient | None) -> Tensor:
    """One target's KD values [n] from its bins; adds d sum(coef * values) / d logits to
    `gradient` when there is one."""
    want_grad = gradient is not None
    leaves = [z_support.requires_grad_(want_grad)]
    if tail is not None:
        leaves.append(tail.logit.requires_grad_(want_grad))
    with torch.enable_grad():
        kd = kd_from_student_bins(leaves[0], None if tail is None else tail.logit,
                                  None if tail is None else tail.no_tail, target,
                                  loss=terms.loss, jsd_beta=terms.jsd_beta,
                                  skew_alpha=terms.skew_alpha)
    if want_grad:
        gradient.add_kd(target, torch.autograd.grad(kd, leaves, grad_outputs=coef.to(kd.dtype)),
                        tail)
    return kd.detach()


def _ce_term(terms: HeadLossTerms, logits: _ChunkLogits, coef: Tensor | None,
             gradient: _LogitGradient | None) -> Tensor:
    """Hard-label CE values [n] (0 where the label is ignored); adds its gradient to
    `gradient` when there is one."""
    eps = terms.label_smoothing
    keep = terms.labels != IGNORE
    if logits.total is None:
        logits.total = logits.e.sum(-1)
    lse = logits.top + logits.total.log()
    nll = lse - logits.z_label
    ce = nll if eps == 0 else (1 - eps) * nll - eps * (logits.z_mean - lse)
    if gradient is not None:
        c = torch.where(keep, coef.to(logits.e.dtype), 0.0)
        gradient.rate.add_(c / logits.total)
        gradient.sparse.append((logits.label_ids, (-(1 - eps) * c)[:, None]))
        if eps > 0:
            gradient.uniform = c * (eps / logits.e.shape[1])
    return torch.where(keep, ce, 0.0)


def _chunk(terms: HeadLossTerms, h: Tensor, weight: Tensor, bias: Tensor | None,
           coef: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(values [n, count], g [n, V] = d sum(coef * values) / d logits, or None without coef).

    h [n, d], weight [V, d] and bias [V] already in the compute dtype.
    """
    has_tail = [student_tail_needed(t, terms.loss) for t in terms.targets]
    logits = _exponentiate(terms, h, weight, bias, has_tail)
    n = logits.e.shape[0]
    gradient = None
    if coef is not None:
        gradient = _LogitGradient(logits.e.new_zeros(n),
                                  {T: logits.e.new_zeros(n) for T in logits.tempered})
    values, hard = [], torch.zeros(n, dtype=torch.bool, device=logits.e.device)
    for i, (t, z_support, needs_tail) in enumerate(zip(terms.targets, logits.z_support,
                                                       has_tail)):
        tail = _student_tail(t, logits) if needs_tail else None
        if tail is not None:
            hard |= ~tail.no_tail & (tail.off_sum < TINY_TAIL)
        values.append(_kd_term(terms, t, z_support, tail,
                               None if coef is None else coef[:, i], gradient))
    if terms.labels is not None:
        values.append(_ce_term(terms, logits, None if coef is None else coef[:, -1], gradient))
    values = torch.stack(values, -1)
    g = None if gradient is None else gradient.assemble(logits)
    logits.tempered.clear()
    if any(has_tail) and bool(hard.any()):  # (a host sync: only when a tail exists)
        _redo_exactly(terms, h, weight, bias, coef, hard.nonzero()[:, 0], values, g)
    return values, g


def _redo_exactly(terms, h, weight, bias, coef, rows, values, g) -> None:
    """Rows whose tail underflows: dense_terms on their own logits, written into values, g."""
    with torch.enable_grad():
        logits = at_least_fp32(F.linear(h[rows], weight, bias)).detach()
        logits.requires_grad_(g is not None)
        exact = dense_terms(logits, terms.rows(rows))
    values[rows] = exact.detach()
    if g is not None:
        g[rows] = torch.autograd.grad(exact, logits, coef[rows].to(exact.dtype))[0].to(g.dtype)


# ----------------------------------------------------------------------------- all chunks

def _compute_dtype(weight: Tensor) -> torch.dtype:
    """The lm_head matmul's dtype: autocast's when it is on (as F.linear would), else W's."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _head_pass(hidden: Tensor, weight: Tensor, bias: Tensor | None, terms: HeadLossTerms,
               coef: Tensor | None, chunk_size: int, need: tuple[bool, bool, bool],
               dtype: torch.dtype) -> tuple[Tensor, tuple]:
    """values [n, count] and, with coef [n, count], the gradients of sum(coef * values) w.r.t.
    (hidden, weight, bias), each only where `need` says (else None)."""
    n, V = hidden.shape[0], weight.shape[0]
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    values = torch.zeros(n, terms.count, dtype=wide, device=hidden.device)
    make = coef is not None
    grad_h = torch.empty_like(hidden) if make and need[0] else None  # every row gets written
    grad_w = None  # [V, d], from the first chunk's matmul (no [V, d] zero fill)
    grad_b = torch.zeros(V, dtype=wide, device=weight.device) if make and need[2] else None
    # explicit dtypes below: autocast would otherwise recast W (a [V, d] copy) per matmul
    with torch.autocast(weight.device.type, enabled=False):
        w = weight.to(dtype)  # [V, d]; the same tensor unless autocast is on
        b = None if bias is None else bias.to(dtype)
        for start in range(0, n, chunk_size):
            piece = slice(start, start + chunk_size)
            h = hidden[piece].to(dtype)  # [m, d]
            chunk_values, g = _chunk(terms.rows(piece), h, w, b,
                                     None if coef is None else coef[piece])
            values[piece] = chunk_values
            if g is None:
                continue
            if grad_b is not None:
                grad_b += g.sum(0)
            g = g.to(dtype)  # [m, V]
            if grad_h is not None:
                grad_h[piece] = g @ w
            if need[1]:
                if grad_w is None:
                    grad_w = (g.T @ h).to(weight.dtype)
                elif dtype == grad_w.dtype:
                    grad_w.addmm_(g.T, h)
                else:  # mixed precision: accumulate the chunks in the weight's dtype
                    grad_w += g.T @ h
            del g
    if make and need[1] and grad_w is None:  # no positions at all
        grad_w = torch.zeros_like(weight)
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return values, (grad_h, grad_w, grad_b)


def _common_factor(got: Tensor, expected: Tensor) -> float | None:
    """s with got == s * expected up to rounding, else None (one host sync)."""
    if got.numel() == 0:
        return 1.0  # no positions: the gradients are zeros whatever the factor
    expected = expected.to(got.dtype)
    norm = (expected * expected).sum()
    s = (got * expected).sum() / torch.where(norm > 0, norm, 1.0)
    scaled = s * expected
    tolerance = ULPS_OF_ROUNDING * torch.finfo(got.dtype).eps * scaled.abs().amax()
    ok, s = torch.stack([((got - scaled).abs().amax() <= tolerance).to(s.dtype), s]).tolist()
    return s if ok else None


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, expected_grad, terms, chunk_size):
        need = tuple(ctx.needs_input_grad[:3])
        ctx.dtype = _compute_dtype(weight)
        values, grads = _head_pass(hidden, weight, bias, terms, expected_grad, chunk_size,
                                   need, ctx.dtype)
        ctx.save_for_backward(hidden, weight, bias)
        ctx.terms, ctx.chunk_size, ctx.expected = terms, chunk_size, expected_grad
        ctx.grads = grads if expected_grad is not None else None
        return values

    @staticmethod
    def backward(ctx, grad_values):
        grads, ctx.grads = ctx.grads, None  # drop ctx's reference: autograd may reuse them
        if grads is not None:
            factor = _common_factor(grad_values, ctx.expected)
            if factor is not None:
                if factor != 1.0:
                    grads = tuple(None if g is None else g.mul_(factor) for g in grads)
                return (*grads, None, None, None)
            del grads  # a different gradient arrived: recompute with it
        hidden, weight, bias = ctx.saved_tensors
        _, grads = _head_pass(hidden, weight, bias, ctx.terms, grad_values, ctx.chunk_size,
                              tuple(ctx.needs_input_grad[:3]), ctx.dtype)
        return (*grads, None, None, None)


def check_head_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk_size: int,
                      hidden_shape: str) -> None:
    """hidden `hidden_shape` ([n, d] or [B, S, d]), weight [V, d], bias [V] or None."""
    if hidden.dim() != hidden_shape.count(",") + 1 or weight.dim() != 2 \
            or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"expected hidden {hidden_shape} and weight [V, d], found "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V]={tuple(weight.shape[:1])}, found {tuple(bias.shape)}")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, found {chunk_size!r}")


def fused_head_loss(hidden: Tensor, weight: Tensor, terms: HeadLossTerms, *,
                    bias: Tensor | None = None, expected_grad: Tensor | None = None,
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Per-position loss terms of logits = hidden @ weight.T + bias, chunk by chunk.

    hidden: [n, d] (the positions to compute); weight: [V, d]; bias: [V] or None.
    terms: what to compute (KD per target, then CE); returns [n, terms.count] fp32 (fp64 for
    fp64 inputs), equal in values and gradients to head_loss_terms.dense_terms on the full
    logits.
    expected_grad: [n, terms.count], the gradient the caller's loss will send back w.r.t. the
    result, up to one scalar factor; with it the backward costs nothing (module docstring).
    """
    check_head_inputs(hidden, weight, bias, chunk_size, "[n, d]")
    if terms.count == 0:
        raise ValueError("fused_head_loss needs a KD target, labels, or both; found neither")
    n = hidden.shape[0]
    for t in terms.targets:
        if t.ids.dim() != 2 or t.ids.shape[0] != n:
            raise ValueError(f"target rows must be [n={n}, K], found {tuple(t.ids.shape)}")
    if terms.labels is not None and terms.labels.shape != (n,):
        raise ValueError(f"labels must be [n={n}], found {tuple(terms.labels.shape)}")
    if expected_grad is not None and expected_grad.shape != (n, terms.count):
        raise ValueError(f"expected_grad must be [n, terms]={(n, terms.count)}, found "
                         f"{tuple(expected_grad.shape)}")
    track = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, weight, bias))
    if not track:
        values, _ = _head_pass(hidden, weight, bias, terms, None, chunk_size,
                               (False, False, False), _compute_dtype(weight))
        return values
    expected = None if expected_grad is None else expected_grad.detach()
    return _FusedHeadLoss.apply(hidden, weight, bias, expected, terms, chunk_size)
