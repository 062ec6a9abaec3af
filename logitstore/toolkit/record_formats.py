"""Record formats for training/dump data: detect a record's format, render it as a
(prompt, response) text pair, and tokenize that pair with its loss mask (`tokenize_pair`).

Every record becomes one (prompt, response) text pair; the response holds the training
targets. Supported formats (`FORMAT_NAMES`, in auto-detection order, most specific first):

=================  ==========================================================================
chat               ``messages``: list of {role, content}; the last message must be from the
                   assistant and is the response; every earlier turn is the prompt.
medmcqa            MedMCQA: ``question``, ``opa``..``opd`` (``ope`` optional), ``cop`` (answer).
mcq                ``question`` + ``options`` (list, or dict letter -> text) or ``choices``
                   (list, or ARC-style {"label": [...], "text": [...]}) + ``answer`` (or
                   ``answer_idx`` / ``label``) as an index, a letter or the option's text.
instruction        Alpaca / Medical Meadow: ``instruction``, optional ``input``, ``output``.
prompt_completion  ``prompt`` + ``completion``.
text               ``text`` (plain language-model data: empty prompt, all of it is target).
=================  ==========================================================================

The renderings here use no tokenizer, so they are the same for every teacher; they are
what sample ids and duplicate detection hash (see `logitstore.toolkit.data`). Chat records are
re-rendered with a tokenizer's own chat template for tokenization when it has one
(`render_with_chat_template`); `render_default_chat` is the fallback template:

    prompt:   "<|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n"  (a block per turn)
    response: "{last assistant content}"  (EOS is added at tokenization)
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from logitstore.errors import ConfigError

LETTERS = string.ascii_uppercase
ANSWER_FIELDS = ("answer", "answer_idx", "label")
MEDMCQA_OPTION_FIELDS = ("opa", "opb", "opc", "opd", "ope")

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


class RecordError(ValueError):
    """A record that does not fit its format (missing field, wrong type): counted as malformed."""


@dataclass(frozen=True)
class TextPair:
    prompt: str
    response: str


@dataclass(frozen=True)
class RenderOptions:
    # MCQ integer answers (and MedMCQA `cop`) count from this: 0 for the Hugging Face
    # MedMCQA release (cop 0..3), 1 for the original MedMCQA JSON files (cop 1..4).
    index_base: int = 0


@dataclass(frozen=True)
class Format:
    name: str
    fields: frozenset[str]  # the fields this format consumes; every other scalar is a tag
    detect: Callable[[Mapping], bool]
    render: Callable[[Mapping, RenderOptions], TextPair]
    messages: Callable[[Mapping], list[dict]] | None = None  # chat only: the validated turns


# ----------------------------------------------------------------------------- helpers


def _field_str(record: Mapping, name: str, *, optional: bool = False) -> str:
    """The field as a string; numbers are accepted (and stringified) since they are unambiguous."""
    if name not in record or record[name] is None:
        if optional:
            return ""
        raise RecordError(f"missing field {name!r}")
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordError(f"field {name!r} must be a string, got {type(value).__name__}")
    return str(value)


# ----------------------------------------------------------------------------- simple formats


def _render_text(record: Mapping, _opts: RenderOptions) -> TextPair:
    return TextPair("", _field_str(record, "text"))


def _render_prompt_completion(record: Mapping, _opts: RenderOptions) -> TextPair:
    return TextPair(_field_str(record, "prompt"), _field_str(record, "completion"))


def _render_instruction(record: Mapping, _opts: RenderOptions) -> TextPair:
    instruction = _field_str(record, "instruction")
    extra = _field_str(record, "input", optional=True)
    output = _field_str(record, "output")
    if extra.strip():
        prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return TextPair(prompt, output)


# ----------------------------------------------------------------------------- chat


def _chat_messages(record: Mapping) -> list[dict]:
    messages = record.get("messages")
    if messages is None:
        raise RecordError("missing field 'messages'")
    if not isinstance(messages, list) or not messages:
        raise RecordError("field 'messages' must be a non-empty list of {role, content}")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise RecordError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise RecordError(f"messages[{i}].role must be a non-empty string")
        if not isinstance(content, str):
            raise RecordError(f"messages[{i}].content must be a string")
        turns.append({"role": role, "content": content})
    if turns[-1]["role"] != "assistant":
        raise RecordError(
            f"the last message must be from the assistant (the response), got {turns[-1]['role']!r}"
        )
    return turns


def render_default_chat(messages: list[dict]) -> TextPair:
    """The fallback chat template (module docstring): used when a tokenizer has none."""
    prompt = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages[:-1])
    return TextPair(prompt + "<|assistant|>\n", messages[-1]["content"])


def _render_chat(record: Mapping, _opts: RenderOptions) -> TextPair:
    return render_default_chat(_chat_messages(record))


def render_with_chat_template(tokenizer, messages: list[dict]) -> TextPair:
    """Render with the tokenizer's own template, split exactly where the last turn starts.

    The prompt is the history plus the generation prompt (what the model sees before it
    answers); the response is what the full conversation adds after it, so it carries
    the template's own end-of-turn markers (e.g. ``<|eot_id|>``), which are targets too.
    """
    try:
        prompt = tokenizer.apply_chat_template(
            messages[:-1], tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # jinja raises for e.g. unsupported roles: a data problem
        raise RecordError(f"the tokenizer's chat template failed: {exc}") from exc
    if not full.startswith(prompt):
        raise RecordError(
            "the chat template renders the history differently with and without the last "
            "turn, so the prompt/response boundary cannot be placed exactly"
        )
    return TextPair(prompt, full[len(prompt) :])


# ----------------------------------------------------------------------------- multiple choice


def _option_text(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordError(f"{where} must be a string, got {type(value).__name__}")
    return str(value)


def _mcq_options(record: Mapping) -> list[tuple[str, str]]:
    """[(label, text)] from `options` or `choices`; None entries (absent 5th option) dropped."""
    key = "options" if record.get("options") is not None else "choices"
    raw = record.get(key)
    if raw is None:
        raise RecordError("missing field 'options' (or 'choices')")
    if isinstance(raw, Mapping) and isinstance(raw.get("text"), list):  # ARC style
        labels = raw.get("label") or list(LETTERS[: len(raw["text"])])
        pairs = list(zip(labels, raw["text"]))
    elif isinstance(raw, Mapping):
        pairs = list(raw.items())
    elif isinstance(raw, list):
        pairs = list(zip(LETTERS, raw))
        if len(raw) > len(LETTERS):
            raise RecordError(f"too many options ({len(raw)})")
    else:
        raise RecordError(f"field {key!r} must be a list or an object, got {type(raw).__name__}")
    options = [
        (str(label).strip(), _option_text(text, f"option {label!r}"))
        for label, text in pairs
        if text is not None
    ]
    if len(options) < 2:
        raise RecordError(f"field {key!r} must hold at least two options")
    return options


def _answer_index(answer, options: list[tuple[str, str]], index_base: int, field: str) -> int:
    """Position of the answer in `options`: an index, a label (letter) or the option's text."""
    if isinstance(answer, bool) or answer is None:
        raise RecordError(f"field {field!r} has no usable answer ({answer!r})")
    if isinstance(answer, float) and answer.is_integer():  # parquet columns with nulls
        answer = int(answer)
    if isinstance(answer, str):
        token = answer.strip().strip("().:").strip()
        for i, (label, _) in enumerate(options):
            if label.casefold() == token.casefold():
                return i
        for i, (_, text) in enumerate(options):
            if text.strip().casefold() == answer.strip().casefold():
                return i
        if token.lstrip("-").isdigit():
            answer = int(token)
        else:
            raise RecordError(f"{field} {answer!r} matches no option label or option text")
    if not isinstance(answer, int):
        raise RecordError(f"field {field!r} must be an index, a letter or an option's text")
    index = answer - index_base
    if not 0 <= index < len(options):
        hint = " (is `mcq_index_base` right for this data?)" if answer >= 0 else ""
        raise RecordError(
            f"{field} {answer} is out of range for {len(options)} options counted from "
            f"{index_base}{hint}"
        )
    return index


