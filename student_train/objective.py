"""The training objective as one nn.Module: student forward, chunked lm_head + KD + CE, alignment.

Why one module around the student: DDP and FSDP only see what runs inside the forward of the
module they wrap. Calling the student's decoder body and reading the lm_head weight inside
*this* forward keeps DDP's gradient hooks and FSDP's unsharding correct, and makes the learned
alignment projections parameters of the same module, so the optimizer, `save_state` and DDP all
handle them without special cases.

The forward returns loss *sums* (weighted numerators), never means. `denominators(batch)` gives
the matching weights from the batch alone, so the trainer can add them over every micro-batch
of an optimizer step and over every process *before* the forward passes, and divide each
micro-batch's sums by those totals: gradient accumulation and data parallelism then give exactly
the gradient of one large batch (a per-micro-batch mean would weight short batches too much).

The loss `loss_combine.combine` builds is linear in those sums, with coefficients fixed by the
denominators and weights: `token_sum_gradients` gives them once per optimizer step, and forward(...,
sum_grads=...) hands them to the fused lm_head loss, which then builds the lm_head and hidden
gradients while the logits exist instead of recomputing the chunks in backward. Backward
checks that the gradient arriving is that one (times the scale accelerate and the trainer
apply); any other use of the sums is recomputed exactly (fused_head_loss).

Positions: the student's hidden state at t predicts token t+1; the stored signal at t is the
teacher's distribution of token t+1. Position t is trained when labels[t+1] != -100 and t+1 does
not start a new packed sample (position_ids[t+1] == 0).

A student with another tokenizer (student_train/cross_batch.py builds its batches): a signal
whose plan has `cross_loss` carries `kd_mask` [B, S], the positions aligned with a teacher
position (or, with `inside_ids` / `inside_mask`, inside a teacher token: a conditioned
target, student_train/cross_inside.py); its KD is computed there only
(student_train/cross_terms.py: "pkl" through the vocabulary map as an ordinary sparse target
of the fused lm_head, "uld" apart) and averaged
over them (`denominators`' `kd_tokens/<name>`), while CE covers every trained position.
With several such signals (teachers of other tokenizers cover different positions) and
`mix_per_position`, a position's KD is the weighted mean over the signals that give it a
target (their weighted sum times W / the weight of those signals, W the total: plan_signals
makes W 1), and the KD term averages that over the positions any signal covers
(`kd_tokens_any`, loss_combine.py): where one teacher has no target the others' count fully,
instead of that position getting only their share. `signal_mixture` "confidence" weighs
each signal there also by the probability its target gives the actual next token (for a
student of the stores' tokenizer too: there every signal covers every position); "priority"
gives a position's whole KD weight to the first signal (in --signals order) that covers it
(for a student of the stores' tokenizer, where the first covers every position, it alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from student_train.alignment import HiddenStateAligner, attention_alignment_loss
from student_train.cross_terms import cross_head_values, cross_kd_masks
from student_train.cross_token_losses import project_topk_target
from student_train.fused_head_loss import DEFAULT_CHUNK_SIZE, fused_head_loss
from student_train.head_loss_terms import HeadLossTerms
from student_train.losses import IGNORE, build_sampled_target, build_topk_target

Tensor = torch.Tensor


@dataclass(frozen=True)
class SignalPlan:
    """How one stored signal enters the loss (weights already normalised per kind)."""

    name: str
    kd_weight: float = 0.0
    target: str | None = None  # "topk" | "sampled" | None: no per-token KD
    n_draws: int = 0
    sample_temperature: float = 1.0
    hidden_weight: float = 0.0  # share of the hidden-alignment term
    attention_weight: float = 0.0
    attention_layers: tuple[int, ...] = ()  # stored teacher layers of the attention grids
    layer_map: dict[int, int] = field(default_factory=dict)  # {student block: teacher layer}
    # A student with another tokenizer (student_train/cross_tokenizer.py): "pkl" (the top-k
    # projected through the vocabulary map) or "uld"; None: same tokenizer.
    cross_loss: str | None = None


@dataclass(frozen=True)
class LossSettings:
    loss: str = "kl"
    topk_mode: str = "tail"
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    attention_loss: str = "mse"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    mix_per_position: bool = True  # several cross-tokenizer signals (module docstring)
    signal_mixture: str = "weights"  # "confidence" / "priority": _mixture_scale
    inside_other_bin: bool = True  # inside-token targets keep E's mass (cross_inside.py)

    @classmethod
    def of(cls, cfg) -> "LossSettings":
        """The settings a resolved TrainConfig asks for."""
        return cls(loss=cfg.loss, topk_mode=cfg.topk_mode, jsd_beta=cfg.jsd_beta,
                   skew_alpha=cfg.skew_alpha, attention_loss=cfg.attention_loss,
                   chunk_size=cfg.lm_head_chunk, mix_per_position=cfg.mix_signals_per_position,
                   signal_mixture=cfg.signal_mixture, inside_other_bin=cfg.inside_other_bin)


# ----------------------------------------------------------------------------- batch geometry

def target_positions(batch: dict) -> Tensor:
    """[B, S] bool: position t is trained (its next token is a target of the same sample)."""
    labels, positions = batch["labels"], batch["position_ids"]
    real = batch["attention_mask"][:, 1:].bool()
    nxt = (labels[:, 1:] != IGNORE) & (positions[:, 1:] != 0) & real
    return torch.cat([nxt, torch.zeros_like(nxt[:, :1])], 1)


def label_probability(target, labels: Tensor) -> Tensor:
    """[n]: the probability a SparseTarget [n, K] gives labels [n] (0 off its support)."""
    hit = (target.ids == labels[:, None]) & target.valid
    return (target.logprobs.float().exp() * hit).sum(-1)


def shifted(x: Tensor, fill) -> Tensor:
    """x[:, t+1] at position t (the last position gets `fill`)."""
    return torch.cat([x[:, 1:], torch.full_like(x[:, :1], fill)], 1)


def segments(batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(row [n], start [n], length [n]) of the batch's samples, in sample_ids order.

    Taken from the batch (or a signal) when the stream gives them, else derived: a sample
    starts at each real token whose position id is 0 (one per row without packing).
    """
    for source in (batch, *batch.get("signals", {}).values()):
        if "sample_row" in source:
            return source["sample_row"].long(), source["sample_start"].long(), \
                source["sample_length"].long()
    real = batch["attention_mask"].bool()
    starts = (batch["position_ids"] == 0) & real  # [B, S]
    row, start = starts.nonzero(as_tuple=True)  # row-major = sample order
    owner = starts.reshape(-1).long().cumsum(0) - 1  # sample index of each token
    length = torch.bincount(owner[real.reshape(-1)], minlength=len(row))
    return row, start, length


