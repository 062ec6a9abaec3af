"""In-memory form of one sample and its teacher signals (numpy only, no torch).

The writer takes these, the reader gives them back. Conventions (see FORMAT.md):
- `input_ids[t]` is token t; `loss_mask[t]` is True when token t is a training target
  (what Hugging Face writes as `labels[t] != -100`).
- a signal's per-position arrays at position t describe the teacher's distribution of
  token t+1 given tokens 0..t (the causal-LM logits at t).
- `text_spans` (stores with text, format 2.1): the sample's UTF-8 text and the byte span,
  special flag and role of every token (logitstore/text_spans.py).
- `tokenizations` (format 2.2): the same text cut by other tokenizers (logitstore/tokenized.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from logitstore.text_spans import SampleText
from logitstore.tokenized import Tokenized


@dataclass
class TopK:
    ids: np.ndarray  # [L, k] int; distinct within a position
    logprobs: np.ndarray  # [L, k] float; log p at T=1 over the full vocabulary
    tail_logprob: np.ndarray | None = None  # [L] float; log(1 - sum p); derived when None

    def tail(self) -> np.ndarray:
        """[L] log of the probability mass outside the k stored ids."""
        if self.tail_logprob is not None:
            return self.tail_logprob
        mass = 1.0 - np.exp(self.logprobs.astype(np.float64)).sum(axis=-1)
        return np.log(np.clip(mass, 1e-30, 1.0)).astype(np.float32)


@dataclass
class Sampled:
    """Ragged: position t owns entries offsets[t]:offsets[t+1]."""

    offsets: np.ndarray  # [L+1] int64, offsets[0] == 0
    ids: np.ndarray  # [E] int; distinct within a position
    counts: np.ndarray  # [E] int; draws of each id; sum per position == n_draws
    # [E] float; teacher log p at T=1 of each id. None: not stored (SampledSpec.logprobs
    # false); a writer of such a signal ignores them when given.
    logprobs: np.ndarray | None

    @property
    def num_positions(self) -> int:
        return len(self.offsets) - 1

    def position(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(ids, counts, logprobs or None when not stored) of position t."""
        a, b = int(self.offsets[t]), int(self.offsets[t + 1])
        return self.ids[a:b], self.counts[a:b], \
            None if self.logprobs is None else self.logprobs[a:b]

    @classmethod
    def from_lists(cls, ids: list, counts: list, logprobs: list | None) -> "Sampled":
        """Build from per-position lists (convenient in tests and small tools); logprobs
        None: a signal without log-probs."""
        lengths = [len(x) for x in ids]
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths)

        def flat(parts, dtype):
            return np.concatenate([np.asarray(p, dtype=dtype) for p in parts]) if parts else \
                np.zeros(0, dtype=dtype)

        return cls(offsets, flat(ids, np.int64), flat(counts, np.int64),
                   None if logprobs is None else flat(logprobs, np.float32))


@dataclass
class SignalData:
    topk: TopK | None = None
    sampled: Sampled | None = None
    hidden: np.ndarray | None = None  # [layers, d]
    attention: np.ndarray | None = None  # [layers, heads or 1, G, G]


@dataclass
class Sample:
    sample_id: str
    input_ids: np.ndarray  # [L] int
    loss_mask: np.ndarray  # [L] bool
    source: str = ""
    split: str = "train"
    tags: dict[str, Any] = field(default_factory=dict)
    signals: dict[str, SignalData] = field(default_factory=dict)
    # Its text and its tokens' byte spans: required by a store whose settings say `text`,
    # ignored by one that does not; a reader fills it from a store that has them.
    text_spans: SampleText | None = None
    # 2.2: its text cut by each extra tokenization {name: Tokenized} (logitstore/tokenized.py):
    # required for every tokenization a store's settings list; a reader fills those of the
    # signals it reads. A signal on a tokenization has its positions, not input_ids'.
    tokenizations: dict[str, Tokenized] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)
