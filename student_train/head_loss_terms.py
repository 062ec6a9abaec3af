"""The per-position loss terms of the lm_head loss, and their definition on full logits.

`HeadLossTerms` says what to compute for n positions (one KD term per sparse teacher target,
then hard-label CE); `dense_terms` computes it from materialised [n, V] logits with losses.py's
per-position functions. fused_head_loss computes the same values and gradients without ever
holding more than one [chunk, V] buffer, and falls back on `dense_terms` for the rare rows
whose tail underflows; the tests use `dense_terms` as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from student_train.losses import SparseTarget, cross_entropy_per_position, sparse_kd_per_position

Tensor = torch.Tensor


@dataclass(frozen=True)
class HeadLossTerms:
    """The per-position loss terms: one KD term per target (in order), then CE if labels.

    targets: SparseTarget rows, fields [n, K]; labels: [n] long (-100 = ignored) or None.
    """

    targets: tuple[SparseTarget, ...] = ()
    labels: Tensor | None = None
    loss: str = "kl"
    label_smoothing: float = 0.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1

    @property
    def count(self) -> int:
        return len(self.targets) + (self.labels is not None)

    def rows(self, index) -> HeadLossTerms:
        """The same terms restricted to rows `index` (a slice or a long tensor)."""
        def pick(t: SparseTarget) -> SparseTarget:
            tail = None if t.tail_logprob is None else t.tail_logprob[index]
            return SparseTarget(t.ids[index], t.logprobs[index], t.valid[index], tail,
                                t.temperature)

        return replace(self, targets=tuple(pick(t) for t in self.targets),
                       labels=None if self.labels is None else self.labels[index])


def dense_terms(logits: Tensor, terms: HeadLossTerms) -> Tensor:
    """[n, V] logits -> [n, count] with losses.py's per-position functions (autograd-able)."""
    out = [sparse_kd_per_position(logits, t, loss=terms.loss, jsd_beta=terms.jsd_beta,
                                  skew_alpha=terms.skew_alpha) for t in terms.targets]
    if terms.labels is not None:
        out.append(cross_entropy_per_position(logits, terms.labels,
                                              label_smoothing=terms.label_smoothing))
    return torch.stack(out, -1)
