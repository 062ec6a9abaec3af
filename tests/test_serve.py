"""distill-serve: the real server process on a free loopback port, driven over HTTP with httpx
(tests/serve_client.py), plus the batcher and error paths in-process against a small numpy
backend of the real InferenceModel (its real decode loop).

Two servers start (a tiny Llama, torch fp32): one shared by the request tests, one drained by
SIGTERM through the container's `serve` entry point.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_client import ROOT, ServeProcess
from tiny_hf import make_tiny_llama, make_tokenizer

from logitstore.toolkit.inference import InferenceModel

PROMPTS = ["The patient reports", "A 54-year-old woman presents with", "The child denies",
           "An elderly man was admitted with", "Blood pressure was", "The nurse",
           "Follow-up is planned", "Question: What is the most likely diagnosis?"]
LONG = "The patient reports chest pain. "  # 10 tokens each; BOS + 20 of them = 201 tokens
SERVER_LIMIT = 64  # --max-new-tokens of the shared server
MODEL_MAX_LENGTH = 256  # the tiny Llama's max_position_embeddings
STEP_DELAY_S = 0.1  # LOGITSTORE_SERVE_STEP_DELAY_S of the server drained by SIGTERM


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-model")
    return make_tiny_llama(root / "llama", make_tokenizer(root / "tokenizer"))


@pytest.fixture(scope="module")
def server(model_dir):
    """The shared server; `.pings` holds the /ping answers seen until the first 200."""
    with ServeProcess.start(model_dir, "--max-batch", "8", "--batch-wait-ms", "100",
                            "--max-new-tokens", str(SERVER_LIMIT),
                            env={"LOGITSTORE_SERVE_LOAD_DELAY_S": "1.5"}) as process:
        process.pings = process.ping_statuses()
        yield process


def metric_samples(server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of GET /metrics, parsed by prometheus_client."""
    response = server.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples}


# ----------------------------------------------------------------------------- the process


def test_ping_answers_503_while_loading_then_200_with_the_model_kind(server):
    statuses = [status for status, _ in server.pings]
    assert statuses[0] == 503 and statuses[-1] == 200, statuses
    assert "loading" in server.pings[0][1]["error"]
    assert server.pings[-1][1] == {"status": "ready", "model": "torch-fp32",
                                   "max_length": MODEL_MAX_LENGTH}


def test_concurrent_greedy_requests_are_batched_and_equal_sequential_ones(server):
    def invoke(prompt):
        response = server.invoke({"prompt": prompt, "max_new_tokens": 12})
        assert response.status_code == 200, response.text
        return response.json()

    alone = [invoke(p) for p in PROMPTS]
    assert all(r["batch_size"] == 1 for r in alone)
    assert len({r["text"] for r in alone}) > 1  # the prompts lead to different answers
    batch_sizes = []
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        for _ in range(3):  # a burst is normally one batch; a slow client thread may miss it
            together = list(pool.map(invoke, PROMPTS))
            for a, b in zip(alone, together):
                assert (b["text"], b["completion_tokens"], b["finish_reason"]) == \
                    (a["text"], a["completion_tokens"], a["finish_reason"])
            batch_sizes += [r["batch_size"] for r in together]
            if max(batch_sizes) > 1:
                break
    assert 1 < max(batch_sizes) <= 8, batch_sizes
    timings = together[0]["timings"]
    assert 0 <= timings["queue_ms"] and 0 < timings["generate_ms"] <= timings["total_ms"]


def test_chat_messages_use_the_tokenizer_chat_template(server, model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "The patient reports chest pain."}]
    response = server.invoke({"messages": messages, "max_new_tokens": 4})
    assert response.status_code == 200, response.text
    rendered = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>\n")
    assert response.json()["prompt_tokens"] == \
        len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_seeded_sampling_repeats(server):
    body = {"prompt": "The nurse", "max_new_tokens": 10, "temperature": 1.5, "seed": 7}
    first, again = server.invoke(body).json(), server.invoke(body).json()
    greedy = server.invoke({"prompt": "The nurse", "max_new_tokens": 10}).json()
    assert first["text"] == again["text"] and first["text"] != greedy["text"]


