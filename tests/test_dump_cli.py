"""teacher-dump end to end on tiny local models: the CLI, every data format, config
presets and validation, refusals, kill -9 + resume, and multi-process splitting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from logitstore.reader import StoreReader  # noqa: E402
from logitstore.verify import verify_store  # noqa: E402
from teacher_dump.background_writer import BackgroundWriter  # noqa: E402
from teacher_dump.cli import teacher_dump  # noqa: E402
from teacher_dump.config import resolve_config  # noqa: E402
from teacher_dump.dump import run_dump  # noqa: E402
from teacher_dump.ranks import RankContext, batches_of_rank, plan_batches  # noqa: E402
from tiny_hf import corpus, make_tiny_llama, make_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAST = ["--top-k", "4", "--samples", "8", "--hidden-layers", "-1", "--device", "cpu",
        "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dump_cli")
    tok = make_tokenizer(root / "tok")
    other_tok = make_tokenizer(root / "tok300", vocab_size=300)
    data = root / "data"
    data.mkdir()
    _write_jsonl(data / "text.jsonl", [{"text": s} for s in corpus()[:6]])
    _write_jsonl(data / "pc.jsonl", [{"prompt": "Question: what does the patient report?",
                                      "completion": f" {s}", "specialty": "cardiology",
                                      "source": "pubmed"}  # an index column's name
                                     for s in corpus()[10:14]])
    _write_jsonl(data / "instr.jsonl", [{"instruction": "Summarise the note.", "input": s,
                                         "output": s[:30]} for s in corpus()[20:23]])
    _write_jsonl(data / "chat.jsonl", [{"messages": [
        {"role": "user", "content": "What happened?"}, {"role": "assistant", "content": s}]}
        for s in corpus()[30:33]])
    _write_jsonl(data / "mcq.jsonl", [{"question": "Most likely diagnosis?",
                                       "options": ["anemia", "fever", "rash"], "answer": i % 3}
                                      for i in range(3)])
    _write_jsonl(data / "medmcqa.jsonl", [{"question": "Which test first?", "opa": "ECG",
                                           "opb": "X-ray", "opc": "MRI", "opd": "CT", "cop": 1}])
    many = root / "many.jsonl"
    _write_jsonl(many, [{"text": f"{s} {s[::-1][:i % 40]}"} for i, s in enumerate(corpus())])
    return {"root": root, "llama": make_tiny_llama(root / "llama", tok),
            "llama2": make_tiny_llama(root / "llama2", tok, seed=1),  # same tokenizer
            "other": make_tiny_llama(root / "other", other_tok), "data": data,
            "text": data / "text.jsonl", "many": many}


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _cli(*args, expect: int = 0):
    result = CliRunner().invoke(teacher_dump, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


def _content(url) -> tuple[str, dict]:
    """(dataset fingerprint, {sample_id: {field: value}}) of a store, layout-independent."""
    store = StoreReader(str(url))
    out = {}
    for sample in store.iter_samples():
        row = {"input_ids": sample.input_ids, "loss_mask": sample.loss_mask,
               "source": sample.source, "split": sample.split, "tags": sample.tags}
        for name, sig in sample.signals.items():
            if sig.topk is not None:
                row[f"{name}.topk"] = (sig.topk.ids, sig.topk.logprobs, sig.topk.tail_logprob)
            if sig.sampled is not None:
                s = sig.sampled
                row[f"{name}.sampled"] = (s.offsets, s.ids, s.counts, s.logprobs)
            row[f"{name}.hidden"] = sig.hidden
            row[f"{name}.attention"] = sig.attention
        out[sample.sample_id] = row
    return store.manifest["dataset_fingerprint"], out


def _assert_same_store(a, b) -> None:
    fp_a, rows_a = _content(a)
    fp_b, rows_b = _content(b)
    assert fp_a == fp_b and rows_a.keys() == rows_b.keys()
    for sid, row in rows_a.items():
        for key, value in row.items():
            other = rows_b[sid][key]
            values = value if isinstance(value, tuple) else (value,)
            others = other if isinstance(other, tuple) else (other,)
            for x, y in zip(values, others):
                if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
                    assert np.array_equal(x, y), (sid, key)
                else:
                    assert x == y, (sid, key)


# ----------------------------------------------------------------------------- the CLI


def test_every_data_format_goes_through_the_cli(tiny, tmp_path):
    out = tmp_path / "store"
    result = _cli("--model", tiny["llama"], "--data", tiny["data"], "--out", out,
                  "--attention-layers", "-1", "--attention-grid", "4", *FAST)
    assert "teacher-dump (dump): signal 'llama'" in result.stdout
    assert "bytes/token" in result.stdout
    assert verify_store(str(out)) == []
    store = StoreReader(str(out))
    extra = store.manifest["extra"]
    assert extra["teacher_dump_config"]["top_k"] == 4
    assert extra["teacher_dump_config"]["attention_layers"] == [-1]
    formats = extra["teacher_dump_summary"]["data"]["formats"]
    assert sorted(formats.values()) == ["chat", "instruction", "mcq", "medmcqa",
                                        "prompt_completion", "text"]
    assert {s for s in store.index.column("source").to_pylist()} == set(formats)
    assert extra["teacher_dump_summary"]["samples_written"] == len(store) == 20
    sample = store.sample(0)
    assert sample.signals["llama"].attention.shape == (1, 1, 4, 4)
    # A forced format, spelled with a dash, on one source.
    forced = tmp_path / "forced"
    _cli("--model", tiny["llama"], "--data", tiny["data"] / "pc.jsonl", "--format",
         "prompt-completion", "--out", forced, *FAST)
    index = StoreReader(str(forced)).index
    assert index.column("specialty").to_pylist() == ["cardiology"] * 4
    assert index.column("tag_source").to_pylist() == ["pubmed"] * 4
    assert index.column("source").to_pylist() == ["pc.jsonl"] * 4


def test_a_source_listed_twice_is_deduplicated_or_refused(tiny, tmp_path):
    twice = f"{tiny['text']},{tiny['text']}"
    result = _cli("--model", tiny["llama"], "--data", twice, "--out", tmp_path / "a", *FAST)
    assert "6 duplicates" in result.stdout
    preset = tmp_path / "nodedup.yaml"
    preset.write_text("dump:\n  dedup: false\n")
    refused = _cli("--config", preset, "--model", tiny["llama"], "--data", twice,
                   "--out", tmp_path / "b", *FAST, expect=1)
    assert "occur more than once" in refused.output and not (tmp_path / "b").exists()


def test_preset_flags_override_and_resolved_config_is_saved(tiny, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("# teacher-dump --config p.yaml\n"
                      f"dump:\n  model: {tiny['llama']}\n  top_k: 3\n  samples: 0\n"
                      "  max_length: 12\n  split_long: true\n  logprob_encoding: f32\n"
                      "train:\n  anything: goes\n")
    out = tmp_path / "store"
    _cli("--config", preset, "--data", tiny["text"], "--out", out, "--top-k", "5",
         "--device", "cpu", "--no-progress")
    store = StoreReader(str(out))
    saved = store.manifest["extra"]["teacher_dump_config"]
    assert saved["top_k"] == 5 and saved["samples"] == 0 and saved["max_length"] == 12
    assert store.settings.signals["llama"].topk.k == 5
    assert store.settings.signals["llama"].sampled is None
    assert any("#w1" in sid for sid in store.sample_ids)  # split into windows, not truncated
    assert max(store.index.column("length").to_pylist()) <= 12


@pytest.mark.parametrize("name", ["med42-to-llama3.2-1b", "qwen2-1.5b-to-qwen2-0.5b",
                                  "llama3-8b-to-llama3.2-1b", "tiny-cpu"])
def test_presets_resolve_and_say_how_to_use_them(name):
    path = REPO / "configs" / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith(f"# teacher-dump --config configs/{name}.yaml")
    assert f"# student-train --config configs/{name}.yaml" in text
    assert f"# distill-eval --config configs/{name}.yaml" in text
    cfg = resolve_config(path, {"model": "m", "data": ["d.jsonl"], "out": "store/"})
    assert cfg.top_k > 0
    # --config also takes a bundled preset's name.
    assert resolve_config(name, {"model": "m", "data": ["d.jsonl"], "out": "store/"}) == cfg


def test_every_setting_is_a_flag_and_a_preset_key(tmp_path):
    from teacher_dump.config import FIELDS

    assert {p.name for p in teacher_dump.params} - {"config_path", "verbose"} == set(FIELDS)
    preset = tmp_path / "p.yaml"
    preset.write_text("dump:\n  dedup: false\n  segment_tokens: 100\n")
    flags = ["--model", "m", "--data", "d.jsonl", "--out", "s"]
    from_flags = teacher_dump.make_context("teacher-dump", [
        *flags, "--no-dedup", "--segment-tokens", "100"]).params
    from_flags = {k: v for k, v in from_flags.items() if k in FIELDS}
    from_flags["data"] = list(from_flags["data"])
    assert resolve_config(None, from_flags) == \
        resolve_config(preset, {"model": "m", "data": ["d.jsonl"], "out": "s"})
    assert resolve_config(preset, {"model": "m", "data": ["d.jsonl"], "out": "s"}).dedup is False


def test_bad_config_lists_every_problem_at_once(tiny, tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("dump:\n  top_kk: 3\n  attention_grid: 0\n  hidden_pool: max\n"
                      "  samples: -1\n  hidden_layers: [-1, x]\n")
    # Flag values are checked by the same code as the preset's, so all come out together.
    result = _cli("--config", preset, "--model", tiny["llama"], "--quantize", "3bit",
                  "--sample-temperature", "0", "--format", "prompt-completion", expect=1)
    text = result.output
    assert "Traceback" not in text and "invalid configuration (9 problem(s))" in text
    for needle in ("unknown setting 'top_kk' (did you mean 'top_k'?)", "attention_grid",
                   "hidden_pool", "samples", "hidden_layers", "sample_temperature",
                   "quantize (command line): must be one of auto, 4bit, 8bit, none, got '3bit'",
                   "data is required", "out is required"):
        assert needle in text, needle
    missing = _cli("--config", tmp_path / "nope.yaml", "--data", "x", "--out", "y", expect=1)
    assert "cannot read config file" in missing.output
    no_section = tmp_path / "flat.yaml"
    no_section.write_text("top_k: 3\n")
    flat = _cli("--config", no_section, "--model", "m", "--data", "x", "--out", "y", expect=1)
    assert "no 'dump:' section (keys ['top_k'] belong under 'dump:')" in flat.output


def test_missing_model_offline_is_a_one_paragraph_error(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = _cli("--model", "logitstore-test-org/no-such-model", "--data", tiny["text"],
                  "--out", tmp_path / "s", *FAST, expect=1)
    assert "Traceback" not in result.output
    assert "teacher-dump: error: Could not load the tokenizer" in result.output
    assert "HF_HUB_OFFLINE=1" in result.output and not (tmp_path / "s").exists()
    result = _cli("--model", tmp_path / "no-dir" / "model", "--data", tiny["text"],
                  "--out", tmp_path / "s", *FAST, expect=1)
    assert "not an existing directory" in result.output


def test_refusals_resume_and_overwrite(tiny, tmp_path):
    out = tmp_path / "store"
    base = ["--model", tiny["llama"], "--data", tiny["text"], "--out", out, *FAST]
    _cli(*base)
    before = _content(out)
    # The same command again: everything is there, nothing is recomputed.
    again = _cli(*base)
    assert "0 samples, 0 tokens written (6 already in the store)" in again.stdout
    # A teacher with another tokenizer (format 2.2): its signal on a tokenization of its own
    # (tests/test_two_tokenizations_dump.py; a store without text is refused there).
    other = _cli("--model", tiny["other"], "--data", tiny["text"], "--out", out, "--signal",
                 "other", *FAST)
    assert "tokenization 'other'" in other.output
    assert StoreReader(str(out)).tokenizations == ["other"]
    # A content-changing flag: refused, naming the key; --overwrite replaces the store.
    changed = _cli(*base, "--top-k", "5", expect=1)
    assert "top_k: store has 4, now 5" in changed.output and "--overwrite" in changed.output
    assert _content(out)[1].keys() == before[1].keys()  # untouched
    _cli(*base, "--top-k", "5", "--overwrite")
    assert StoreReader(str(out)).settings.signals["llama"].topk.k == 5
    runs = StoreReader(str(out)).manifest["extra"]["teacher_dump_runs"]
    assert len(runs) == 1 and runs[0]["samples_written"] == 6



def test_a_resume_with_another_capture_kernel_is_refused(tiny, tmp_path):
    # Draws may differ at fp32 CDF boundaries between kernels (FORMAT.md section 6), so the
    # kernel is part of the signal's description; the layout-only batch size is not.
    from teacher_dump.logit_stats import resolve_kernel

    if resolve_kernel("auto", "cpu") != "compiled":
        pytest.skip("torch.compile is not usable here")
    out = tmp_path / "store"
    base = ["--model", tiny["llama"], "--data", tiny["text"], "--out", out, "--limit", "3", *FAST]
    _cli(*base, "--capture-kernel", "eager")
    signal = StoreReader(str(out)).settings.signals["llama"]
    assert signal.teacher["capture"] == "grouped-inverse-cdf/eager"
    refused = _cli(*base, "--capture-kernel", "compiled", expect=1)
    assert "teacher.capture" in refused.output and "compiled" in refused.output
    resumed = _cli(*base, "--capture-kernel", "eager", "--batch-tokens", "64")
    assert "(3 already in the store)" in resumed.output
    assert verify_store(str(out)) == []

def _signal_arrays(url, signal) -> dict:
    store = StoreReader(str(url))
    out = {}
    for sample in store.iter_samples(signals=[signal]):
        sig = sample.signals[signal]
        out[sample.sample_id] = {"topk_ids": sig.topk.ids, "topk_lp": sig.topk.logprobs,
                                 "tail": sig.topk.tail_logprob, "s_ids": sig.sampled.ids,
                                 "s_counts": sig.sampled.counts, "s_lp": sig.sampled.logprobs,
                                 "hidden": sig.hidden}
    return out


def _assert_same_signal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for sid in a:
        for key, value in a[sid].items():
            assert np.array_equal(value, b[sid][key]), (sid, key)


def test_second_teacher_signal_is_added_over_the_same_tokens(tiny, tmp_path):
    preset = tmp_path / "p.yaml"
    # batch_tokens 1: one sample per forward pass, so a stored segment's batches and a fresh
    # dump's give bit-identical numbers (no padding/batching effects to tolerate).
    preset.write_text("dump:\n  device: cpu\n  top_k: 4\n  samples: 8\n  hidden_layers: [-1]\n"
                      "  limit: 40\n  segment_tokens: 600\n  batch_tokens: 1\n")
    out = tmp_path / "store"
    common = ["--config", preset, "--data", tiny["many"], "--no-progress"]
    _cli(*common, "--model", tiny["llama"], "--out", out)
    first = _signal_arrays(out, "llama")
    added = _cli(*common, "--model", tiny["llama2"], "--signal", "second", "--out", out)
    assert "teacher-dump (add-signal): signal 'second'" in added.stdout
    assert "40 samples" in added.stdout
    store = StoreReader(str(out))
    assert sorted(store.signals) == ["llama", "second"] and len(store.segments) > 2
    assert verify_store(str(out)) == []
    assert store.manifest["extra"]["teacher_dump_signal_configs"]["second"]["model"] == str(
        tiny["llama2"])
    _assert_same_signal(_signal_arrays(out, "llama"), first)  # the first signal untouched
    # The same values as the second teacher dumped on its own.
    alone = tmp_path / "alone"
    _cli(*common, "--model", tiny["llama2"], "--signal", "second", "--out", alone)
    _assert_same_signal(_signal_arrays(out, "second"), _signal_arrays(alone, "second"))
    # Rerun: nothing left to do. Other data: refused (the signal must cover the stored tokens).
    again = _cli(*common, "--model", tiny["llama2"], "--signal", "second", "--out", out)
    assert "0 samples, 0 tokens written (40 already in the store)" in again.stdout
    other = _cli(*common, "--model", tiny["llama2"], "--signal", "third", "--out", out,
                 "--limit", "30", expect=1)
    assert "dataset fingerprint" in other.output


# ----------------------------------------------------------------------------- ranks


def test_batch_plan_and_rank_split():
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(1, 50, 200)] + [300]
    plan = plan_batches(lengths, 256)
    flat = [i for batch in plan for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)  # sorted by length (stable by input)
    for batch in plan:
        assert len(batch) * max(lengths[i] for i in batch) <= 256 or len(batch) == 1
    shares = [batches_of_rank(len(plan), r, 3) for r in range(3)]
    assert sorted(j for share in shares for j in share) == list(range(len(plan)))
    assert shares[1][:2] == [1, 4]


def test_writer_thread_errors_reach_the_main_thread():
    class FullDisk:
        aborted = closed = False

        def add(self, sample):
            raise OSError("No space left on device")

        def close(self):
            self.closed = True

        def abort(self):
            self.aborted = True

    writer = FullDisk()
    background = BackgroundWriter(writer, max_batches=1)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(100):  # the producer would block on the full queue without the check
            background.put(["sample"])
        background.finish()
    assert writer.aborted and not writer.closed


def test_two_ranks_in_process_equal_one_process(tiny, tmp_path):
    def config(out):
        return resolve_config(None, dict(model=str(tiny["llama"]), data=[str(tiny["many"])],
                                         out=str(out), top_k=4, samples=8, hidden_layers="-1",
                                         attention_layers="0", attention_grid=3, device="cpu",
                                         batch_tokens=256, segment_tokens=512, limit=40))

    run_dump(config(tmp_path / "one"), ranks=RankContext(), progress=False)
    # Rank 1 first: it does not commit; rank 0 (main) commits both parts.
    run_dump(config(tmp_path / "two"), ranks=RankContext(rank=1, world=2), progress=False)
    run_dump(config(tmp_path / "two"), ranks=RankContext(rank=0, world=2), progress=False)
    two = StoreReader(str(tmp_path / "two"))
    assert [p["name"] for p in two.manifest["parts"]] == ["rank-00000", "rank-00001"]
    assert verify_store(str(tmp_path / "two")) == []
    _assert_same_store(tmp_path / "one", tmp_path / "two")

    # A second signal: part i is added by rank i mod 2.
    def second(out):
        # One sample per batch: the two stores' segments differ, their numbers may not.
        return replace(config(out), model=str(tiny["llama2"]), signal="second",
                       attention_layers=(), batch_tokens=1)

    run_dump(second(tmp_path / "one"), ranks=RankContext(), progress=False)
    run_dump(second(tmp_path / "two"), ranks=RankContext(rank=1, world=2), progress=False)
    assert StoreReader(str(tmp_path / "two")).signals == ["llama"]  # half-added: invisible
    run_dump(second(tmp_path / "two"), ranks=RankContext(rank=0, world=2), progress=False)
    assert sorted(StoreReader(str(tmp_path / "two")).signals) == ["llama", "second"]
    assert verify_store(str(tmp_path / "two")) == []
    _assert_same_signal(_signal_arrays(tmp_path / "one", "second"),
                          _signal_arrays(tmp_path / "two", "second"))


# ----------------------------------------------------------------------------- processes


def _dump_command(tiny, out: Path, preset: Path) -> list[str]:
    return [sys.executable, "-m", "teacher_dump", "--config", str(preset), "--model",
            str(tiny["llama"]), "--data", str(tiny["many"]), "--out", str(out), "--no-progress"]


def _small_segments_preset(tmp_path: Path) -> Path:
    preset = tmp_path / "small.yaml"
    # ~9k tokens in ~6 segments: several commits before the end, yet few (each costs ~0.5 s).
    preset.write_text("dump:\n  device: cpu\n  top_k: 4\n  samples: 8\n  hidden_layers: [-1]\n"
                      "  limit: 150\n  batch_tokens: 256\n  segment_tokens: 1500\n"
                      "  chunk_tokens: 256\n")
    return preset


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _committed_segments(out: Path) -> int:
    """Segments the dump's part heads have committed (logitstore/FORMAT.md section 7)."""
    try:
        return sum(json.loads(head.read_text())["segments"]
                   for head in out.glob("parts/*/head.json"))
    except (OSError, ValueError, KeyError):
        return 0


