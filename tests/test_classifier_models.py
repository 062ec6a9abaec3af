"""Image + text classifiers (toolkit.classifier_models) and their adapters (toolkit.classifier_adapter).

Tiny configs only (images 32x32, patch 8, hidden 32, 2 layers): every model here builds in
milliseconds from a config with a fixed seed; nothing is downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_hf import corpus

from logitstore.errors import ConfigError, LogitStoreError
from logitstore.toolkit.classifier_adapter import (
    CompositeClassifierAdapter, SingleTowerAdapter, adapter_for, image_processor_for,
    load_image_processor, pixel_values_from_images, preprocess_batch, text_inputs_from_texts)
from logitstore.toolkit.classifier_models import (
    MODEL_TYPE, ImageTextClassifier, ImageTextClassifierConfig)

VOCAB = 200
VIT = dict(model_type="vit", image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
           num_attention_heads=2, intermediate_size=64)
BERT = dict(model_type="bert", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
HEADS = {"modality": 5, "location": 12}


def tiny_config(**overrides) -> ImageTextClassifierConfig:
    settings = dict(vision_config=VIT, text_config=BERT, heads=HEADS, fusion_dim=48,
                    fusion_layers=2, fusion_heads=4, dropout=0.1)
    settings.update(overrides)
    return ImageTextClassifierConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> ImageTextClassifier:
    torch.manual_seed(seed)
    return ImageTextClassifier(tiny_config(**overrides)).eval()


def random_batch(size: int = 3, length: int = 7, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(size, 3, 32, 32, generator=generator),
            "input_ids": torch.randint(5, VOCAB, (size, length), generator=generator),
            "attention_mask": torch.ones(size, length, dtype=torch.long)}


def make_wordpiece_tokenizer(directory):
    """A BERT-style WordPiece tokenizer ([CLS] text [SEP]) trained on tiny_hf's corpus."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials,
                                        show_progress=False)
    backend.train_from_iterator(corpus(), trainer=trainer)
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                        pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", mask_token="[MASK]")
    tokenizer.save_pretrained(directory)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece"))


def noise_images(count: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 5 * i, 50, 3), dtype=np.uint8))
            for i in range(count)]


# ---- models ----------------------------------------------------------------------------------

def test_composite_forward_gives_logits_per_head_and_features_per_part():
    model = tiny_model()
    labels = {"modality": torch.tensor([0, 4, 2]), "location": torch.tensor([11, -100, 3])}
    output = model(**random_batch(), labels=labels)
    assert {h: tuple(t.shape) for h, t in output.logits.items()} == {
        "location": (3, 12), "modality": (3, 5)}
    assert {p: tuple(t.shape) for p, t in output.features.items()} == {
        "image_cls": (3, 32), "image_proj": (3, 48), "text_cls": (3, 32), "text_proj": (3, 48),
        "fused": (3, 48)}
    reference = sum(torch.nn.functional.cross_entropy(output.logits[h], y, ignore_index=-100)
                    for h, y in labels.items())
    torch.testing.assert_close(output.loss, reference)
    assert model.config.part_widths == {p: t.shape[1] for p, t in output.features.items()}


def test_fused_features_depend_on_the_image_through_cross_attention():
    model = tiny_model()
    batch = random_batch()
    other = dict(batch, pixel_values=torch.randn(3, 3, 32, 32))
    first, second = model(**batch).features, model(**other).features
    assert torch.equal(first["text_cls"], second["text_cls"])
    assert not torch.allclose(first["fused"], second["fused"])


def test_single_tower_models_read_only_their_own_input():
    deit = dict(VIT, model_type="deit")
    image_only = tiny_model(vision_config=deit, text_config=None, heads={"label": 3})
    out = image_only(pixel_values=torch.randn(2, 3, 32, 32))
    assert {p: tuple(t.shape) for p, t in out.features.items()} == {
        "image_cls": (2, 32), "image_proj": (2, 48), "fused": (2, 48)}
    assert tuple(out.logits["label"].shape) == (2, 3)
    assert len(image_only.fusion) == 0

    distilbert = dict(model_type="distilbert", vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2,
                      hidden_dim=64, max_position_embeddings=64)
    for text_config in (BERT, distilbert):
        text_only = tiny_model(vision_config=None, text_config=text_config, heads={"label": 4})
        batch = random_batch(size=2)
        out = text_only(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=torch.zeros_like(batch["input_ids"]))
        assert {p: tuple(t.shape) for p, t in out.features.items()} == {
            "text_cls": (2, 32), "text_proj": (2, 48), "fused": (2, 48)}
        assert tuple(out.logits["label"].shape) == (2, 4)
        with pytest.raises(LogitStoreError, match="needs input_ids"):
            text_only(pixel_values=torch.randn(2, 3, 32, 32))


