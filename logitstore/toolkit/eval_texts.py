"""The inputs of `logitstore decontaminate`: evaluation texts, and the store's tokenizer.

`eval_sets(entries)` turns each `--against` entry into an `EvalSet` of `EvalItem`s:

- a JSONL file (any name ending in .jsonl or naming an existing file): one item per record,
  its texts = the string values of the fields that the record formats of
  `logitstore.toolkit.record_formats` render (question, options/choices, answer, opa..ope,
  instruction/input/output, prompt/completion, text, messages' contents) plus the fields
  distill-eval's own tasks use (`reference`) and `context` (PubMedQA); lists and objects in
  those fields are searched for strings (ARC-style choices, option dicts);
- a bundled task name (`medmcq_mini`, `medgen_mini`: logitstore.toolkit.eval_tasks): the
  JSONL files its definition reads, as above;
- any other name: an lm-eval task or group, its evaluation documents loaded by lm-eval; an
  item's texts are lm-eval's own renderings: `doc_to_text`, the choices and the target
  text. Offline (HF_HUB_OFFLINE, or the hub does not answer) only the local datasets cache
  is read; a task whose data is not there is refused saying how to get it.

`store_decoder(settings, tokenizer)` loads the tokenizer the store was written with (the
`--tokenizer` path, else the store's recorded `tokenizer_name`), refuses one whose
fingerprint differs from the store's, and returns a batch decoder of token ids to text.
Every problem is a LogitStoreError of one paragraph, raised before any store data is read.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from logitstore.decontaminate import EvalItem, EvalSet
from logitstore.errors import LogitStoreError
from logitstore.toolkit.eval_tasks import bundled_task_data, bundled_tasks, lm_eval_tasks
from logitstore.toolkit.hub_probe import env_flag_set, probe_hub
from logitstore.toolkit.record_formats import FORMATS

# The fields whose text an evaluation record shows a model: what the record formats render,
# plus `reference` (distill-eval's generation sets) and `context` (PubMedQA).
TEXT_FIELDS = tuple(sorted({f for fmt in FORMATS.values() for f in fmt.fields} |
                           {"reference", "context"}))
ID_FIELDS = ("id", "qid", "question_id", "doc_id")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def eval_sets(entries: Sequence[str]) -> list[EvalSet]:
    """One EvalSet per `--against` entry (see the module docstring), in the order given."""
    if not entries:
        raise LogitStoreError("no evaluation data: pass --against FILE.jsonl or a task name "
                              f"(bundled: {', '.join(bundled_tasks())}; or an lm-eval task)")
    names = list(entries)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LogitStoreError(f"--against lists {', '.join(repeated)} more than once; give "
                              "each evaluation file or task once")
    return [_eval_set(entry) for entry in names]


def _eval_set(entry: str) -> EvalSet:
    path = Path(entry).expanduser()
    if entry.endswith(".jsonl") or os.sep in entry or path.exists():
        items = list(jsonl_items(path, entry))
    elif entry in bundled_tasks():
        items = [item for data in bundled_task_data(entry) for item in jsonl_items(data, entry)]
    else:
        items = lm_eval_items(entry)
    if not items:
        raise LogitStoreError(f"evaluation set {entry} holds no text to check: expected "
                              f"records with some of the fields {', '.join(TEXT_FIELDS)}")
    return EvalSet(entry, items)


def jsonl_items(path: Path, name: str) -> Iterable[EvalItem]:
    """The items of a JSONL evaluation file (records without text in TEXT_FIELDS skipped)."""
    if not path.is_file():
        raise LogitStoreError(f"evaluation file {path} does not exist; --against takes a JSONL "
                              f"file, a bundled task ({', '.join(bundled_tasks())}) or an "
                              "lm-eval task name")
    try:
        with path.open(encoding="utf-8") as fh:
            lines = list(enumerate(fh, start=1))
    except (OSError, UnicodeDecodeError) as err:
        raise LogitStoreError(f"cannot read evaluation file {path}: {err}") from None
    for number, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LogitStoreError(f"evaluation file {path}, line {number}: not JSON ({err}); "
                                  "expected one JSON object per line") from None
        if not isinstance(record, dict):
            raise LogitStoreError(f"evaluation file {path}, line {number}: expected a JSON "
                                  f"object, found {type(record).__name__}")
        texts = [t for field in TEXT_FIELDS if field in record for t in strings_in(record[field])]
        if texts:
            label = next((str(record[f]) for f in ID_FIELDS if record.get(f) is not None),
                         f"line {number}")
            yield EvalItem(name, label, tuple(texts))


def strings_in(value: Any) -> list[str]:
    """Every string inside `value` (itself, list items, object values, recursively)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in strings_in(v)]
    return []


# ----------------------------------------------------------------------------- lm-eval


