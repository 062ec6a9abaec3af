"""Straightforward references for the classifier distillation losses (no production code uses
these): plain Python loops over samples and classes, in float64 numpy, written from the
formulas (torch's documentation for CE with class weights; Hinton et al. 2015 for KL; Tian et
al. 2020 / RepDistiller's ContrastMemory + ContrastLoss for CRD, probabilities not logs).
"""

from __future__ import annotations

import math

import numpy as np


def _softmax(row: np.ndarray) -> np.ndarray:
    shifted = np.exp(row - row.max())
    return shifted / shifted.sum()


def ref_head_cross_entropy(logits, labels, class_weights=None, ignore_index=-100) -> float:
    """torch's weighted mean: sum_i w[y_i] * -log softmax(x_i)[y_i] / sum_i w[y_i]; 0 if empty."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
    numerator = denominator = 0.0
    for row, label in zip(logits, labels):
        if label == ignore_index:
            continue
        w = 1.0 if class_weights is None else float(class_weights[label])
        numerator += w * -math.log(_softmax(row)[label])
        denominator += w
    return numerator / denominator if denominator > 0 else 0.0


def ref_head_kl(student_logits, teacher_logits, temperature) -> float:
    """T^2 * (1/B) sum_b sum_c p_bc log(p_bc / q_bc), p = softmax(t/T), q = softmax(s/T)."""
    student = np.asarray(student_logits, np.float64)
    teacher = np.asarray(teacher_logits, np.float64)
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        p, q = _softmax(t_row / temperature), _softmax(s_row / temperature)
        total += sum(p_c * math.log(p_c / q_c) for p_c, q_c in zip(p, q) if p_c > 0)
    return temperature**2 * total / len(student)


def ref_feature_mse(student, teacher) -> float:
    student, teacher = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    squares = [(s - t) ** 2 for s_row, t_row in zip(student, teacher)
               for s, t in zip(s_row, t_row)]
    return sum(squares) / len(squares)


def ref_feature_cosine(student, teacher, eps=1e-8) -> float:
    student, teacher = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        dot = sum(s * t for s, t in zip(s_row, t_row))
        norm_s = max(math.sqrt(sum(s * s for s in s_row)), eps)
        norm_t = max(math.sqrt(sum(t * t for t in t_row)), eps)
        total += 1 - dot / (norm_s * norm_t)
    return total / len(student)


def ref_normalise(vector) -> np.ndarray:
    vector = np.asarray(vector, np.float64)
    return vector / math.sqrt(sum(v * v for v in vector))


def ref_momentum_update(bank, index, embeddings, momentum) -> np.ndarray:
    """A copy of bank with bank[i] = normalise(m * bank[i] + (1 - m) * v) for each (i, v)."""
    bank = np.array(bank, np.float64)
    for i, v in zip(index, np.asarray(embeddings, np.float64)):
        bank[i] = ref_normalise(momentum * bank[i] + (1 - momentum) * v)
    return bank


def ref_nce(scores, z, temperature, n_samples) -> float:
    """RepDistiller's ContrastLoss with eps = 0 on P = exp(scores / T) / Z ([B][k+1] scores)."""
    k = len(scores[0]) - 1
    noise = k / n_samples  # k * P_n, P_n = 1/N
    total = 0.0
    for row in scores:
        probs = [math.exp(s / temperature) / z for s in row]
        total += math.log(probs[0] / (probs[0] + noise))
        total += sum(math.log(noise / (p + noise)) for p in probs[1:])
    return -total / len(scores)


def ref_z(scores, temperature, n_samples) -> float:
    """Z = mean over the batch's [B][k+1] scores of exp(s / T), times N."""
    flat = [math.exp(s / temperature) for row in scores for s in row]
    return sum(flat) / len(flat) * n_samples


def ref_crd(v_s, v_t, student_bank, teacher_bank, contrast, temperature, n_samples,
            z_s=None, z_t=None) -> tuple[float, float, float]:
    """(loss, Z_s, Z_t): NCE of v_s against teacher_bank rows plus v_t against student_bank
    rows at the [B][k+1] contrast indices; Z from this batch when not given."""
    v_s, v_t = np.asarray(v_s, np.float64), np.asarray(v_t, np.float64)
    student_bank = np.asarray(student_bank, np.float64)
    teacher_bank = np.asarray(teacher_bank, np.float64)
    scores_s = [[float(teacher_bank[j] @ v_s[b]) for j in row] for b, row in enumerate(contrast)]
    scores_t = [[float(student_bank[j] @ v_t[b]) for j in row] for b, row in enumerate(contrast)]
    z_s = ref_z(scores_s, temperature, n_samples) if z_s is None else z_s
    z_t = ref_z(scores_t, temperature, n_samples) if z_t is None else z_t
    loss = (ref_nce(scores_s, z_s, temperature, n_samples)
            + ref_nce(scores_t, z_t, temperature, n_samples))
    return loss, z_s, z_t