def _mcq_pair(question: str, options: list[tuple[str, str]], index: int) -> TextPair:
    lines = [f"Question: {question}"] + [f"{label}. {text}" for label, text in options]
    label, text = options[index]
    return TextPair("\n".join(lines) + "\nAnswer:", f" {label}. {text}")


def _render_mcq(record: Mapping, opts: RenderOptions) -> TextPair:
    question = _field_str(record, "question")
    options = _mcq_options(record)
    field = next((f for f in ANSWER_FIELDS if record.get(f) is not None), None)
    if field is None:
        raise RecordError("missing field 'answer' (or 'answer_idx' / 'label')")
    return _mcq_pair(
        question, options, _answer_index(record[field], options, opts.index_base, field)
    )


def _render_medmcqa(record: Mapping, opts: RenderOptions) -> TextPair:
    question = _field_str(record, "question")
    options = [
        (LETTERS[i], _option_text(record[name], f"field {name!r}"))
        for i, name in enumerate(MEDMCQA_OPTION_FIELDS)
        if record.get(name) is not None
    ]
    if len(options) < 2:
        raise RecordError("MedMCQA record needs at least fields 'opa' and 'opb'")
    if record.get("cop") is None:
        raise RecordError("missing field 'cop'")
    return _mcq_pair(
        question, options, _answer_index(record["cop"], options, opts.index_base, "cop")
    )