def sample_groups(batch: dict, group_of_sample: Tensor) -> Tensor:
    """[B, S] long: the group (specialty) of the sample owning each token (0 on padding)."""
    row, start, length = segments(batch)
    B, S = batch["input_ids"].shape
    s = torch.arange(S, device=row.device)
    inside = (s >= start[:, None]) & (s < (start + length)[:, None])  # [n, S]
    groups = torch.zeros(B, S, dtype=torch.long, device=row.device)
    groups.index_put_((row[:, None].expand_as(inside)[inside], s.expand_as(inside)[inside]),
                      group_of_sample.long()[:, None].expand_as(inside)[inside])
    return groups


def denominators(batch: dict, n_groups: int = 1) -> dict[str, Tensor]:
    """Weights the forward's sums are divided by: per group token weight, sample weight; and
    per signal with a `kd_mask` (a student with another tokenizer), `kd_tokens/<name>`: the
    token weight of the positions that signal trains."""
    mask = target_positions(batch)
    w = shifted(batch["token_weights"].float(), 0.0) * mask  # weight of the predicted token
    groups = batch.get("token_groups")

    def per_group(weight: Tensor) -> Tensor:
        return (weight.sum().reshape(1) if groups is None else weight.new_zeros(n_groups)
                .index_add(0, shifted(groups, 0).reshape(-1), weight.reshape(-1)))

    row, start, length = segments(batch)
    sample_w = batch["token_weights"].float()[row, start] * (length > 0)
    out = {"tokens": per_group(w), "samples": sample_w.sum().reshape(1)}
    masks = [(name, signal["kd_mask"]) for name, signal in batch.get("signals", {}).items()
             if "kd_mask" in signal]
    for name, kd_mask in masks:
        out[f"kd_tokens/{name}"] = per_group(w * kd_mask.float())
    if len(masks) > 1:  # several signals' positions: the KD term's mean is over their union
        covered = torch.stack([m for _, m in masks]).any(0)
        out["kd_tokens_any"] = per_group(w * covered.float())
    return out


