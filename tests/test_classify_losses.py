"""Classifier losses (CE, KL, feature MSE/cosine), lazy projections and the combined objective
against the loop references in reference_classify_losses.py and torch's own semantics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference_classify_losses import (ref_feature_cosine, ref_feature_mse,
                                       ref_head_cross_entropy, ref_head_kl)
from student_train.classify_losses import (cross_entropy_over_heads, feature_cosine,
                                           feature_loss_over_parts, feature_mse,
                                           head_cross_entropy, head_kl, kl_over_heads)
from student_train.classify_objective import ClassifyLossWeights, ClassifyObjective
from student_train.crd import CRDConfig
from student_train.feature_projections import LazyProjections

F64 = torch.float64
SHAPES = [(1, 1), (1, 5), (7, 1), (7, 3), (16, 12)]


def logits_and_labels(batch, classes, seed=0, ignored=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, classes, generator=g, dtype=F64) * 2).requires_grad_()
    labels = torch.randint(0, classes, (batch,), generator=g)
    labels[:ignored] = -100
    return logits, labels


# ----------------------------------------------------------------------------- CE

@pytest.mark.parametrize("batch,classes", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_reference_and_torch(batch, classes, weighted):
    logits, labels = logits_and_labels(batch, classes, seed=batch * 31 + classes,
                                       ignored=batch // 3)
    weights = (torch.rand(classes, generator=torch.Generator().manual_seed(5), dtype=F64) + 0.1
               if weighted else None)
    got = head_cross_entropy(logits, labels, class_weights=weights)
    ref = ref_head_cross_entropy(logits.detach().numpy(), labels.numpy(),
                                 None if weights is None else weights.numpy())
    assert got.item() == pytest.approx(ref, rel=1e-12, abs=1e-12)
    torch_value = F.cross_entropy(logits, labels, weight=weights, ignore_index=-100)
    torch.testing.assert_close(got, torch_value)  # torch's class-weight semantics, exactly
    got.backward()
    mine = logits.grad.clone()
    logits.grad = None
    torch_value.backward()
    torch.testing.assert_close(mine, logits.grad)


def test_cross_entropy_all_ignored_is_zero_with_zero_gradient():
    logits, _ = logits_and_labels(4, 3)
    labels = torch.full((4,), -100)
    loss = head_cross_entropy(logits, labels, class_weights=torch.ones(3, dtype=F64))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert torch.isnan(F.cross_entropy(logits.detach(), labels))  # what torch would have given


def test_cross_entropy_refuses_labels_out_of_range_and_bad_weights():
    logits, _ = logits_and_labels(3, 4)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\).*from 1 to 4"):
        head_cross_entropy(logits, torch.tensor([1, 4, 2]))
    with pytest.raises(ValueError, match="class_weights must be"):
        head_cross_entropy(logits, torch.tensor([1, 2, 3]), class_weights=torch.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        head_cross_entropy(logits, torch.tensor([1, 2, 3]), class_weights=-torch.ones(4))


def test_cross_entropy_over_heads_weights_each_head():
    a_logits, a_labels = logits_and_labels(5, 3, seed=1)
    b_logits, b_labels = logits_and_labels(5, 7, seed=2, ignored=2)
    class_weights = {"b": torch.linspace(0.5, 2.0, 7, dtype=F64)}
    total, per_head = cross_entropy_over_heads({"a": a_logits, "b": b_logits},
                                               {"a": a_labels, "b": b_labels},
                                               class_weights=class_weights,
                                               head_weights={"a": 0.25})
    ref_a = ref_head_cross_entropy(a_logits.detach().numpy(), a_labels.numpy())
    ref_b = ref_head_cross_entropy(b_logits.detach().numpy(), b_labels.numpy(),
                                   class_weights["b"].numpy())
    assert per_head["a"].item() == pytest.approx(ref_a, rel=1e-12)
    assert per_head["b"].item() == pytest.approx(ref_b, rel=1e-12)
    assert total.item() == pytest.approx(0.25 * ref_a + ref_b, rel=1e-12)
    with pytest.raises(ValueError, match="class_weights name heads"):
        cross_entropy_over_heads({"a": a_logits}, {"a": a_labels},
                                 class_weights={"c": torch.ones(3)})


# ----------------------------------------------------------------------------- KL

@pytest.mark.parametrize("batch,classes", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 3.19])
def test_kl_matches_reference(batch, classes, temperature):
    student, _ = logits_and_labels(batch, classes, seed=batch + 7 * classes)
    teacher = torch.randn(batch, classes, dtype=F64, generator=torch.Generator().manual_seed(3))
    teacher.requires_grad_()  # a teacher tensor that requires grad still receives none
    got = head_kl(student, teacher, temperature=temperature)
    ref = ref_head_kl(student.detach().numpy(), teacher.detach().numpy(), temperature)
    assert got.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    got.backward()
    assert teacher.grad is None and student.grad is not None
    if classes == 1:  # one class: both distributions are [1], nothing to learn
        assert got.item() == 0.0 and torch.equal(student.grad, torch.zeros_like(student))


def test_kl_temperature_scaling_and_zero_at_teacher():
    student, _ = logits_and_labels(6, 4, seed=9)
    teacher = student.detach().clone()
    assert head_kl(student, teacher, temperature=2.0).item() == pytest.approx(0.0, abs=1e-12)
    teacher = teacher + torch.randn_like(teacher)
    t1 = head_kl(student, teacher, temperature=1.0)
    t4 = head_kl(student, teacher, temperature=4.0)
    assert t1.item() != pytest.approx(t4.item())
    # torch's batchmean KL of the softened distributions, times T^2 (Hinton's scaling)
    torch_t4 = 16 * F.kl_div(F.log_softmax(student / 4, -1), F.log_softmax(teacher / 4, -1),
                             log_target=True, reduction="batchmean")
    torch.testing.assert_close(t4, torch_t4)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        head_kl(student, teacher, temperature=0.0)


def test_kl_over_heads_per_head_temperature_and_weights():
    sa, _ = logits_and_labels(4, 3, seed=1)
    sb, _ = logits_and_labels(4, 5, seed=2)
    ta, tb = torch.randn(4, 3, dtype=F64), torch.randn(4, 5, dtype=F64)
    total, per_head = kl_over_heads({"a": sa, "b": sb}, {"a": ta, "b": tb},
                                    temperature={"a": 1.0, "b": 2.5}, head_weights={"b": 3.0})
    ref_a = ref_head_kl(sa.detach().numpy(), ta.numpy(), 1.0)
    ref_b = ref_head_kl(sb.detach().numpy(), tb.numpy(), 2.5)
    assert total.item() == pytest.approx(ref_a + 3.0 * ref_b, rel=1e-10)
    assert per_head["b"].item() == pytest.approx(ref_b, rel=1e-10)
    with pytest.raises(ValueError, match="same ones"):
        kl_over_heads({"a": sa}, {"b": tb})


# ----------------------------------------------------------------------------- features

@pytest.mark.parametrize("batch,dim", [(1, 1), (1, 8), (5, 3), (12, 32)])
def test_feature_losses_match_reference(batch, dim):
    g = torch.Generator().manual_seed(batch * dim)
    student = torch.randn(batch, dim, generator=g, dtype=F64, requires_grad=True)
    teacher = torch.randn(batch, dim, generator=g, dtype=F64, requires_grad=True)
    mse, cos = feature_mse(student, teacher), feature_cosine(student, teacher)
    assert mse.item() == pytest.approx(ref_feature_mse(student.detach(), teacher.detach()),
                                       rel=1e-12)
    assert cos.item() == pytest.approx(ref_feature_cosine(student.detach(), teacher.detach()),
                                       rel=1e-10, abs=1e-12)
    torch.testing.assert_close(mse, F.mse_loss(student, teacher))
    torch.testing.assert_close(cos, (1 - F.cosine_similarity(student, teacher)).mean())
    (mse + cos).backward()
    assert teacher.grad is None and torch.isfinite(student.grad).all()


def test_cosine_of_a_zero_vector_is_finite():
    student = torch.zeros(2, 4, dtype=F64, requires_grad=True)
    loss = feature_cosine(student, torch.ones(2, 4, dtype=F64))
    assert loss.item() == 1.0
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_feature_loss_over_parts_sums_weighted_parts():
    g = torch.Generator().manual_seed(0)
    student = {"img": torch.randn(3, 4, generator=g), "txt": torch.randn(3, 2, generator=g)}
    teacher = {"img": torch.randn(3, 4, generator=g), "txt": torch.randn(3, 2, generator=g),
               "fused": torch.randn(3, 8, generator=g)}
    total, per_part = feature_loss_over_parts("mse", student, teacher, part_weights={"txt": 2.0})
    expected = (ref_feature_mse(student["img"], teacher["img"])
                + 2.0 * ref_feature_mse(student["txt"], teacher["txt"]))
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert set(per_part) == {"img", "txt"}
    with pytest.raises(ValueError, match="have no teacher features"):
        feature_loss_over_parts("cos", {"other": student["img"]}, teacher)
    with pytest.raises(ValueError, match="project the student"):
        feature_mse(student["txt"], teacher["img"])


# ----------------------------------------------------------------------------- projections

def features(seed=0, batch=4, widths=(("img", 6, 10), ("txt", 3, 5))):
    g = torch.Generator().manual_seed(seed)
    student = {p: torch.randn(batch, ds, generator=g) for p, ds, _ in widths}
    teacher = {p: torch.randn(batch, dt, generator=g) for p, _, dt in widths}
    return student, teacher


def test_projections_refuse_use_before_materialize():
    projections = LazyProjections(["img", "txt"])
    student, teacher = features()
    assert list(projections.parameters()) == []
    with pytest.raises(ValueError, match="before materialize"):
        projections(student)
    projections.materialize(student, teacher)
    out = projections(student)
    assert {p: tuple(v.shape) for p, v in out.items()} == {"img": (4, 10), "txt": (4, 5)}
    assert projections.widths() == {"img": (6, 10), "txt": (3, 5)}


def test_projections_train_and_reject_changed_widths():
    projections = LazyProjections(["img", "txt"])
    student, teacher = features()
    projections.materialize(student, teacher)
    projections.materialize(*features(seed=1))  # same widths: nothing changes
    optimizer = torch.optim.SGD(projections.parameters(), lr=0.1)
    before = projections.layers["img"].weight.detach().clone()
    total, _ = feature_loss_over_parts("mse", projections(student), teacher)
    total.backward()
    optimizer.step()
    assert not torch.equal(before, projections.layers["img"].weight)
    with pytest.raises(ValueError, match="already exist with widths"):
        projections.materialize(*features(widths=(("img", 7, 10), ("txt", 3, 5))))
    with pytest.raises(ValueError, match="lack parts"):
        LazyProjections(["img", "other"]).materialize(student, teacher)


@pytest.mark.parametrize("materialize_first", [True, False])
def test_projections_state_dict_round_trip_into_a_fresh_module(materialize_first):
    torch.manual_seed(0)
    projections = LazyProjections(["img", "txt"])
    student, teacher = features()
    projections.materialize(student, teacher)
    expected = projections(student)
    state = projections.state_dict()
    assert sorted(state) == ["layers.img.bias", "layers.img.weight", "layers.txt.bias",
                             "layers.txt.weight"]
    torch.manual_seed(1)  # a different init: only the load can make the outputs equal
    fresh = LazyProjections(["img", "txt"])
    if materialize_first:
        fresh.materialize(student, teacher)
    fresh.load_state_dict(state)
    for part, value in fresh(student).items():
        torch.testing.assert_close(value, expected[part], rtol=0, atol=0)


# ----------------------------------------------------------------------------- objective

def objective_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    student_logits = {"mod": torch.randn(6, 3, generator=g, requires_grad=True),
                      "loc": torch.randn(6, 5, generator=g, requires_grad=True)}
    teacher_logits = {"mod": torch.randn(6, 3, generator=g), "loc": torch.randn(6, 5, generator=g)}
    labels = {"mod": torch.randint(0, 3, (6,), generator=g),
              "loc": torch.randint(0, 5, (6,), generator=g)}
    student_feats = {"img": torch.randn(6, 4, generator=g, requires_grad=True),
                     "fused": torch.randn(6, 8, generator=g, requires_grad=True)}
    teacher_feats = {"img": torch.randn(6, 7, generator=g), "fused": torch.randn(6, 9, generator=g)}
    return dict(student_logits=student_logits, teacher_logits=teacher_logits, labels=labels,
                student_features=student_feats, teacher_features=teacher_feats,
                sample_index=torch.arange(6) * 3)


def make_objective(**weights):
    return ClassifyObjective(ClassifyLossWeights(**weights), heads=["mod", "loc"],
                             temperature=2.0, feature_parts=["img"], crd_part="fused",
                             crd_config=CRDConfig(embed_dim=4, k_negatives=5), n_samples=20)


def test_objective_total_is_the_weighted_sum_of_its_terms():
    inputs = objective_inputs()
    objective = make_objective(ce=1.0, kl=0.5, mse=3.0, cos=0.25, crd=2.0)
    with pytest.raises(ValueError, match="before materialize"):
        objective(**inputs)
    objective.materialize(inputs["student_features"], inputs["teacher_features"])
    total, terms = objective(**inputs, generator=torch.Generator().manual_seed(0))
    expected = (terms["ce"] + 0.5 * terms["kl"] + 3.0 * terms["mse"] + 0.25 * terms["cos"]
                + 2.0 * terms["crd"])
    torch.testing.assert_close(total.detach(), expected)
    torch.testing.assert_close(terms["total"], expected)
    ce, _ = cross_entropy_over_heads(inputs["student_logits"], inputs["labels"])
    torch.testing.assert_close(terms["ce"], ce.detach())
    assert {"ce/mod", "kl/loc", "mse/img", "cos/img"} <= set(terms)
    assert all(not v.requires_grad for v in terms.values())
    total.backward()
    assert inputs["student_logits"]["mod"].grad is not None
    assert objective.projections.layers["img"].weight.grad is not None
    assert objective.crd.embed_student.weight.grad is not None


def test_objective_skips_zero_weight_terms_and_their_inputs():
    inputs = objective_inputs()
    objective = make_objective(ce=1.0, kl=0.0)
    assert objective.projections is None and objective.materialized
    total, terms = objective(student_logits=inputs["student_logits"], labels=inputs["labels"])
    assert set(terms) == {"ce", "ce/mod", "ce/loc", "total"}
    kl_only = make_objective(ce=0.0, kl=1.0)
    with pytest.raises(ValueError, match=r"need \['teacher_logits'\]"):
        kl_only(student_logits=inputs["student_logits"], labels=inputs["labels"])
    with pytest.raises(ValueError, match="at least one loss weight"):
        ClassifyLossWeights(ce=0.0)
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        ClassifyLossWeights(kl=-1.0)
    with pytest.raises(ValueError, match="need feature_parts"):
        ClassifyObjective(ClassifyLossWeights(mse=1.0), heads=["mod"])
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ClassifyObjective(ClassifyLossWeights(kl=1.0), heads=["mod"], temperature=-1.0)
    with pytest.raises(ValueError, match=r"class_weights name heads \['other'\]"):
        ClassifyObjective(ClassifyLossWeights(), heads=["mod"], class_weights={"other": [1.0]})
    with pytest.raises(ValueError, match="k_negatives must be"):
        ClassifyObjective(ClassifyLossWeights(crd=1.0), heads=["mod"], crd_part="fused",
                          crd_config=CRDConfig(k_negatives=50), n_samples=20)


def test_objective_state_dict_round_trip_reproduces_the_loss():
    inputs = objective_inputs()
    torch.manual_seed(0)
    objective = make_objective(ce=1.0, kl=1.0, mse=1.0, crd=1.0)
    objective.materialize(inputs["student_features"], inputs["teacher_features"])
    objective(**inputs, generator=torch.Generator().manual_seed(1))  # moves the banks, sets Z
    state = {k: v.clone() for k, v in objective.state_dict().items()}
    expected, _ = objective(**inputs, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    fresh = make_objective(ce=1.0, kl=1.0, mse=1.0, crd=1.0)
    fresh.materialize(inputs["student_features"], inputs["teacher_features"])
    fresh.load_state_dict(state)
    got, _ = fresh(**inputs, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