def test_save_and_auto_model_load_give_identical_outputs_without_remote_code(tmp_path):
    from transformers import AutoConfig, AutoModel

    model = tiny_model(heads={"modality": 5, "location": 12, "acuity": 3})
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == MODEL_TYPE and "auto_map" not in saved

    assert isinstance(AutoConfig.from_pretrained(tmp_path), ImageTextClassifierConfig)
    loaded = AutoModel.from_pretrained(tmp_path).eval()  # no trust_remote_code
    assert type(loaded) is ImageTextClassifier
    assert list(loaded.config.heads) == list(model.config.heads) == ["acuity", "location",
                                                                    "modality"]
    batch = random_batch()
    expected, found = model(**batch), loaded(**batch)
    for name in expected.logits:
        assert torch.equal(expected.logits[name], found.logits[name])
    for part in expected.features:
        assert torch.equal(expected.features[part], found.features[part])


def test_text_only_model_round_trips_with_its_absent_tower(tmp_path):
    from transformers import AutoModel

    model = tiny_model(vision_config=None)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert loaded.config.vision_config is None and loaded.vision_tower is None
    batch = random_batch()
    del batch["pixel_values"]
    assert torch.equal(model(**batch).features["fused"], loaded(**batch).features["fused"])


def test_default_config_has_vit_base_and_bert_base_sizes():
    config = ImageTextClassifierConfig(heads={"modality": 5})
    assert (config.vision_config.hidden_size, config.vision_config.image_size,
            config.vision_config.patch_size) == (768, 224, 16)
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (768, 12)
    assert (config.fusion_dim, config.fusion_layers, config.fusion_heads) == (384, 2, 4)


@pytest.mark.parametrize("overrides, expected", [
    (dict(heads={"modality": 0}), r"heads\.modality: expected a number of classes of at least 1"),
    (dict(heads={"bad name": 3}), r"head name 'bad name' is not an identifier"),
    (dict(heads={}), r"heads: expected a non-empty mapping"),
    (dict(vision_config=None, text_config=None), r"needs at least one tower"),
    (dict(text_config={"model_type": "gpt2"}), r"text_config\.model_type: expected one of bert"),
    (dict(fusion_heads=5), r"fusion_heads: expected a positive divisor of fusion_dim \(48\)"),
    (dict(fusion_layers=0), r"fusion_layers: expected at least 1 with two towers"),
    (dict(dropout=1.0), r"dropout: expected a probability in \[0, 1\)"),
])
def test_bad_configs_are_refused_with_what_to_fix(overrides, expected):
    with pytest.raises(ConfigError, match=expected) as caught:
        tiny_config(**overrides)
    assert len(caught.value.problems) == 1


def test_a_bad_saved_config_is_refused_on_load(tmp_path):
    from transformers import AutoModel

    tiny_model().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["heads"]["modality"] = 0
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"heads\.modality"):
        AutoModel.from_pretrained(tmp_path)