# ----------------------------------------------------------------------------- student views

def _crop(x: Tensor, row: Tensor, start: Tensor, L: int, square: bool = False) -> Tensor:
    """Per-sample right-padded views: [B, S, ...] -> [n, L, ...]; attention [B, H, S, S] ->
    [n, H, L, L] (square=True). A view, not a copy, when samples are whole rows at 0."""
    B, S = x.shape[0], x.shape[-1] if square else x.shape[1]
    if len(row) == B and bool((row == torch.arange(B, device=row.device)).all()) \
            and bool((start == 0).all()):
        return x[:, :, :L, :L] if square else x[:, :L]
    idx = (start[:, None] + torch.arange(L, device=x.device)).clamp_max(S - 1)  # [n, L]
    if square:  # advanced indices around a slice: the indexed dims come first
        return x[row[:, None, None], :, idx[:, :, None], idx[:, None, :]].permute(0, 3, 1, 2)
    return x[row[:, None], idx]


class _Cropped(Sequence):
    """Lazy per-layer crops, so only the mapped layers are ever cut out."""

    def __init__(self, states: Sequence[Tensor], crop):
        self.states, self.crop = states, crop

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i):
        return self.crop(self.states[i])


def packed_attention_mask(mask_4d: Tensor, eager: bool, dtype: torch.dtype) -> Tensor:
    """The stream's [B, 1, S, S] bool block mask, made causal, each query seeing at least
    itself (an all-masked row gives NaN in softmax, which backward spreads), in the form the
    attention implementation adds (eager: additive float) or takes (sdpa: bool)."""
    S = mask_4d.shape[-1]
    causal = torch.ones(S, S, dtype=torch.bool, device=mask_4d.device).tril()
    eye = torch.eye(S, dtype=torch.bool, device=mask_4d.device)
    allowed = (mask_4d.bool() & causal) | eye
    if not eager:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------- the module

