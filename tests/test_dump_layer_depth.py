"""Teacher layer indices in either form: teacher-dump stores the teacher's depth and its
layers as block numbers, so `3` and `-1` of a 4-layer teacher are one layer for a resume;
a store written before depths were recorded keeps matching only the form it holds."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

import teacher_dump.dump as dump_module  # noqa: E402
from logitstore.errors import ConfigError, SettingsMismatchError  # noqa: E402
from logitstore.format import SignalSpec, StoreSettings, canonical_layers  # noqa: E402
from logitstore.reader import StoreReader  # noqa: E402
from logitstore.verify import verify_store  # noqa: E402
from teacher_dump.config import resolve_config  # noqa: E402
from teacher_dump.dump import run_dump  # noqa: E402
from teacher_dump.ranks import RankContext  # noqa: E402
from tiny_hf import corpus, make_tiny_llama, make_tokenizer  # noqa: E402

DEPTH = 4


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth")
    model = make_tiny_llama(root / "llama4", make_tokenizer(root / "tok"),
                            num_hidden_layers=DEPTH)
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in corpus()[:5]))
    return {"model": model, "data": data}


def _dump(teacher, out, **flags):
    cfg = resolve_config(None, dict(model=str(teacher["model"]), data=[str(teacher["data"])],
                                    out=str(out), device="cpu", top_k=4, capture_kernel="eager",
                                    signal="t", **flags))
    return run_dump(cfg, ranks=RankContext(), progress=False)


def test_canonical_layers():
    assert canonical_layers((-1, 0, -4, 2), 4) == (3, 0, 0, 2)
    assert canonical_layers((-1, 7), None) == (-1, 7)  # unknown depth: as given
    assert canonical_layers((7, -5), 4) == (7, -5)  # out of range: left for the range check


def test_layers_are_stored_as_blocks_and_either_form_resumes(teacher, tmp_path):
    out = tmp_path / "s"
    first = _dump(teacher, out, hidden_layers="-1,0", attention_layers="-3", attention_grid=2)
    spec = StoreReader(str(out)).settings.signals["t"]
    assert spec.depth == DEPTH
    assert spec.hidden.layers == (3, 0) and spec.attention.layers == (1,)
    assert first.samples_written == 5
    # The same layers named the other way: the same config, so the dump resumes (no refusal).
    again = _dump(teacher, out, hidden_layers="3,-4", attention_layers="1", attention_grid=2)
    assert again.samples_written == 0 and again.samples_resumed == 5
    assert verify_store(str(out)) == []
    with pytest.raises(SettingsMismatchError, match="hidden_layers"):
        _dump(teacher, out, hidden_layers="2,0", attention_layers="1", attention_grid=2)


def test_one_layer_named_twice_is_refused(teacher, tmp_path):
    with pytest.raises(ConfigError, match="3 and -1 are the same layer"):
        _dump(teacher, tmp_path / "s", hidden_layers="3,-1")


def test_store_without_depth_matches_only_the_form_it_holds(teacher, tmp_path, monkeypatch):
    out = tmp_path / "old"
    real = dump_module.teacher_signal
    with monkeypatch.context() as patch:  # a store as written before depths were recorded
        patch.setattr(dump_module, "teacher_signal",
                      lambda *a, **k: real(*a, **{**k, "record_depth": False}))
        _dump(teacher, out, hidden_layers="-1")
    spec = StoreReader(str(out)).settings.signals["t"]
    assert spec.depth is None and spec.hidden.layers == (-1,)
    resumed = _dump(teacher, out, hidden_layers="-1")  # today's code, same form: resumes
    assert resumed.samples_resumed == 5 and resumed.samples_written == 0
    assert StoreReader(str(out)).settings.signals["t"].depth is None
    with pytest.raises(SettingsMismatchError, match=r"hidden_layers: store has \[-1\], now \[3\]"):
        _dump(teacher, out, hidden_layers="3")


def test_depth_is_read_back_and_checked():
    spec = SignalSpec(hidden=dump_module.HiddenSpec((3, 0), 8), depth=4)
    settings = StoreSettings(10, "f", signals={"t": spec})
    assert StoreSettings.from_json(settings.to_json()).signals["t"].depth == 4
    old = settings.to_json()
    del old["signals"]["t"]["depth"]  # written before the key existed
    assert StoreSettings.from_json(old).signals["t"].depth is None
    bad = StoreSettings(10, "f", signals={"t": SignalSpec(
        hidden=dump_module.HiddenSpec((3, -1), 8), depth=4)})
    with pytest.raises(SettingsMismatchError, match="distinct block numbers in 0..3"):
        bad.validate()
