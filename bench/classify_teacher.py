"""The teacher of bench/classify_bench.py: a ViT + BERT ImageTextClassifier trained here with CE.

    tokenizer_dir(data_dir, out_dir)            WordPiece tokenizer trained on the train captions
    model_configs(size)                         {"teacher": {...}, "student": {...}} settings
    train_teacher(data_dir, out_dir, settings, steps, batch_size, lr, seed) -> dict
        trains on DIR/train.jsonl, saves a loadable teacher dir (weights, tokenizer, image
        processor) under out_dir and returns its val accuracy/macro-F1 per head and its
        parameter count.

The teacher is trained by a short plain loop here rather than by `student-train --task
classify`, because that command needs a classifier store holding a teacher's logits (there is
no labels-only classifier store): the bench's subject is distillation from a store, not
teacher training. No pickle: the teacher is saved with save_pretrained (safetensors).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

HEADS = {"modality": 5, "location": 12}
VOCAB = 256


def tokenizer_dir(data_dir: Path, out_dir: Path) -> Path:
    """A BERT-style WordPiece tokenizer trained on the train split's captions, saved in out_dir
    (teacher and students share it, as seed 002's students share the teacher's vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    captions = [json.loads(line)["text"] for line in
                (data_dir / "train.jsonl").read_text(encoding="utf-8").splitlines() if line]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(captions, trainer=trainers.WordPieceTrainer(
        vocab_size=VOCAB, special_tokens=specials, show_progress=False))
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                        pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", mask_token="[MASK]")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _vit(image_size: int, patch: int, hidden: int, layers: int, heads: int) -> dict:
    return dict(model_type="vit", image_size=image_size, patch_size=patch, hidden_size=hidden,
                num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=4 * hidden)


def _bert(hidden: int, layers: int, heads: int) -> dict:
    return dict(model_type="bert", vocab_size=VOCAB, hidden_size=hidden,
                num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=4 * hidden, max_position_embeddings=64)


def _composite(image_size: int, width: int, vit_layers: int, bert_layers: int,
               fusion_layers: int, heads: int) -> dict:
    return dict(vision_config=_vit(image_size, 8, width, vit_layers, heads),
                text_config=_bert(width, bert_layers, heads), fusion_dim=width,
                fusion_layers=fusion_layers, fusion_heads=heads, dropout=0.1)


def model_configs(image_size: int, quick: bool) -> dict[str, dict]:
    """ImageTextClassifierConfig settings: a ViT-Base-shaped (narrowed) teacher of a few million
    parameters and a DeiT/ViT-tiny + MiniLM-ish student several times smaller; tiny in quick."""
    # (width, ViT layers, BERT layers, fusion layers, attention heads)
    sizes = {"teacher": (48, 2, 2, 1, 2), "student": (32, 1, 1, 1, 2)} if quick else \
        {"teacher": (192, 6, 4, 2, 4), "student": (64, 3, 2, 1, 2)}
    teacher, student = (_composite(image_size, *sizes[role]) for role in ("teacher", "student"))
    return {"teacher": {**teacher, "heads": HEADS}, "student": {**student, "heads": HEADS}}


def _split_records(data_dir: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in
            (data_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if line]


def _inputs(records: list[dict], data_dir: Path, image_processor, tokenizer) -> dict:
    from logitstore.toolkit.classifier_adapter import preprocess_batch
    from logitstore.toolkit.classify_records import load_rgb

    images = [load_rgb(data_dir / r["image"]) for r in records]
    return preprocess_batch(images=images, texts=[r["text"] for r in records],
                            image_processor=image_processor, tokenizer=tokenizer,
                            max_length=64)


def _encode(data_dir: Path, split: str, image_processor, tokenizer) -> tuple[dict, dict]:
    """Every sample of a split preprocessed once: (model inputs [N, ...], labels {head: [N]})."""
    records = _split_records(data_dir, split)
    inputs = _inputs(records, data_dir, image_processor, tokenizer)
    labels = {h: torch.tensor([r["labels"][h] for r in records]) for h in HEADS}
    return inputs, labels


def _rows(inputs: dict, index: torch.Tensor) -> dict:
    return {k: v[index] for k, v in inputs.items()}


def head_scores(model, inputs: dict, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """{head: [N, C]} logits of `model` (eval mode, no grad) over preprocessed inputs."""
    n = len(next(iter(inputs.values())))
    out: dict[str, list] = {h: [] for h in HEADS}
    model.eval()
    with torch.no_grad():
        for start in range(0, n, batch_size):
            logits = model(**_rows(inputs, torch.arange(start, min(start + batch_size, n)))).logits
            for head in out:
                out[head].append(logits[head].float())
    return {h: torch.cat(v) for h, v in out.items()}


def per_head_metrics(scores: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict:
    """{head: {"accuracy", "macro_f1"}} and "mean_macro_f1" (classify_metrics)."""
    from logitstore.toolkit.classify_metrics import classifier_metrics

    metrics = classifier_metrics({h: s.numpy() for h, s in scores.items()},
                                 {h: y.numpy() for h, y in labels.items()}, bootstrap=0)
    return {"heads": {h: {"accuracy": m.accuracy, "macro_f1": m.macro_f1}
                      for h, m in metrics.heads.items()},
            "mean_macro_f1": metrics.mean_macro_f1}


def train_teacher(data_dir: Path, out_dir: Path, settings: dict, tokenizer_path: Path, *,
                  steps: int, batch_size: int, lr: float, seed: int = 0) -> dict:
    """CE on both heads over DIR/train.jsonl for `steps` AdamW steps (cosine, 5 % warmup);
    saves the teacher under out_dir; returns its val metrics, parameters and seconds."""
    import torch.nn.functional as F
    from transformers import AutoTokenizer, get_scheduler

    from logitstore.toolkit.classifier_adapter import image_processor_for
    from logitstore.toolkit.classifier_models import (ImageTextClassifier,
                                                      ImageTextClassifierConfig)

    started = time.perf_counter()
    torch.manual_seed(seed)
    model = ImageTextClassifier(ImageTextClassifierConfig(**settings))
    image_processor = image_processor_for(model.config)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    train_inputs, train_labels = _encode(data_dir, "train", image_processor, tokenizer)
    n = len(train_labels["modality"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=max(1, steps // 20),
                              num_training_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    order, position = torch.randperm(n, generator=generator), 0
    model.train()
    for _ in range(steps):
        if position + batch_size > n:
            order, position = torch.randperm(n, generator=generator), 0
        index = order[position:position + batch_size]
        position += batch_size
        logits = model(**_rows(train_inputs, index)).logits
        loss = sum(F.cross_entropy(logits[h], train_labels[h][index]) for h in HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    val_inputs, val_labels = _encode(data_dir, "val", image_processor, tokenizer)
    metrics = per_head_metrics(head_scores(model, val_inputs), val_labels)
    model.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"val": metrics, "parameters": sum(p.numel() for p in model.parameters()),
            "steps": steps, "batch_size": batch_size, "lr": lr,
            "seconds": time.perf_counter() - started}