def test_thirty_training_steps_lower_the_loss():
    model = tiny_model(seed=1).train()
    batch = random_batch(size=16, seed=1)
    generator = torch.Generator().manual_seed(2)
    labels = {name: torch.randint(0, classes, (16,), generator=generator)
              for name, classes in HEADS.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---- adapters --------------------------------------------------------------------------------

def test_composite_adapter_returns_the_models_logits_and_chosen_parts():
    model = tiny_model()
    batch = dict(random_batch(), sample_index=torch.arange(3))  # extra keys are ignored
    adapter = adapter_for(model, parts=["fused", "image_cls"])
    assert isinstance(adapter, CompositeClassifierAdapter)
    assert adapter.heads == {"location": 12, "modality": 5}
    assert adapter.parts == {"image_cls": 32, "fused": 48}
    signals = adapter(batch)
    expected = model(**random_batch())
    assert set(signals) == {"logits", "features"}
    for name in HEADS:
        assert torch.equal(signals["logits"][name], expected.logits[name])
    assert list(signals["features"]) == ["image_cls", "fused"]
    assert torch.equal(signals["features"]["fused"], expected.features["fused"])


def test_adapters_refuse_unknown_parts_and_missing_inputs():
    image_only = tiny_model(text_config=None)
    with pytest.raises(LogitStoreError, match=r"unknown feature part\(s\) 'text_cls'.*outputs "
                                              r"image_cls, image_proj, fused"):
        adapter_for(image_only, parts=["text_cls"])
    batch = random_batch()
    del batch["pixel_values"]
    with pytest.raises(LogitStoreError, match="the batch lacks pixel_values"):
        adapter_for(tiny_model())(batch)


def test_single_tower_adapter_reads_a_vit_image_classifier():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(**{k: v for k, v in VIT.items() if k != "model_type"}, num_labels=4)
    model = ViTForImageClassification(config).eval()
    adapter = adapter_for(model, head_name="modality")
    assert isinstance(adapter, SingleTowerAdapter)
    assert adapter.heads == {"modality": 4}
    assert adapter.parts == {"image_cls": 32, "fused": 32}
    pixel_values = torch.randn(2, 3, 32, 32)
    signals = adapter({"pixel_values": pixel_values, "input_ids": None})
    backbone = model.vit(pixel_values, output_hidden_states=True)
    assert torch.equal(signals["logits"]["modality"], model(pixel_values).logits)
    assert torch.equal(signals["features"]["image_cls"], backbone.hidden_states[-1][:, 0])
    # ViT's head reads the CLS after the final LayerNorm.
    assert torch.equal(signals["features"]["fused"], backbone.last_hidden_state[:, 0])


def test_single_tower_adapter_reads_a_bert_text_classifier(tokenizer):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(**{k: v for k, v in BERT.items() if k != "model_type"}, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    batch = preprocess_batch(texts=["The patient reports chest pain.", "A rash."],
                             tokenizer=tokenizer)
    signals = adapter_for(model, parts=["text_cls", "fused"])(batch)
    backbone = model.bert(**batch)
    assert torch.equal(signals["logits"]["label"], model(**batch).logits)
    assert torch.equal(signals["features"]["text_cls"], backbone.last_hidden_state[:, 0])
    assert torch.equal(signals["features"]["fused"], backbone.pooler_output)  # BERT's head input


def test_single_tower_adapter_drops_inputs_the_model_does_not_take(tokenizer):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=64, num_labels=2)
    model = DistilBertForSequenceClassification(config).eval()
    batch = preprocess_batch(texts=["A rash.", "Chest pain."], tokenizer=tokenizer)
    # BERT's own tokenizer returns token_type_ids, which DistilBERT's forward() does not take.
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    adapter = adapter_for(model)
    assert adapter.input_names == ("input_ids", "attention_mask")
    assert adapter.parts == {"text_cls": 32, "fused": 32}
    signals = adapter(batch)
    expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.equal(signals["logits"]["label"], expected.logits)


def test_single_tower_adapter_refuses_a_model_without_a_linear_classifier():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(**{k: v for k, v in BERT.items() if k != "model_type"}))
    with pytest.raises(LogitStoreError, match=r"BertModel is not a single-tower classifier.*"
                                              r"classifier_module="):
        adapter_for(model)


# ---- preprocessing ---------------------------------------------------------------------------

def test_image_preprocessing_is_deterministic_and_matches_a_numpy_reference(tmp_path):
    processor = image_processor_for(tiny_config())
    images = noise_images(3) + [noise_images(1, seed=5)[0].convert("L")]
    first = pixel_values_from_images(processor, images)
    assert first.shape == (4, 3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, pixel_values_from_images(processor, images))

    processor.save_pretrained(tmp_path)
    reloaded = load_image_processor(tmp_path)
    assert torch.equal(first, pixel_values_from_images(reloaded, images))

    # Reference: PIL bilinear resize to 32x32, scale to [0, 1], normalise with mean=std=0.5.
    resized = [np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.float64)
               for im in images]
    expected = (np.stack(resized).transpose(0, 3, 1, 2) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(first.numpy(), expected, atol=1e-5)


def test_load_image_processor_explains_a_missing_preprocessor_config(tmp_path):
    with pytest.raises(LogitStoreError, match="has no preprocessor_config.json"):
        load_image_processor(tmp_path)


def test_text_preprocessing_pads_to_the_longest_text_and_truncates(tokenizer):
    texts = ["The patient reports chest pain radiating to the left arm.", "A rash."]
    inputs = text_inputs_from_texts(tokenizer, texts, max_length=64)
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape
    assert inputs["input_ids"][:, 0].tolist() == [tokenizer.cls_token_id] * 2
    assert inputs["attention_mask"][1].sum() < inputs["attention_mask"][0].sum()
    assert torch.equal(inputs["input_ids"], text_inputs_from_texts(tokenizer, texts)["input_ids"])
    assert text_inputs_from_texts(tokenizer, texts, max_length=5)["input_ids"].shape[1] == 5


def test_preprocessed_batch_runs_the_composite_through_its_adapter(tokenizer):
    model = tiny_model()
    batch = preprocess_batch(images=noise_images(2), texts=["A rash.", "Chest pain."],
                             image_processor=image_processor_for(model.config),
                             tokenizer=tokenizer)
    signals = adapter_for(model)(batch)
    assert tuple(signals["logits"]["location"].shape) == (2, 12)
    with pytest.raises(LogitStoreError, match="got texts but no tokenizer"):
        preprocess_batch(texts=["A rash."])
