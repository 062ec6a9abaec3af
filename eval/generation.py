"""Scores of generated answers against references: ROUGE-1/2/L and BLEU.

The answers themselves come from lm-eval (`generate_until` tasks, greedy decoding, see
eval/tasks.py); this module only scores them, with the reference implementations:

- ROUGE-1/2/L: `rouge_score` F-measure with the Porter stemmer, averaged over samples,
  in [0, 1] (the convention of the ROUGE papers and of Hugging Face `evaluate`).
- BLEU: `sacrebleu.corpus_bleu` with its default 13a tokenisation, in [0, 100] (the
  convention of sacrebleu and of every MT paper since 2018). Corpus-level, not a mean of
  sentence BLEU: sentence BLEU is undefined/zero for most short answers.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
GENERATION_METRICS = (*ROUGE_TYPES, "bleu")


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over the pairs (stemmed), each in [0, 1]."""
    from rouge_score import rouge_scorer

    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # (target, prediction) order
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: total / len(predictions) for name, total in totals.items()}


def bleu_score(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing), 0-100."""
    import sacrebleu

    _check_pairs(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def generation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """{"rouge1", "rouge2", "rougeL", "bleu"}; {} when there is nothing to score."""
    if not predictions:
        return {}
    return {**rouge_scores(predictions, references),
            "bleu": bleu_score(predictions, references)}


def pairs_from_lm_eval_samples(samples: Iterable[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(predictions, references) from lm-eval's logged samples of a generate_until task.

    A sample's `filtered_resps` holds the answer after the task's filters (the raw answer
    when it has none); `target` is the reference, or a list of references of which the
    first is used (ROUGE here compares against a single reference).
    """
    predictions, references = [], []
    for sample in samples:
        answer = sample.get("filtered_resps", sample.get("resps"))
        while isinstance(answer, (list, tuple)):  # [[text]] or [text]
            answer = answer[0] if answer else ""
        target = sample.get("target")
        if isinstance(target, (list, tuple)):
            target = target[0] if target else None
        if target is None or not isinstance(answer, str):
            continue
        predictions.append(answer.strip())
        references.append(str(target).strip())
    return predictions, references


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no prediction/reference pairs to score")