# ----------------------------------------------------------------------------- tokenization


def special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before text by itself (BOS for Llama, nothing for Qwen2)."""
    probe = "a"
    with_specials = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(with_specials) - len(plain) + 1):
        if with_specials[start : start + len(plain)] == plain:
            return with_specials[:start]
    return []


def tokenize_pair(
    tokenizer,
    prompt: str,
    response: str,
    *,
    include_prompt: bool = False,
    prefix: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids (seq,) int64, loss_mask (seq,) bool) for one pair.

    Prompt and response are tokenized separately, without special tokens, and concatenated:
    [prefix specials] + prompt + response + [EOS], so the target boundary is exact. The
    prefix is skipped when the text already starts with it (chat templates that write BOS)
    and EOS is not added when the response already ends with it. loss_mask is True on
    response tokens and EOS, on prompt tokens too with `include_prompt`, never on the prefix.
    """
    prefix = special_prefix(tokenizer) if prefix is None else prefix
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if prefix and (prompt_ids or response_ids)[: len(prefix)] == prefix:
        prefix = []  # a chat template already wrote BOS into the text
    eos_id, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    ends_with_eos = bool(response_ids) and response_ids[-1] == eos_id
    ends_with_eos |= bool(eos_text) and response.rstrip().endswith(eos_text)
    suffix = [] if eos_id is None or ends_with_eos else [eos_id]
    ids = prefix + prompt_ids + response_ids + suffix
    mask = [False] * len(prefix) + [include_prompt] * len(prompt_ids)
    mask += [True] * (len(response_ids) + len(suffix))
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)


# ----------------------------------------------------------------------------- registry

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "chat",
            frozenset({"messages"}),
            lambda r: "messages" in r,
            _render_chat,
            messages=_chat_messages,
        ),
        Format(
            "medmcqa",
            frozenset({"question", "cop", *MEDMCQA_OPTION_FIELDS}),
            lambda r: "question" in r and "opa" in r,
            _render_medmcqa,
        ),
        Format(
            "mcq",
            frozenset({"question", "options", "choices", *ANSWER_FIELDS}),
            lambda r: "question" in r and ("options" in r or "choices" in r),
            _render_mcq,
        ),
        Format(
            "instruction",
            frozenset({"instruction", "input", "output"}),
            lambda r: "instruction" in r and "output" in r,
            _render_instruction,
        ),
        Format(
            "prompt_completion",
            frozenset({"prompt", "completion"}),
            lambda r: "prompt" in r and "completion" in r,
            _render_prompt_completion,
        ),
        Format("text", frozenset({"text"}), lambda r: "text" in r, _render_text),
    )
}
FORMAT_NAMES = tuple(FORMATS)


def detect_format(record: Mapping) -> Format | None:
    """The first format (most specific first) whose fields the record has, else None."""
    return next((f for f in FORMATS.values() if f.detect(record)), None)


# What a user may ask for (teacher-dump --format, student-train --data-format): a format
# or auto (detected per source). Dashes are accepted for underscores (`prompt-completion`).
DATA_FORMATS = ("auto", *FORMAT_NAMES)
DATA_FORMAT_METAVAR = "[" + "|".join(f.replace("_", "-") for f in DATA_FORMATS) + "]"


def normalize_format_name(name: str) -> str:
    """A data format name as typed -> as named here (`prompt-completion` -> `prompt_completion`)."""
    return name.replace("-", "_")


def data_format_problem(name: str | None) -> str | None:
    """What is wrong with a data format name as typed (dashes allowed), or None when fine."""
    if name is None or normalize_format_name(name) in DATA_FORMATS:
        return None
    return f"must be one of {', '.join(DATA_FORMATS)}, got {name!r}"


def get_format(name: str) -> Format:
    """The Format called `name` (dashes allowed); ConfigError for an unknown name."""
    try:
        return FORMATS[normalize_format_name(name)]
    except KeyError:
        raise ConfigError([f"unknown data format {name!r}; choose 'auto' or one of "
                           f"{', '.join(FORMAT_NAMES)}"]) from None


def tags_of(record: Mapping, fmt: Format) -> dict[str, str | int | float | bool]:
    """Scalar fields the format does not consume (specialty, subject_name...), kept as tags.

    `split` is excluded: it becomes the sample's split instead.
    """
    return {
        key: value
        for key, value in record.items()
        if key not in fmt.fields and key != "split" and isinstance(value, (str, int, float, bool))
    }
