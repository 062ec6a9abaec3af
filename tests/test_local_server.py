"""logitstore.toolkit.local_server against tiny stdlib HTTP servers run as real processes:
readiness after a few 503s, a server that exits or never answers (LocalServerError with its
log tail, bounded time), SIGTERM's exit code, the process always gone after the `with`
block, the temporary log removed and a given log kept; a server used before it was started
fails with LocalServerError saying how to start it."""

from __future__ import annotations

import socket
import sys
import textwrap
import time

import pytest

from logitstore.toolkit.local_server import (LocalServer, LocalServerError, free_port,
                                             http_status)

# Answers 503 to the first NOT_READY requests, then 200; exits 0 on SIGTERM.
SERVER = textwrap.dedent("""
    import http.server, signal, sys
    port, not_ready = int(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    seen = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen[0] += 1
            status = 503 if seen[0] <= not_ready else 200
            body = b'{"n": %d}' % seen[0]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    print("listening on", port, flush=True)
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
""")


def server(port: int, not_ready: int = 0, **kwargs) -> LocalServer:
    return LocalServer([sys.executable, "-c", SERVER, str(port), str(not_ready)],
                       health_url=f"http://127.0.0.1:{port}/ping", name="tiny-http", **kwargs)


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_ready_after_the_health_url_answers_200_and_sigterm_exits_0():
    port = free_port()
    answers: list[tuple[int, bytes]] = []
    with server(port, not_ready=3) as running:
        ready_s = running.wait_ready(30, interval_s=0.02,
                                     on_answer=lambda *answer: answers.append(answer))
        assert ready_s > 0
        assert [status for status, _ in answers] == [503, 503, 503, 200]
        assert answers[-1][1] == b'{"n": 4}'
        assert running.stop(timeout_s=30) == 0
        assert "listening on" in running.log_tail()
        log = running.log_path
    assert not log.exists()  # a temporary log goes with the server


def test_a_server_that_exits_fails_fast_with_its_log_tail(tmp_path):
    log = tmp_path / "logs" / "server.log"
    crash = [sys.executable, "-c", "import sys; print('cannot load the model'); sys.exit(3)"]
    started = time.monotonic()
    with LocalServer(crash, health_url=f"http://127.0.0.1:{free_port()}/ping",
                     log_path=log, name="crasher") as running:
        with pytest.raises(LocalServerError) as caught:
            running.wait_ready(60)
    assert time.monotonic() - started < 30
    message = str(caught.value)
    assert message.startswith("crasher exited 3 before it was ready")
    assert str(log) in message and "cannot load the model" in message
    assert log.read_text().strip() == "cannot load the model"  # a given log is kept


def test_a_server_that_never_answers_times_out_and_is_killed_on_exit():
    silent = [sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(600)"]
    with LocalServer(silent, health_url=f"http://127.0.0.1:{free_port()}/ping") as running:
        started = time.monotonic()
        with pytest.raises(LocalServerError, match=r"did not answer 200 .* within 0.5 s"):
            running.wait_ready(0.5)
        assert time.monotonic() - started < 10
        process = running.process
    assert process.poll() is not None  # killed by the with block


def test_an_exception_in_the_block_still_kills_the_server():
    port = free_port()
    with pytest.raises(ZeroDivisionError):
        with server(port) as running:
            running.wait_ready(30)
            process = running.process
            1 / 0
    assert process.poll() is not None
    assert http_status(f"http://127.0.0.1:{port}/ping", timeout_s=1) is None


@pytest.mark.parametrize("call", [lambda s: s.wait_ready(1), lambda s: s.terminate(),
                                  lambda s: s.wait(1), lambda s: s.stop(1)],
                         ids=["wait_ready", "terminate", "wait", "stop"])
def test_a_server_never_started_says_so(call):
    never = server(free_port())
    with pytest.raises(LocalServerError, match=r"^tiny-http was not started; use it as a "
                                               r"context manager .* or call start\(\)"):
        call(never)
    never.close()  # closing one never started is fine