BAD_REQUESTS = [  # (body, status, words of the error)
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
    ([1, 2], 422, "must be a JSON object"),
    ({"prompt": "a", "stop": ["\n"]}, 422, "unknown field 'stop'"),
    ({"prompt": "a", "max_tokens": 5}, 422, "unknown field 'max_tokens'"),
    ({"prompt": ""}, 422, "prompt is empty"),
    ({}, 422, "exactly one of 'prompt' and 'messages', found neither"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 422, "found both"),
    ({"prompt": 5}, 422, "field 'prompt': input should be a valid string"),
    ({"prompt": ["a"]}, 422, "found an array"),
    ({"prompt": "a", "max_new_tokens": "8"}, 422, "valid integer, found a string"),
    ({"prompt": "a", "max_new_tokens": True}, 422, "valid integer, found true"),
    ({"prompt": "a", "max_new_tokens": 0}, 422, "greater than or equal to 1"),
    ({"prompt": "a", "max_new_tokens": SERVER_LIMIT + 1}, 422,
     f"over this server's limit of {SERVER_LIMIT}"),
    ({"prompt": LONG * 20, "max_new_tokens": SERVER_LIMIT}, 422,
     f"over the model's {MODEL_MAX_LENGTH}"),
    ({"prompt": LONG * 30}, 422, "no room to generate"),
    (b'{"prompt": "' + b"a" * (4 * 2**20) + b'"}', 413, "over 4 MiB"),
    ({"prompt": "a", "temperature": -0.5}, 422, "field 'temperature'"),
    ({"prompt": "a", "top_p": 1.5}, 422, "field 'top_p'"),
    ({"prompt": "a", "seed": -1}, 422, "field 'seed'"),
    ({"messages": []}, 422, "messages is empty"),
    ({"messages": "hello"}, 422, "field 'messages'"),
    ({"messages": [{"role": "user"}]}, 422, "'messages.0.content' is missing"),
    ({"messages": [{"role": "user", "content": "a", "name": "x"}]}, 422,
     "unknown field 'messages.0.name'"),
]


@pytest.mark.parametrize("body,status,words", BAD_REQUESTS,
                         ids=[f"{i}-{s}" for i, (_, s, _) in enumerate(BAD_REQUESTS)])
def test_a_bad_request_gets_4xx_and_one_error_sentence(server, body, status, words):
    response = server.invoke(body)
    assert response.status_code == status, response.text
    error = response.json()
    assert list(error) == ["error"] and words in error["error"], error
    assert "\n" not in error["error"] and len(error["error"]) < 300
    assert server.client.get("/ping").status_code == 200  # still serving


def test_a_chunked_body_is_cut_off_once_over_the_limit(server):
    chunks = (b'{"prompt": "', *[b"a" * 2**20] * 5, b'"}')  # no Content-Length: chunked
    response = server.invoke(iter(chunks))
    assert response.status_code == 413 and "over 4 MiB" in response.json()["error"]
    assert server.invoke({"prompt": "The child", "max_new_tokens": 2}).status_code == 200


def test_unknown_routes_and_methods_answer_the_error_shape_too(server):
    for response, status in ((server.client.get("/invocations"), 405),
                             (server.client.get("/nowhere"), 404)):
        assert response.status_code == status
        assert "POST /invocations" in response.json()["error"]
    assert server.invoke({"prompt": "The child", "max_new_tokens": 3}).status_code == 200


