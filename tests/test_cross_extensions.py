"""Student tokens coarser than a teacher token counted in its bin (student_train/
cross_extensions.py): the target against the dense bin reference of
tests/reference_cross_losses.py (value and gradient, KL at T = 1), the cases it must leave
alone, and the extension table on tiny real tokenizers."""

from __future__ import annotations

import math

import pytest
import torch
from reference_cross_losses import extended_bins_kl
from tiny_tokenizers import CORPUS_A, CORPUS_B, byte_level_bpe, metaspace_bpe

from logitstore.toolkit.vocab_map import build_vocab_map
from student_train.cross_extensions import DENSE_SHARE, extension_table, logits_at
from student_train.cross_token_losses import mapped_kd_sum, project_topk_target
from student_train.losses import sparse_kd_per_position

VT, VS, K = 20, 30, 6


def rows(n: int, seed: int = 0):
    """(ids [n, K], log-probs [n, K]) of a random teacher; row 1 has two padding entries,
    row 2 is all padding."""
    g = torch.Generator().manual_seed(seed)
    logprobs, ids = (torch.randn(n, VT, generator=g, dtype=torch.float64) * 2.5) \
        .log_softmax(-1).topk(K, -1)
    if n > 2:
        ids[1, -1], logprobs[1, -2] = -1, -math.inf
        ids[2], logprobs[2] = -1, -math.inf
    return ids, logprobs


