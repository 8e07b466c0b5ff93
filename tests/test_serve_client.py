"""ReadClient without Ray: retries on 5xx and lost connections, not on refusals; the
entry points' messages when the serve extra or the arguments are wrong."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from serving import batch, serve
from serving.client import ReadClient, RequestRefused, multipart


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 ``fail`` times, then echoes what it got; 413 for bodies over 100 bytes."""

    fail = 0
    bodies: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).bodies.append((self.headers["Content-Type"], body))
        if len(body) > 100:
            return self._answer(413, {"error": "too big"})
        if type(self).fail > 0:
            type(self).fail -= 1
            return self._answer(503, {"error": "replica gone"})
        self._answer(200, {"results": [{"source": "<bytes 0>", "text": "ok", "error": None}]})

    def _answer(self, status: int, data: dict) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Flaky.fail, _Flaky.bodies = 0, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join(timeout=10)


def test_retries_until_answered(server: str) -> None:
    _Flaky.fail = 3
    client = ReadClient(server, retries=5, backoff_s=0.01)
    assert client.read_one(b"img")["text"] == "ok"
    assert client.retried == 3 and len(_Flaky.bodies) == 4
    assert _Flaky.bodies[-1] == ("application/octet-stream", b"img")


def test_gives_up_after_retries(server: str) -> None:
    _Flaky.fail = 10
    with pytest.raises(RequestRefused) as info:
        ReadClient(server, retries=2, backoff_s=0.01).read_one(b"img")
    assert info.value.status == 503 and len(_Flaky.bodies) == 3


def test_refusal_is_not_retried(server: str) -> None:
    client = ReadClient(server, retries=5, backoff_s=0.01)
    with pytest.raises(RequestRefused, match="too big"):
        client.read_one(b"x" * 200)
    assert client.retried == 0 and len(_Flaky.bodies) == 1


def test_lost_connection_is_retried_then_raised() -> None:
    client = ReadClient("http://127.0.0.1:9", retries=2, backoff_s=0.01, timeout_s=5)
    with pytest.raises(OSError):
        client.read_one(b"img")
    assert client.retried == 2


def test_multipart_parts_carry_names() -> None:
    body, content_type = multipart([b"AAA", b"BBB"], ["a.png", 'we"ird\nname'])
    boundary = content_type.split("boundary=")[1]
    assert body.count(f"--{boundary}\r\n".encode()) == 2 and body.endswith(f"--{boundary}--\r\n".encode())
    assert b'filename="a.png"' in body and b'filename="we%22ird name"' in body and b"\r\n\r\nBBB\r\n" in body


@pytest.mark.parametrize("entry", [serve.main, batch.main])
def test_missing_extra_is_one_line(entry, monkeypatch, capsys) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert entry(["x", "-o", "y"] if entry is batch.main else []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'clipllama[serve]'" in err


def test_serve_refuses_bad_arguments_before_ray(capsys) -> None:
    pytest.importorskip("ray", reason="the serve extra is not installed")
    assert serve.main(["--threshold", "2"]) == 2
    assert "threshold" in capsys.readouterr().err
    assert serve.main(["--engine", "/nonexistent/bundle"]) == 2
    assert serve.main(["--replicas", "0"]) == 2
    capsys.readouterr()
    # a user's word list (the option clipllama-run has too) must be readable before Ray starts
    for entry, argv in ((serve.main, []), (batch.main, ["x", "-o", "y"])):
        assert entry([*argv, "--lexicon", "/nonexistent/words.txt"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "words.txt" in err


def test_serve_settings_carry_the_lexicon(tmp_path: Path) -> None:
    from serving.common import settings_from_args

    words = tmp_path / "words.txt"
    words.write_text("zylatab\n")
    args = serve.build_parser().parse_args(["--lexicon", str(words), "--llm", "none"])
    assert settings_from_args(args).lexicon == str(words)
    assert serve.build_parser().parse_args([]).lexicon == "default"