def lm_eval_items(name: str) -> list[EvalItem]:
    """The evaluation documents of the lm-eval task or group `name` as EvalItems."""
    offline = _go_offline_if_unreachable()
    try:
        tasks = lm_eval_tasks(name)
    except Exception as exc:  # datasets/hub errors of every kind: data not to be had here
        raise LogitStoreError(_not_cached(name, exc, offline)) from None
    if tasks is None:
        raise LogitStoreError(
            f"unknown evaluation set {name!r}: not a file, not a bundled task "
            f"({', '.join(bundled_tasks())}) and not an lm-eval task or group. Pass a JSONL "
            "file path (ending in .jsonl) or a task name as `lm_eval --tasks list` shows it")
    items = []
    for task_name, task in tasks.items():
        for number, doc in enumerate(task.eval_docs):
            texts = _lm_eval_texts(task, doc)
            if texts:
                items.append(EvalItem(name, f"{task_name}#{number}", tuple(texts)))
    return items


def _lm_eval_texts(task, doc) -> list[str]:
    """What lm-eval shows a model for `doc`: its prompt, its choices and its target text."""
    texts = []
    for render in (task.doc_to_text, task.doc_to_target):
        try:
            texts += strings_in(render(doc))
        except Exception:  # a task without that rendering (e.g. no target for generation)
            continue
    if hasattr(task, "doc_to_choice"):
        try:
            texts += strings_in(task.doc_to_choice(doc))
        except Exception:  # not a multiple-choice task
            pass
    return texts


def _go_offline_if_unreachable() -> str | None:
    """Why the hub is offline (the user's variables, or no answer), after putting the
    Hugging Face libraries in offline mode so a missing dataset fails at once; None when
    the hub is reachable."""
    user = [v for v in _OFFLINE_VARS if env_flag_set(os.environ.get(v))]
    if user:
        return f"{'/'.join(user)} set"
    why = probe_hub(3.0)
    if why is None:
        return None
    os.environ.update(dict.fromkeys(_OFFLINE_VARS, "1"))
    for module, names in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        loaded = sys.modules.get(module)  # these read the variables once, at import
        for attr in names if loaded is not None else ():
            setattr(loaded, attr, True)
    return why


def _not_cached(name: str, exc: BaseException, offline: str | None) -> str:
    cause = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    where = (f"the hub is offline ({offline}), so only the local datasets cache was searched"
             if offline else "the hub was tried too")
    return (f"the documents of lm-eval task {name!r} could not be loaded ({cause}); {where}. "
            f"To check against it, load it once on a machine with internet (`lm_eval --tasks "
            f"{name} --limit 1 ...` or datasets.load_dataset) and copy the Hugging Face cache "
            "(HF_HOME) here, or write its documents to a JSONL file (question/choices/answer, "
            "prompt/reference or text fields) and pass that file to --against")


# ----------------------------------------------------------------------------- tokenizer


def store_decoder(settings, tokenizer: str | None) -> Callable[[list[list[int]]], list[str]]:
    """Batch decoder (token id lists -> texts, special tokens dropped) of the tokenizer at
    `tokenizer` (a tokenizer.json file, a model directory or a hub id), else of the store's
    recorded `tokenizer_name`; LogitStoreError when it cannot be loaded or is not the
    tokenizer the store was written with (fingerprints differ)."""
    from logitstore.toolkit.tokenizer_identity import tokenizer_fingerprint

    source = tokenizer or settings.tokenizer_name
    if not source:
        raise LogitStoreError("the store records no tokenizer name: pass --tokenizer PATH (a "
                              "tokenizer.json file or the teacher's model directory)")
    loaded = _load_tokenizer(source, given=tokenizer is not None)
    found = tokenizer_fingerprint(loaded)
    if found != settings.tokenizer_fingerprint:
        raise LogitStoreError(
            f"tokenizer mismatch: the store was written with tokenizer "
            f"{settings.tokenizer_name or '?'} (fingerprint {settings.tokenizer_fingerprint[:16]}"
            f"...), the tokenizer at {source} has fingerprint {found[:16]}...: its decoding of "
            "the stored token ids would be other text. Pass --tokenizer with the teacher's "
            "tokenizer (its tokenizer.json or model directory)")
    backend = getattr(loaded, "backend_tokenizer", None)
    if backend is not None:
        return lambda batch: backend.decode_batch(batch, skip_special_tokens=True)
    return lambda batch: loaded.batch_decode(batch, skip_special_tokens=True)


def _load_tokenizer(source: str, *, given: bool):
    from logitstore.toolkit.hf import load_tokenizer

    if Path(source).is_file():
        from transformers import PreTrainedTokenizerFast

        try:
            return PreTrainedTokenizerFast(tokenizer_file=source)
        except Exception as err:  # tokenizers raises a bare Exception for unreadable files
            raise LogitStoreError(f"{source} is not a tokenizer file ({err}); expected a "
                                  "tokenizer.json (Hugging Face tokenizers format) or a "
                                  "model directory holding the tokenizer") from None
    try:
        return load_tokenizer(source)
    except LogitStoreError as err:
        if given:
            raise
        raise LogitStoreError(f"{err} (this is the tokenizer the store records; pass "
                              "--tokenizer PATH to use a copy of it)") from None