def a_pair(seed: int = 1):
    """(first [VT], parent {student id: teacher id} of the coarser student tokens, extensions
    (offsets, ids) as extension_table gives them): student ids 0..11 are first pieces
    (several teacher ids share some, two teacher ids unmapped), 12..29 extend a random
    teacher id, some of them one that is unmapped."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, 12, (VT,), generator=g)
    first[:2] = -1
    parent = {c: int(torch.randint(0, VT, (1,), generator=g)) for c in range(12, VS)}
    return first, parent, csr([sorted(c for c, p in parent.items() if p == t)
                               for t in range(VT)])


def csr(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.tensor([0] + [len(x) for x in lists]).cumsum(0)
    return offsets, torch.tensor([c for x in lists for c in x], dtype=torch.long)


def target(ids, logprobs, first, extensions, z, **kw):
    return project_topk_target(ids, logprobs, first, extensions=extensions,
                               student_scores=lambda i: z.detach().gather(-1, i), **kw)


@pytest.mark.parametrize("n", [1, 5])
def test_kl_equals_the_dense_bin_reference_in_value_and_gradient(n):
    ids, logprobs = rows(n)
    first, parent, table = a_pair()
    z = (torch.randn(n, VS, generator=torch.Generator().manual_seed(2),
                     dtype=torch.float64) * 2).requires_grad_()
    extended = target(ids, logprobs, first, table, z).target
    plain = project_topk_target(ids, logprobs, first).target
    assert int(extended.valid.sum()) > int(plain.valid.sum())  # some bins did grow
    got = sparse_kd_per_position(z, extended)
    want = []
    for row in range(n):
        known = {int(t): math.exp(float(lp)) for t, lp in zip(ids[row], logprobs[row])
                 if t >= 0 and lp > -math.inf}
        want.append(extended_bins_kl(z[row], known, max(0.0, 1 - sum(known.values())),
                                     first.tolist(), parent))
    want = torch.stack(want)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), z)[0],
                               torch.autograd.grad(want.sum(), z)[0], rtol=1e-7, atol=1e-10)
    if n > 2:  # the all-padding row: nothing to learn
        assert got[2].item() == 0.0


def test_the_chunked_sum_and_the_head_scores_take_it_as_any_target():
    ids, logprobs = rows(5)
    first, _, table = a_pair()
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(VS, 8, generator=g, dtype=torch.float64)
    z = hidden @ weight.T
    wide, bias = (torch.randn(200, 8, generator=g, dtype=torch.float64),
                  torch.randn(200, generator=g, dtype=torch.float64))
    assert 1 * DENSE_SHARE < 200 <= 7 * DENSE_SHARE
    for m in (1, 7):  # weight rows gathered (1 * DENSE_SHARE < 200), full logits (7 * ...)
        at = torch.randint(0, 200, (300, m), generator=g)
        h = torch.randn(300, 8, generator=g, dtype=torch.float64)
        torch.testing.assert_close(logits_at(h, wide, bias, at), (h @ wide.T + bias).gather(-1, at))
    mapped = project_topk_target(ids, logprobs, first, extensions=table,
                                 student_scores=lambda i: logits_at(hidden, weight, None, i))
    torch.testing.assert_close(mapped_kd_sum(z, mapped, chunk_size=2),
                               sparse_kd_per_position(z, mapped.target).sum())


def test_without_extensions_the_target_is_the_plain_one_bit_for_bit():
    ids, logprobs = rows(5)
    first, _, table = a_pair()
    z = torch.randn(5, VS, dtype=torch.float64)
    plain = project_topk_target(ids, logprobs, first).target
    none = target(ids, logprobs, first, csr([[] for _ in range(VT)]), z).target
    assert torch.equal(sparse_kd_per_position(z, plain), sparse_kd_per_position(z, none))
    assert torch.equal(plain.tail_logprob, none.tail_logprob)


def test_a_token_leading_a_bin_or_appended_by_a_chain_is_counted_once():
    # teacher 0 -> student 0, teacher 1 -> student 1; student 1 also "extends" teacher 0, and
    # student 2 extends teacher 0 and is the chain's student token at row 0
    ids = torch.tensor([[0, 1]])
    logprobs = torch.tensor([[0.5, 0.3]], dtype=torch.float64).log()
    first = torch.tensor([0, 1])
    table = csr([[1, 2], []])
    z = torch.zeros(1, 4, dtype=torch.float64)
    chain = {"chain_entry": torch.tensor([0]), "chain_ids": torch.tensor([2]),
             "chain_logc": torch.tensor([math.log(0.4)])}
    got = target(ids, logprobs, first, table, z, **chain).target
    kept = got.ids[got.valid].tolist()
    assert sorted(kept) == [0, 1, 2]
    mass = dict(zip(kept, got.logprobs[got.valid].exp().tolist()))
    assert mass == pytest.approx({0: 0.3, 1: 0.3, 2: 0.2})  # 0.5 * (1 - 0.4), 0.5 * 0.4


def test_conditioned_rows_take_no_extensions():
    ids, logprobs = rows(3)
    first, _, table = a_pair()
    z = torch.randn(3, VS, dtype=torch.float64)
    inside = {"conditioned": torch.tensor([True, False, False]),
              "conditioned_ids": torch.where(ids >= 0, ids % 5, -1)}
    got = target(ids, logprobs, first, table, z, **inside).target
    plain = project_topk_target(ids, logprobs, first, **inside).target
    torch.testing.assert_close(sparse_kd_per_position(z, got)[0],
                               sparse_kd_per_position(z, plain)[0])
    assert int(got.valid[1].sum()) > int(plain.valid[1].sum())  # row 1 did take some


def test_the_table_holds_every_coarser_student_token_up_to_the_cap():
    teacher = byte_level_bpe(CORPUS_A, 300, ("<pad>", "<s>", "</s>"))
    student = metaspace_bpe(CORPUS_B, 400, ("<unk>", "<bos>", "<eos>"))
    forward, reverse = build_vocab_map(teacher, student), build_vocab_map(student, teacher)
    offsets, ids, summary = extension_table(forward, reverse)
    want: dict[int, list[int]] = {}
    for c in range(reverse.teacher_vocab_size):
        pieces = reverse.pieces(c).tolist()
        if len(pieces) > 1 and c != forward.teacher_to_student_first[pieces[0]]:
            want.setdefault(pieces[0], []).append(c)
    got = {t: ids[offsets[t]:offsets[t + 1]].tolist() for t in range(len(offsets) - 1)
           if offsets[t + 1] > offsets[t]}
    assert got == {t: sorted(cs) for t, cs in want.items()}
    assert summary["extension_tokens"] == sum(map(len, want.values())) > 20
    assert summary["extended_teacher_tokens"] == len(want) and summary["cut_by_cap"] == 0
    small_offsets, small_ids, cut = extension_table(forward, reverse, cap=1)
    assert cut["cut_by_cap"] == summary["extension_tokens"] - cut["extension_tokens"] > 0
    assert small_ids.tolist() == [cs[0] for _, cs in sorted(got.items())]
    with pytest.raises(ValueError, match="reverse map"):
        extension_table(forward, forward)