class DistillationObjective(nn.Module):
    """student + alignment projections; forward(batch) -> loss sums (see module docstring)."""

    def __init__(self, student: nn.Module, plans: Sequence[SignalPlan], settings: LossSettings,
                 aligners: Sequence[tuple[str, HiddenStateAligner]] = (),
                 vocab_maps: dict | None = None):
        """vocab_maps: signal -> (teacher_to_student_first [Vt], exact [Vt]) numpy arrays of
        the signals whose cross_loss is "pkl"."""
        super().__init__()
        self.student = student
        self.plans = list(plans)
        self.settings = settings
        # A list, not a ModuleDict: signal names may hold '.', which module names may not.
        self.aligner_names = [name for name, _ in aligners]
        self.aligners = nn.ModuleList([aligner for _, aligner in aligners])
        self.kd_plans = [p for p in self.plans if p.target]
        self.attention_plans = [p for p in self.plans if p.attention_weight > 0]
        self.map_index = {}  # signal -> i of the non-persistent buffers vocab_map_{i}_*
        for i, (name, (first, exact)) in enumerate((vocab_maps or {}).items()):
            self.map_index[name] = i
            self.register_buffer(f"vocab_map_{i}_first", torch.as_tensor(first).long(),
                                 persistent=False)
            self.register_buffer(f"vocab_map_{i}_exact", torch.as_tensor(exact).bool(),
                                 persistent=False)

    def forward(self, batch: dict, temperature: float = 1.0, label_smoothing: float = 0.0,
                n_groups: int = 1, sum_grads: dict[str, Tensor] | None = None
                ) -> dict[str, Tensor]:
        """sum_grads: token_sum_gradients(...) of the loss the caller will build (optional;
        it makes the backward of the lm_head free, see the module docstring)."""
        need_hidden = len(self.aligners) > 0
        need_attention = len(self.attention_plans) > 0
        out, final = self._student_forward(batch, need_hidden, need_attention)
        sums = self._token_sums(batch, final, temperature, label_smoothing, n_groups,
                                sum_grads)
        if need_hidden or need_attention:
            sums.update(self._alignment_sums(batch, out, need_hidden, need_attention))
        return sums

    def _student_forward(self, batch, need_hidden, need_attention):
        body = self.student.get_decoder()  # the decoder stack: no [B, S, V] logits here
        mask = batch["attention_mask"]
        if "attention_mask_4d" in batch:  # packing: block-diagonal, samples never see each other
            eager = getattr(self.student.config, "_attn_implementation", "sdpa") == "eager"
            mask = packed_attention_mask(batch["attention_mask_4d"], eager, self.student.dtype)
        out = body(input_ids=batch["input_ids"], attention_mask=mask,
                   position_ids=batch["position_ids"], use_cache=False,
                   output_hidden_states=need_hidden, output_attentions=need_attention)
        return out, out.last_hidden_state  # [B, S, d]

    def _token_sums(self, batch, final, temperature, label_smoothing, n_groups, sum_grads):
        """Sums over trained positions of weight * (KD per signal, CE), per group."""
        B, S, d = final.shape
        mask = target_positions(batch)
        rows = mask.reshape(-1).nonzero().squeeze(-1)  # [n]: only trained positions are computed

        def pick(x: Tensor) -> Tensor:  # [B, S, ...] -> [n, ...]
            return x.reshape(B * S, *x.shape[2:]).index_select(0, rows)

        s = self.settings
        fused_plans = [p for p in self.kd_plans if p.cross_loss != "uld"]
        targets = HeadLossTerms(targets=tuple(  # built as [1, n, K] (the builders' [B, S, K])
            self._target(p, batch["signals"][p.name], lambda x: pick(x)[None], temperature)
            for p in fused_plans)).rows(0).targets
        terms = HeadLossTerms(targets=targets, labels=pick(shifted(batch["labels"], IGNORE)),
                              loss=s.loss, label_smoothing=label_smoothing,
                              jsd_beta=s.jsd_beta, skew_alpha=s.skew_alpha)
        w = pick(shifted(batch["token_weights"].float(), 0.0))  # [n]
        groups = (pick(shifted(batch["token_groups"], 0)) if "token_groups" in batch
                  else None)  # [n]
        kd_masks = cross_kd_masks(self.kd_plans, batch["signals"], pick)  # [n, n_kd] or None
        # positions no signal gives a KD target (another tokenizer's student): CE there
        # has the whole weight (combine's "ce_free" sum), not 1 - alpha of it
        uncovered = None if kd_masks is None else ~kd_masks.any(1)  # [n]
        expected = None
        if sum_grads is not None:  # d loss / d values[i, t] = w_i * d loss / d sums[g_i, t]
            of_group = torch.cat([sum_grads["kd"].T, sum_grads["ce"][:, None]], 1)  # [G, terms]
            if uncovered is not None and "ce_free" in sum_grads:
                free = sum_grads["ce_free"]  # [G]
                of_group = torch.cat([of_group, (of_group[:, -1] + free)[:, None]], 1)
            expected = of_group[0].expand(w.shape[0], -1) if groups is None \
                else of_group[groups]  # [n, terms (+1)]
            if uncovered is not None and "ce_free" in sum_grads:  # CE column: its own or
                expected = torch.cat([expected[:, :-2], torch.where(  # with ce_free's
                    uncovered, expected[:, -1], expected[:, -2])[:, None]], 1)
            expected = w[:, None] * expected
        def unit_targets():  # confidence reads the teacher's own (T = 1) probabilities
            return targets if temperature == 1.0 else HeadLossTerms(targets=tuple(
                self._target(p, batch["signals"][p.name], lambda x: pick(x)[None], 1.0)
                for p in fused_plans)).rows(0).targets

        mix = self._mixture_scale(kd_masks, unit_targets, terms.labels)  # [n, n_kd] or None
        if expected is not None and mix is not None:
            expected = torch.cat([expected[:, :len(self.kd_plans)] * mix,
                                  expected[:, len(self.kd_plans):]], 1)
        head = self.student.get_output_embeddings()
        if kd_masks is None and len(fused_plans) == len(self.kd_plans):
            values = fused_head_loss(pick(final), head.weight, terms, bias=head.bias,
                                     expected_grad=expected, chunk_size=s.chunk_size)
        else:  # a student with another tokenizer: masked KD columns, ULD outside the fusion
            values = cross_head_values(self.kd_plans, batch["signals"], pick, pick(final), head,
                                       terms, expected, kd_masks, temperature, s.chunk_size)
        if mix is not None:
            values = torch.cat([values[:, :len(self.kd_plans)] * mix,
                                values[:, len(self.kd_plans):]], 1)
        if uncovered is not None:  # one more column: CE where no KD target exists
            values = torch.cat([values, (values[:, -1] * uncovered)[:, None]], 1)
        weighted = values * w[:, None]
        if groups is not None:
            per_group = weighted.new_zeros(n_groups, weighted.shape[1]).index_add(0, groups,
                                                                                 weighted)
        else:
            per_group = weighted.sum(0, keepdim=True)  # [1, terms]
        n_kd = len(self.kd_plans)
        sums = {"kd": per_group[:, :n_kd].T, "ce": per_group[:, n_kd]}  # [n_kd, G], [G]
        if uncovered is not None:
            sums["ce_free"] = per_group[:, n_kd + 1]  # [G]
        return sums

    def _mixture_scale(self, kd_masks: Tensor | None, unit_targets, labels: Tensor
                       ) -> Tensor | None:
        """[n, n_kd] factors on the KD columns so that each position's KD is the mean over the
        signals giving it a target, weighted by w_s (signal_mixture "weights") or by
        w_s * c_s, c_s the probability signal s's target at T = 1 (`unit_targets()`) gives the
        position's next token ("confidence": the teacher that saw it coming counts more, as in
        Zhang et al.'s confidence-aware multi-teacher KD, with the training label as the
        ground truth): factor_s = W * c_s / sum over covering s' of w_s' * c_s' (c = 1 for
        "weights"; W the total weight), so the factors times the weights sum to W at every
        covered position. c_s is what the target holds: 0 for a label in its tail (outside
        the top-k or the mapped bins), at a position inside a teacher token the piece's
        share of the consistent mass (cross_inside.py: of C + E with the "other" bin, of C
        without); a floor of 1e-6 keeps a position no target saw
        coming at the plain weights; "priority": c_s = 1 for the first signal covering the
        position, 0 for the rest (a primary teacher, the others filling its gaps). None with
        fewer than two KD signals, or with the mixture off, or (weights) for a student of the
        stores' tokenizer, where every signal covers every position."""
        s = self.settings
        confidence = s.signal_mixture == "confidence"
        if len(self.kd_plans) < 2 or not s.mix_per_position or (
                kd_masks is None and s.signal_mixture == "weights"):
            return None
        device = labels.device
        w = torch.tensor([p.kd_weight for p in self.kd_plans], device=device)
        covers = (kd_masks.float() if kd_masks is not None
                  else torch.ones(labels.shape[0], len(w), device=device))  # [n, n_kd]
        c = torch.ones_like(covers)
        if confidence:
            targets = unit_targets()
            if len(targets) != len(self.kd_plans):
                raise ValueError(f"signal_mixture confidence needs a target over the student's "
                                 f"vocabulary for every KD signal (cross_loss pkl): found "
                                 f"{len(targets)} for {len(self.kd_plans)} signals (ULD has "
                                 f"none); use --cross-loss pkl or --signal-mixture weights")
            c = torch.stack([label_probability(t, labels) for t in targets], 1) + 1e-6
        elif s.signal_mixture == "priority":
            c = covers * (covers.cumsum(1) == 1)  # the first covering signal
        cover = (covers * w * c).sum(1, keepdim=True)  # [n, 1]
        return torch.where(cover > 0, w.sum() * c / cover.clamp_min(1e-30),
                           torch.ones_like(c))

    def _target(self, plan: SignalPlan, signal: dict, pick, temperature: float):
        """The plan's SparseTarget at the picked positions, fields [1, n, K]."""
        if plan.cross_loss == "pkl":
            i = self.map_index[plan.name]
            inside = {"conditioned_ids": pick(signal["inside_ids"]),  # cross_batch.py
                      "conditioned": pick(signal["inside_mask"])} if "inside_ids" in signal \
                else {}
            chain = {key: pick(signal[key]) for key in ("chain_entry", "chain_ids", "chain_logc")
                     if key in signal}
            return project_topk_target(pick(signal["topk_ids"]).long(),
                                       pick(signal["topk_logprobs"]).float(),
                                       getattr(self, f"vocab_map_{i}_first"),
                                       getattr(self, f"vocab_map_{i}_exact"),
                                       temperature=temperature, **inside, **chain,
                                       ends_in_other=self.settings.inside_other_bin).target
        if plan.target == "topk":
            return build_topk_target(pick(signal["topk_ids"]).long(),
                                     pick(signal["topk_logprobs"]).float(),
                                     temperature=temperature, mode=self.settings.topk_mode)
        logprobs = signal.get("sampled_logprobs")  # absent: a signal stored without them
        return build_sampled_target(pick(signal["sampled_ids"]).long(),
                                    pick(signal["sampled_counts"]),
                                    None if logprobs is None else pick(logprobs).float(),
                                    n_draws=plan.n_draws,
                                    sample_temperature=plan.sample_temperature,
                                    temperature=temperature)

    def _alignment_sums(self, batch, out, need_hidden, need_attention):
        """Per signal: sample-weighted sums of the hidden / attention alignment losses."""
        row, start, length = segments(batch)
        L = max(int(length.max()), 1) if len(length) else 1
        positions = torch.arange(L, device=row.device)
        real = positions[None] < length[:, None]  # [n, L]
        labels = _crop(batch["labels"], row, start, L)
        targets = (labels != IGNORE) & real
        sample_w = batch["token_weights"].float()[row, start]
        den = (sample_w * (length > 0)).sum()  # the aligners return means over this weight
        sums = {}
        if need_hidden:
            states = _Cropped(out.hidden_states[1:], lambda h: _crop(h, row, start, L))
            sums["hidden"] = torch.stack([
                aligner(states, batch["signals"][name]["hidden"], targets, real,
                        sample_weights=sample_w) * den
                for name, aligner in zip(self.aligner_names, self.aligners)])
        if need_attention:
            maps = _Cropped(out.attentions, lambda a: _crop(a, row, start, L, square=True))
            sums["attention"] = torch.stack([
                attention_alignment_loss(maps, batch["signals"][p.name]["attention"], length,
                                         p.layer_map, loss=self.settings.attention_loss,
                                         teacher_layers=p.attention_layers,
                                         sample_weights=sample_w) * den
                for p in self.attention_plans])
        return sums
