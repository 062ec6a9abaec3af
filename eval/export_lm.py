"""lm-eval's `LM` over an InferenceModel, so an exported student (ONNX or PyTorch, fp32 or
INT8) runs the same lm-eval tasks as a Hugging Face model does through HFLM.

`ExportLM` mirrors HFLM's choices so that an export and its source model are scored alike:

- tokenization: `tokenizer.encode` with the tokenizer's own special tokens (none added when
  the text already starts with the prefix token), contexts and continuations split as
  lm-eval's TemplateLM does (trailing context spaces go to the continuation);
- loglikelihood: context + continuation cut from the left to `max_length + 1` tokens, the
  last one dropped, one forward pass (`InferenceModel.logits`, left-padded batches); the
  answer is the sum of the continuation's log-probs and whether greedy decoding gives it;
- loglikelihood_rolling: lm-eval's disjoint rolling windows of `max_length` tokens with the
  prefix token (BOS, else EOS) before the first;
- generate_until: `InferenceModel.generate` (greedy unless the task asks to sample), the
  context cut from the left to leave room for `max_gen_toks`, the text cut at the first stop
  sequence (EOS included) the way HFLM cuts it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (Collator, handle_stop_sequences, has_bos_prefix,
                                  normalize_gen_kwargs, postprocess_generated_text)
from tqdm.auto import tqdm

from logitstore.toolkit.inference import GenerationSettings, InferenceModel, left_pad

# lm-eval's default when a generation task does not say how many tokens to produce.
DEFAULT_MAX_GEN_TOKS = 256
# A loglikelihood request after tokenization: ((context, continuation) or None, ids, ids).
TokenRequest = tuple[Any, list[int], list[int]]


class ExportLM(TemplateLM):
    """lm-eval model over an InferenceModel (see the module docstring)."""

    backend = "causal"

    def __init__(self, model: InferenceModel, *, batch_size: int = 8):
        super().__init__()
        self.model = model
        self.tokenizer = model.tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(model.max_length)

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.model.eos_token_ids[0])

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.eot_token_id)

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(
                string, self.tokenizer.decode(self.prefix_token_id)):
            options["add_special_tokens"] = False  # the text already carries it
        return list(self.tokenizer.encode(string, **options))

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    # ------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests: list[TokenRequest],
                              disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, greedy?) per request, in request order."""
        # Longest first, as HFLM: the first batch shows the worst memory at once.
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood", leave=False)
        for chunk in order.get_batched(n=self.batch_size):
            # The window the model sees: at most max_length positions, ending just before the
            # continuation's last token (whose log-prob comes from the position before it).
            windows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            ids, mask = left_pad(windows, self.model.pad_token_id)  # [B, W] each
            logits = self.model.logits(ids, mask)  # [B, W, V]
            for row, (_, _, continuation) in enumerate(chunk):
                results.append(_continuation_score(logits[row, -len(continuation):],
                                                   continuation))
            bar.update(len(chunk))
        bar.close()
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text: the sum over lm-eval's rolling windows."""
        windows: list[TokenRequest] = []
        owners: list[int] = []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window,
                                             lm_utils.get_rolling_token_windows(
                                                 token_list=self.tok_encode(text),
                                                 prefix_token=self.prefix_token_id,
                                                 max_seq_len=self.max_length, context_len=1)):
                windows.append((None, list(context), list(continuation)))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation, cut at the task's stop sequences and EOS."""
        order = Collator([req.args for req in requests],
                         sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        answers: list[str] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until", leave=False)
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], DEFAULT_MAX_GEN_TOKS)
            stops = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            settings = self._settings(kwargs)
            room = self.max_length - settings.max_new_tokens
            if room < 1:
                raise ValueError(
                    f"the task asks for {settings.max_new_tokens} new tokens, but the model "
                    f"takes {self.max_length} positions in all: lower max_gen_toks "
                    "(--max-new-tokens) or export with a larger --max-length")
            prompts = [self.tok_encode(context)[-room:] for context in contexts]
            for generation in self.model.generate(prompts, settings):
                text = self.tokenizer.decode(generation.token_ids, skip_special_tokens=True)
                answers.append(postprocess_generated_text(text, stops, None))
            bar.update(len(chunk))
        bar.close()
        return order.get_original(answers)

    @staticmethod
    def _settings(kwargs: dict[str, Any]) -> GenerationSettings:
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0) > 0
        return GenerationSettings(
            max_new_tokens=int(kwargs["max_gen_toks"]),
            temperature=float(kwargs["temperature"]) if sample else 0.0,
            top_p=float(kwargs.get("top_p") or 1.0) if sample else 1.0,
            seed=0 if sample else None)


def _continuation_score(logits: np.ndarray, continuation: Sequence[int]) -> tuple[float, bool]:
    """(log p(continuation), whether each token is the argmax); logits [n, V] predict it."""
    scaled = logits.astype(np.float64)  # [n, V]
    peak = scaled.max(axis=-1, keepdims=True)
    log_norm = peak[:, 0] + np.log(np.exp(scaled - peak).sum(axis=-1))  # [n]
    targets = np.asarray(continuation, dtype=np.int64)
    picked = scaled[np.arange(len(targets)), targets]  # [n]
    greedy = bool((scaled.argmax(axis=-1) == targets).all())
    return float((picked - log_norm).sum()), greedy


def lm_eval_model(model, tokenizer, batch_size: int):
    """The lm-eval model of a loaded model: ExportLM for an InferenceModel, else HFLM."""
    if isinstance(model, InferenceModel):
        return ExportLM(model, batch_size=batch_size)
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
