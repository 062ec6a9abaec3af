"""Tiny, local Hugging Face tokenizers and models for tests (no hub access, < 1 s each).

Other test files import these helpers as ``from tiny_hf import make_tokenizer, ...``:
pytest's default ``prepend`` import mode puts this directory on ``sys.path``.

Everything is deterministic: the tokenizer is trained on a fixed corpus, models are
initialised from a fixed seed, so two calls build byte-identical artefacts.
"""

from __future__ import annotations

import itertools
from pathlib import Path

# Special tokens shared by every tiny tokenizer; ids are fixed by their order here.
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]

# A deliberately simple chat template (ChatML-like): each turn is "<|role|>\ncontent</s>\n".
# It does not emit BOS itself, so the tokenizer's post-processor adds it, like Llama's.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Generic, invented clinical-style phrases: combined below into a few hundred sentences.
_SUBJECTS = [
    "The patient",
    "A 54-year-old woman",
    "The child",
    "An elderly man",
    "The nurse",
    "The physician",
    "The resident on call",
    "A pregnant woman",
]
_VERBS = [
    "reports",
    "presents with",
    "was treated for",
    "denies",
    "was admitted with",
    "has a history of",
]
_FINDINGS = [
    "chest pain radiating to the left arm",
    "a persistent dry cough and mild fever",
    "shortness of breath on exertion",
    "swelling of both ankles",
    "headache and blurred vision",
    "abdominal pain after meals",
    "elevated blood glucose levels",
    "a rash on the forearms",
]
_FOLLOW_UPS = [
    "Blood pressure was 150/90 mmHg.",
    "An ECG showed sinus rhythm.",
    "Antibiotics were started empirically.",
    "The dose of insulin was adjusted.",
    "A chest X-ray was ordered.",
    "She was advised to rest and drink fluids.",
    "Follow-up is planned in two weeks.",
    "Laboratory tests revealed anemia.",
]


def corpus() -> list[str]:
    """A few hundred invented clinical sentences (the tokenizer's training text)."""
    sentences = [
        f"{subject} {verb} {finding}. {follow_up}"
        for (subject, verb, finding), follow_up in zip(
            itertools.product(_SUBJECTS, _VERBS, _FINDINGS), itertools.cycle(_FOLLOW_UPS)
        )
    ]
    # Question/answer style lines so MCQ prompts tokenize into sensible pieces too.
    sentences += [
        f"Question: What is the most likely diagnosis? {letter}. {finding} Answer: {letter}"
        for letter, finding in zip("ABCDE", _FINDINGS)
    ]
    return sentences


def make_tokenizer(
    directory: str | Path,
    vocab_size: int = 400,
    *,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
    add_bos: bool = True,
) -> Path:
    """Train a byte-level BPE on `corpus()` and save it as a PreTrainedTokenizerFast.

    `chat_template=None` saves a tokenizer without a chat template; `add_bos=False`
    makes one that, like Qwen2, adds no BOS when encoding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer=trainer)
    if add_bos:
        bos_id = backend.token_to_id(BOS)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    return directory


def _load_tokenizer(tokenizer):
    """Accept a tokenizer object or a directory written by `make_tokenizer`."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def _save_model(config_class, model_class, directory, tokenizer, defaults, overrides, seed):
    import torch

    tokenizer = _load_tokenizer(tokenizer)
    settings = dict(defaults)
    settings.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(overrides)  # overrides last: a test may pad vocab_size on purpose
    config = config_class(**settings)
    torch.manual_seed(seed)
    model = model_class(config)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)  # a model dir is self-contained, like on the hub
    return directory


# hidden 64, not less: bitsandbytes' CPU 4-bit kernel (AVX512-bf16 path) repacks weights
# in blocks of 64 input features and fails on narrower layers.
_TINY_SHAPES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def make_tiny_llama(directory: str | Path, tokenizer, *, seed: int = 0, **overrides) -> Path:
    """Save a 2-layer Llama (hidden 64, 4 heads, 2 kv heads) plus `tokenizer` in `directory`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save_model(
        LlamaConfig, LlamaForCausalLM, directory, tokenizer, _TINY_SHAPES, overrides, seed
    )


def make_tiny_qwen2(directory: str | Path, tokenizer, *, seed: int = 0, **overrides) -> Path:
    """Save a 2-layer Qwen2 (hidden 64, 4 heads, 2 kv heads) plus `tokenizer` in `directory`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _save_model(
        Qwen2Config, Qwen2ForCausalLM, directory, tokenizer, _TINY_SHAPES, overrides, seed
    )