def test_metrics_parse_and_count_the_requests(server):
    before = metric_samples(server)
    answers = [server.invoke({"prompt": p, "max_new_tokens": 5}).json() for p in PROMPTS[:2]]
    assert server.invoke({"prompt": ""}).status_code == 422
    assert server.invoke(b"{").status_code == 400
    after = metric_samples(server)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("distill_serve_requests_total", code="200") == 2
    assert grew("distill_serve_requests_total", code="422") == 1
    assert grew("distill_serve_requests_total", code="400") == 1
    assert grew("distill_serve_generated_tokens_total") == \
        sum(a["completion_tokens"] for a in answers)
    assert grew("distill_serve_prompt_tokens_total") == sum(a["prompt_tokens"] for a in answers)
    assert grew("distill_serve_request_latency_seconds_count") == 2
    assert grew("distill_serve_batch_size_count") == 2
    assert after[("distill_serve_generation_tokens_per_second", ())] > 0
    assert after[("distill_serve_queue_depth", ())] == 0
    assert after[("distill_serve_requests_in_progress", ())] == 0
    assert after[("distill_serve_model_loaded", ())] == 1
    log = server.log()
    assert "POST /invocations 200 prompt_tokens=" in log and PROMPTS[1] not in log


def test_sigterm_drains_the_running_and_the_queued_request_then_exits_0(model_dir):
    # Through the container entry point: `docker stop` sends SIGTERM to `serve`.
    # --max-batch 1: the second request waits in the batcher's queue behind the first.
    # The step-delay hook makes every forward take >= STEP_DELAY_S, so the first request
    # (the prompt's forward + 19 decode steps) needs >= 2 s however fast the machine: far
    # more than the few /metrics polls between its start and the SIGTERM.
    tokens = [20, 8]
    with ServeProcess.start(model_dir, "--max-batch", "1", serve_entry=True,
                            env={"LOGITSTORE_SERVE_STEP_DELAY_S": str(STEP_DELAY_S)}) as server:
        server.ping_statuses()
        bodies = [{"prompt": "x", "max_new_tokens": tokens[0]},
                  {"prompt": "The nurse", "max_new_tokens": tokens[1]}]
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(server.invoke, bodies[0])
            _wait_for_metric(server, "distill_serve_requests_in_progress", 1)
            queued = pool.submit(server.invoke, bodies[1])
            _wait_for_metric(server, "distill_serve_queue_depth", 1)
            server.terminate()
            assert server.wait(timeout=120) == 0, server.log()
            answers = [running.result(timeout=5), queued.result(timeout=5)]
        log = server.log()
    assert [a.status_code for a in answers] == [200, 200], log
    assert [a.json()["completion_tokens"] for a in answers] == tokens
    assert "test hook LOGITSTORE_SERVE_STEP_DELAY_S=0.1 is set" in log
    shutdown = log.index("Shutting down")  # uvicorn stopped accepting before both answers
    assert all(log.index(f"completion_tokens={n} ") > shutdown for n in tokens), log


