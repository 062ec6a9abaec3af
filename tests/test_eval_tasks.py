"""distill-eval task resolution, local task files, network handling and fast skipping of
unreachable hub tasks (no model needed)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from eval import tasks as T
from logitstore.errors import ConfigError

SHIPPED = T.SHIPPED_DIR


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_medical_and_local_groups():
    medical = T.resolve_tasks("medical")
    assert [r.name for r in medical] == list(T.MEDICAL_TASKS)
    assert {"medmcqa", "pubmedqa", "medqa_4options", "mmlu_virology"} <= {r.name for r in medical}
    assert all(r.kind == "hub" for r in medical)
    local = T.resolve_tasks(" local ,")
    assert {r.name for r in local} == {"medmcq_mini", "medgen_mini"}
    assert all(r.kind == "yaml" and Path(r.source).is_file() for r in local)


def test_jsonl_kind_is_detected(tmp_path):
    mcq = _jsonl(tmp_path / "my_mcq.jsonl",
                 [{"question": "q?", "choices": ["a", "b"], "answer": 1}])
    gen = _jsonl(tmp_path / "my_gen.jsonl", [{"prompt": "p", "reference": "r"}])
    requests = T.resolve_tasks(f"{mcq},{gen},medmcqa")
    assert [(r.name, r.kind) for r in requests] == [("my_mcq", "jsonl"), ("my_gen", "jsonl"),
                                                    ("medmcqa", "hub")]
    mcq_cfg, gen_cfg = T.task_config(requests[0]), T.task_config(requests[1])
    assert mcq_cfg["output_type"] == "multiple_choice" and mcq_cfg["task"] == "my_mcq"
    assert gen_cfg["output_type"] == "generate_until"
    assert mcq_cfg["dataset_kwargs"]["data_files"] == {"test": str(mcq)}


def test_bad_task_entries_are_all_reported(tmp_path):
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "no task keys"}])
    with pytest.raises(ConfigError) as info:
        T.resolve_tasks(f"{bad},{tmp_path / 'missing.yaml'},local,medgen_mini")
    text = str(info.value)
    assert "question/choices/answer" in text and "does not exist" in text
    assert "'medgen_mini' is listed twice" in text
    with pytest.raises(ConfigError, match="empty"):
        T.resolve_tasks(" , ")


def test_shipped_yaml_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: relative paths would break here
    for request in T.resolve_tasks("local"):
        files = T.task_config(request)["dataset_kwargs"]["data_files"]["test"]
        assert Path(files).is_absolute() and Path(files).is_file()
        assert Path(files).parent == SHIPPED


def test_user_yaml_relative_data_files(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    _jsonl(data / "qs.jsonl", [{"question": "q?", "choices": ["a", "b"], "answer": 0}])
    text = (SHIPPED / "medmcq_mini.yaml").read_text()
    text = text.replace("task: medmcq_mini", "task: my_task").replace(
        "test: medmcq_mini.jsonl", "test: data/qs.jsonl")
    (tmp_path / "my.yaml").write_text(text)
    monkeypatch.chdir(SHIPPED)
    (request,) = T.resolve_tasks(str(tmp_path / "my.yaml"))
    assert request.name == "my_task"
    assert T.task_config(request)["dataset_kwargs"]["data_files"]["test"] == \
        str(data / "qs.jsonl")


def test_local_tasks_load_and_user_jsonl_runs_as_shipped_definition(tmp_path):
    mcq = _jsonl(tmp_path / "mine.jsonl", [
        {"question": f"q{i}?", "choices": ["yes", "no", "maybe"], "answer": i % 3}
        for i in range(5)])
    with T.network("offline") as net:
        loaded, _ = T.load_tasks(T.resolve_tasks(f"local,{mcq}"), net=net)
    assert set(loaded.tasks) == {"medmcq_mini", "medgen_mini", "mine"}
    assert not loaded.skipped
    docs = list(loaded.tasks["mine"].test_docs())
    assert len(docs) == 5 and loaded.tasks["mine"].doc_to_choice(docs[0]) == ["yes", "no",
                                                                             "maybe"]
    assert loaded.info["medgen_mini"]["output_type"] == "generate_until"


def test_unreachable_hub_task_is_skipped_fast_while_others_load(monkeypatch):
    # auto mode, no HF_*_OFFLINE set, hub endpoint refusing connections: the probe turns
    # offline mode on, so medmcqa fails on the cache lookup instead of retrying for minutes.
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with T.network("auto", probe_timeout_s=2.0) as net:
        assert net.offline and "unreachable" in net.reason
        assert os.environ["HF_DATASETS_OFFLINE"] == "1"
        loaded, _ = T.load_tasks(T.resolve_tasks("medmcqa,medmcq_mini"), net=net)
    elapsed = time.monotonic() - start
    assert "HF_DATASETS_OFFLINE" not in os.environ  # restored
    assert list(loaded.tasks) == ["medmcq_mini"]
    reason = loaded.skipped["medmcqa"]
    assert "could not be loaded" in reason and "offline" in reason
    assert loaded.info["medmcqa"] == {"status": "skipped", "reason": reason}
    assert elapsed < 20, f"skipping an unreachable task took {elapsed:.1f} s"


def test_network_modes_respect_user_variables(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with T.network("auto") as net:  # the user's choice wins; no probe
        assert not net.offline and "HF_HUB_OFFLINE=0" in net.reason
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with T.network("auto") as net:
        assert net.offline
    import huggingface_hub.constants as hub_constants

    before = hub_constants.HF_HUB_OFFLINE
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with T.network("offline"):
        assert hub_constants.HF_HUB_OFFLINE is True
    assert hub_constants.HF_HUB_OFFLINE == before and "HF_HUB_OFFLINE" not in os.environ
    with pytest.raises(ConfigError):
        with T.network("sometimes"):
            pass


def test_probe_gives_up_within_its_timeout(monkeypatch):
    # 10.255.255.1 is unroutable: the connect fails at once, times out, or a proxy in
    # between answers with an error status; each counts as unreachable.
    for endpoint in ("http://10.255.255.1:81", "http://127.0.0.1:9"):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        start = time.monotonic()
        reason = T.probe_hub(timeout_s=0.5)
        assert reason is not None and endpoint in reason
        assert time.monotonic() - start < 5


def test_call_with_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        T.call_with_timeout(lambda: time.sleep(5), 0.2)
    assert time.monotonic() - start < 2
    with pytest.raises(KeyError):
        T.call_with_timeout(lambda: {}["x"], 2)
    assert T.call_with_timeout(lambda: 7, 2) == 7 and T.call_with_timeout(lambda: 8, None) == 8


def test_a_hanging_hub_task_is_time_boxed(monkeypatch):
    class HangingManager:
        all_tasks = ["medmcqa"]

        def load(self, specs):
            time.sleep(10)

    monkeypatch.setattr(T, "task_manager", lambda requests: HangingManager())
    net = T.NetworkState(False, "test")
    start = time.monotonic()
    loaded, _ = T.load_tasks([T.TaskRequest("medmcqa", "hub", "medmcqa")], net=net,
                             timeout_s=0.3)
    assert time.monotonic() - start < 3
    assert "timed out" in loaded.skipped["medmcqa"]


def test_metric_keys_are_flattened():
    values, errors = T._metrics({"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                 "acc_stderr,other": "N/A", "bypass,none": 999,
                                 "exact_match,strict-match": 0.25, "sample_len": 3})
    assert values == {"acc": 0.5, "exact_match[strict-match]": 0.25}
    assert errors == {"acc": 0.1}


@pytest.mark.slow
def test_unknown_task_name_is_a_config_error():
    # Needs lm-eval's full task index (about a minute).
    with T.network("offline") as net, pytest.raises(ConfigError, match="unknown task"):
        T.load_tasks(T.resolve_tasks("not_a_task_xyz"), net=net)


def test_module_does_not_import_training_or_dumping_code():
    import subprocess

    code = ("import sys, eval.cli, eval.runner, eval.tasks, eval.report, eval.perplexity, "
            "eval.efficiency, eval.generation; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('teacher_dump', "
            "'student_train')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(T.__file__).resolve().parents[1])
    assert result.returncode == 0, result.stdout + result.stderr
