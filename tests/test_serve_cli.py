"""``clipllama-serve`` as a user starts it: its own local Ray, HTTP on loopback, SIGTERM stops it cleanly."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the serve extra is not installed (pip install 'clipllama[serve]')")

from serving.client import ReadClient  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SAMPLES = Path(__file__).resolve().parents[1] / "runtime" / "assets" / "samples"


def test_command_serves_and_stops(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "serving.serve", "--port", str(port), "--llm", "none",
                                "--num-cpus", "1", "--max-batch-size", "4"], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, health = time.monotonic() + 180, None
        while health is None and process.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=5) as answer:
                    health = json.loads(answer.read())
            except OSError:
                time.sleep(0.5)
        assert health is not None and health["status"] == "ok", (tmp_path / "serve.log").read_text()[-2000:]
        sample = sorted(SAMPLES.glob("*.png"))[0]
        record = ReadClient(url).read([sample])[0]
        assert record["source"] == str(sample) and record["error"] is None and record["text"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        log.close()