def _wait_for_metric(server, name: str, value: float, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric_samples(server).get((name, ())) == value:
            return
        time.sleep(0.02)
    raise AssertionError(f"{name} never reached {value}:\n{server.log()}")


# ----------------------------------------------------------------------------- the command


def run_cli(*args: str, env: dict[str, str] | None = None, entry: str = "-m distill_serve"):
    command = ["-c", "from distill_serve.cli import serve_main; serve_main()"] \
        if entry == "serve" else ["-m", "distill_serve"]
    return subprocess.run([sys.executable, *command, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def assert_one_paragraph(done, prog: str = "distill-serve") -> str:
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"{prog}: error: ") and "Traceback" not in done.stderr
    return done.stderr


def test_bad_arguments_exit_1_before_anything_loads(tmp_path, model_dir):
    err = assert_one_paragraph(run_cli(str(tmp_path / "missing"), "--max-batch", "0",
                                       "--port", "70000", "--batch-wait-ms", "x"))
    assert all(w in err for w in ("missing", "found nothing there", "max_batch", "port",
                                  "batch_wait_ms"))
    (tmp_path / "empty").mkdir()
    assert "found none of those files" in assert_one_paragraph(run_cli(str(tmp_path / "empty")))
    err = assert_one_paragraph(run_cli(str(model_dir), env={
        "LOGITSTORE_SERVE_LOAD_DELAY_S": "soon", "LOGITSTORE_SERVE_STEP_DELAY_S": "-1"}))
    assert "LOGITSTORE_SERVE_LOAD_DELAY_S" in err and "LOGITSTORE_SERVE_STEP_DELAY_S" in err
    assert run_cli(str(model_dir), "--no-such-flag").returncode == 2


def test_a_hub_id_passes_the_path_checks_and_a_missing_path_does_not(tmp_path):
    from distill_serve.config import model_problem

    assert model_problem("some-org/some-model") is None  # ORG/NAME: fetched when loading
    for missing in (str(tmp_path / "gone"), "./gone/export", "~/gone-export-dir"):
        assert "found nothing there" in model_problem(missing), missing
    assert "not a hub id" in model_problem("runs/student/final/missing")


def test_a_port_in_use_is_reported_before_the_model_loads(model_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        err = assert_one_paragraph(run_cli(str(model_dir), "--port", str(port)))
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err
    assert time.monotonic() - started < 30  # no model load behind it


def test_a_model_that_fails_to_load_stops_the_server_with_exit_1(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    with ServeProcess.start(broken) as server:
        assert server.wait(timeout=120) == 1
        log = server.log()
    assert "distill-serve: error: " in log and "Traceback" not in log, log


def test_serve_reads_the_model_and_flags_from_the_container_environment(tmp_path):
    err = assert_one_paragraph(run_cli(entry="serve", env={
        "MODEL_DIR": str(tmp_path / "model"), "DISTILL_SERVE_MAX_BATCH": "0"}), prog="serve")
    assert str(tmp_path / "model") in err and "max_batch" in err
    err = assert_one_paragraph(run_cli("--port", "-1", entry="serve", env={
        "MODEL_DIR": "", "SM_MODEL_DIR": str(tmp_path / "sm")}), prog="serve")
    assert str(tmp_path / "sm") in err and "port" in err


# ----------------------------------------------------------------------------- in-process


class StepLM(InferenceModel):
    """A numpy backend for the real InferenceModel decode loop: the next token is the last
    one + 1 (mod V). Records each batch's size; raises on a prompt holding `fail_token`."""

    kind = "numpy-step"
    source = "memory"
    max_length = 64

    def __init__(self, tokenizer, fail_token: int | None = None):
        self.tokenizer = tokenizer
        self.eos_token_ids = (tokenizer.eos_token_id,)
        self.fail_token = fail_token
        self.batches: list[int] = []

    def forward(self, input_ids, attention_mask, past):
        if past is None:
            self.batches.append(input_ids.shape[0])
            if self.fail_token is not None and (input_ids == self.fail_token).any():
                raise RuntimeError("the backend failed")
        vocab = len(self.tokenizer)
        logits = np.zeros((*input_ids.shape, vocab), dtype=np.float32)  # [B, t, V]
        np.put_along_axis(logits, ((input_ids + 1) % vocab)[..., None], 1.0, axis=2)
        return logits, "no cache"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("serve-tokenizers")
    return (AutoTokenizer.from_pretrained(make_tokenizer(root / "chat")),
            AutoTokenizer.from_pretrained(make_tokenizer(root / "plain", chat_template=None)))


def in_process_client(tmp_path, load, **settings):
    from fastapi.testclient import TestClient

    from distill_serve.app import create_app
    from distill_serve.config import resolve_config

    (tmp_path / "config.json").write_text("{}")
    cfg = resolve_config(None, {k: str(v) for k, v in settings.items()}, model=str(tmp_path))
    failures: list[str] = []
    client = TestClient(create_app(cfg, load, on_load_failure=failures.append))
    client.failures = failures
    return client


def wait_ready(client, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/ping").status_code != 200:
        assert time.monotonic() < deadline, "the model never loaded"
        time.sleep(0.02)


def test_batches_never_exceed_max_batch(tmp_path, tokenizers):
    model = StepLM(tokenizers[0])
    with in_process_client(tmp_path, lambda: model, max_batch=3, batch_wait_ms=300) as client:
        wait_ready(client)
        with ThreadPoolExecutor(7) as pool:
            answers = list(pool.map(lambda p: client.post(
                "/invocations", json={"prompt": p, "max_new_tokens": 4}).json(), PROMPTS[:7]))
    assert max(model.batches) == 3 and sum(model.batches) == 7, model.batches
    assert sorted(a["batch_size"] for a in answers) == sorted(
        size for size in model.batches for _ in range(size))


def test_a_failed_generation_answers_500_and_the_next_request_works(tmp_path, tokenizers):
    tokenizer = tokenizers[0]
    bad_token = tokenizer("chest")["input_ids"][-1]
    with in_process_client(tmp_path, lambda: StepLM(tokenizer, fail_token=bad_token)) as client:
        wait_ready(client)
        failed = client.post("/invocations", json={"prompt": "chest"})
        assert failed.status_code == 500 and "RuntimeError" in failed.json()["error"]
        fine = client.post("/invocations", json={"prompt": "The nurse", "max_new_tokens": 3})
        assert fine.status_code == 200 and fine.json()["completion_tokens"] == 3


def test_messages_need_a_chat_template(tmp_path, tokenizers):
    with in_process_client(tmp_path, lambda: StepLM(tokenizers[1])) as client:
        wait_ready(client)
        response = client.post("/invocations", json={
            "messages": [{"role": "user", "content": "hello"}]})
        assert response.status_code == 422
        assert "no chat template" in response.json()["error"] and "'prompt'" in \
            response.json()["error"]
        assert client.post("/invocations", json={"prompt": "hello"}).status_code == 200


def test_a_load_failure_is_reported_and_ping_stays_503(tmp_path):
    from logitstore.errors import LogitStoreError

    def load():
        raise LogitStoreError("no weights in the directory; export the model again")

    with in_process_client(tmp_path, load) as client:
        deadline = time.monotonic() + 30
        while not client.failures:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.failures == ["no weights in the directory; export the model again"]
        assert client.get("/ping").status_code == 503
        assert client.post("/invocations", json={"prompt": "a"}).status_code == 503


@pytest.mark.parametrize("gap_s, burst, expected", [
    (0.02, 6, [6]),  # arrivals 20 ms apart, 100 ms in all: one batch (quiet gap 50 ms)
    (0.09, 3, [1, 1, 1]),  # arrivals further apart than the quiet gap: one batch each
])
def test_a_batch_closes_after_a_quiet_gap_not_a_fixed_window(gap_s, burst, expected):
    import asyncio

    from distill_serve.batcher import Batcher, _Job
    from distill_serve.metrics import ServeMetrics

    async def scenario() -> list[int]:
        batcher = Batcher(max_batch=16, wait_s=0.05, metrics=ServeMetrics())
        loop = asyncio.get_running_loop()

        async def arrive():
            for i in range(burst):
                batcher._queue.put_nowait(_Job([i], None, loop.create_future()))
                await asyncio.sleep(gap_s)

        arrivals = asyncio.create_task(arrive())
        sizes = []
        while sum(sizes) < burst:
            sizes.append(len(await batcher._collect()))
        await arrivals
        return sizes

    assert asyncio.run(scenario()) == expected


def test_a_steady_trickle_cannot_hold_a_batch_open_forever():
    import asyncio

    from distill_serve.batcher import MAX_WAIT_GAPS, Batcher, _Job
    from distill_serve.metrics import ServeMetrics

    async def scenario() -> tuple[int, float]:
        batcher = Batcher(max_batch=100, wait_s=0.05, metrics=ServeMetrics())
        loop = asyncio.get_running_loop()

        async def trickle():
            for i in range(40):  # one every 20 ms for 800 ms
                batcher._queue.put_nowait(_Job([i], None, loop.create_future()))
                await asyncio.sleep(0.02)

        arrivals = asyncio.create_task(trickle())
        started = loop.time()
        first = await batcher._collect()
        took = loop.time() - started
        arrivals.cancel()
        return len(first), took

    size, took = asyncio.run(scenario())
    assert took < MAX_WAIT_GAPS * 0.05 + 0.1 and 10 < size < 40, (size, took)