def test_kill_9_mid_dump_then_resume_gives_the_same_store(tiny, tmp_path):
    preset = _small_segments_preset(tmp_path)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_dump_command(tiny, killed, preset), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _committed_segments(killed) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the dump ended before it could be killed: give it more data"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the dump ended before the kill reached it"
    partial = StoreReader(str(killed))
    assert 0 < len(partial) < 150
    # The same command again (in this process: a second interpreter start costs ~10 s).
    resumed = _cli(*_dump_command(tiny, killed, preset)[3:])
    assert f"({len(partial)} already in the store)" in resumed.stdout
    assert verify_store(str(killed)) == []

    fresh = tmp_path / "fresh"
    run_dump(resolve_config(preset, dict(model=str(tiny["llama"]), data=[str(tiny["many"])],
                                         out=str(fresh))), ranks=RankContext(), progress=False)
    _assert_same_store(killed, fresh)


@pytest.mark.slow  # ~20-35 s on 2 busy cores; the rank logic is also tested in-process above
def test_accelerate_two_processes_equal_one_process(tiny, tmp_path):
    preset = _small_segments_preset(tmp_path)
    two = tmp_path / "two"
    # `--multi_gpu` makes accelerate start 2 processes through torch's elastic launcher;
    # without a GPU they join a gloo CPU group (`accelerate launch --cpu` starts only one).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "teacher_dump",
               *_dump_command(tiny, two, preset)[3:]]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    store = StoreReader(str(two))
    assert [p["name"] for p in store.manifest["parts"]] == ["rank-00000", "rank-00001"]
    assert verify_store(str(two)) == []
    one = tmp_path / "one"
    run_dump(resolve_config(preset, dict(model=str(tiny["llama"]), data=[str(tiny["many"])],
                                         out=str(one))), ranks=RankContext(), progress=False)
    _assert_same_store(two, one)
