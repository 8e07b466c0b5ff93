"""clipllama-serve on a local Ray (2 CPUs, loopback): concurrent clients, a killed replica,
bad images and limits. Reference: the in-process recognizer reading each request alone."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="the serve extra is not installed (pip install 'clipllama[serve]')")
serve = pytest.importorskip("ray.serve", reason="the serve extra is not installed (pip install 'clipllama[serve]')")

from runtime.recognizer import Recognizer  # noqa: E402
from serving.app import Batching, Limits, build_app  # noqa: E402
from serving.client import ReadClient, RequestRefused  # noqa: E402
from serving.common import RecognizerSettings, json_record  # noqa: E402
from serving.samples import word_images  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SETTINGS = RecognizerSettings(llm="none")
LIMITS = Limits(max_request_bytes=1024 * 1024, max_images=16, max_pixels=1_000_000)
FLOATS = ("confidence", "vision_confidence", "char_confidences")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deploy(merge: str) -> None:
    serve.run(build_app(SETTINGS, LIMITS, Batching(merge=merge), replicas=2, num_cpus=1.0),
              name="clipllama", route_prefix="/")


def _replicas() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::clipllama")]


def _wait_running(count: int, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get("clipllama")
        if app is not None and str(app.status).endswith("RUNNING") and len(_replicas()) == count:
            return
        time.sleep(0.5)
    raise AssertionError(f"the application did not get back to {count} running replicas in {limit_s} s")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _deploy("width")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def reference() -> Iterator[Recognizer]:
    with SETTINGS.build(num_cpus=1) as recognizer:
        yield recognizer


IMAGES = word_images(40, seed=14)


def _same(got: dict[str, Any], want: dict[str, Any], exact: bool) -> None:
    skip = ("timings_ms",) if exact else ("timings_ms", *FLOATS)
    assert {k: v for k, v in got.items() if k not in skip} == {k: v for k, v in want.items() if k not in skip}
    if not exact:  # a batch of another size rounds onnxruntime's sums differently (about 1e-7)
        for key in FLOATS:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def _clients(url: str, count: int, requests: int, on_answer: Any = None) -> tuple[list[list[Any]], int]:
    """``count`` threads each posting ``requests`` single-image requests; answers and retries."""
    answers: list[list[Any]] = [[] for _ in range(count)]
    clients = [ReadClient(url, retries=10, timeout_s=120) for _ in range(count)]

    def work(k: int) -> None:
        for i in range(requests):
            index = (k * 7 + i) % len(IMAGES)
            try:
                answers[k].append((index, clients[k].read_one(IMAGES[index][1])))
            except Exception as exc:  # recorded, so the test reports it
                answers[k].append((index, exc))
            if on_answer is not None:
                on_answer()

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=400)
    assert not any(t.is_alive() for t in threads), "a client did not finish in 400 s"
    return answers, sum(c.retried for c in clients)


def test_health(url: str) -> None:
    health = ReadClient(url).health()
    assert health["status"] == "ok" and health["llm"] is False and health["backend"].startswith("ort")
    assert health["views"]["stretches"] == [1.1, 1.2]  # the embedded bundle's (defaults.views)
    assert health["views"]["turns"]["min_aspect"] == 1.25  # tall doubtful crops read turned
    assert health["specialist"] is None  # the embedded bundle has no fine-tuned specialist


@pytest.mark.parametrize("merge", ["width", "request"])
def test_eight_clients_fifty_requests_match_in_process(url: str, reference: Recognizer, merge: str) -> None:
    if merge != "width":
        _deploy(merge)
        _wait_running(2)
    try:
        want = [json_record(reference.read([data])[0], reference) for _, data in IMAGES]
        answers, _ = _clients(url, 8, 50)
        assert sum(len(a) for a in answers) == 400
        for per_client in answers:
            for index, record in per_client:
                assert isinstance(record, dict), record
                _same(record, want[index], exact=merge == "request")
    finally:
        if merge != "width":
            _deploy("width")
            _wait_running(2)


def test_killed_replica_loses_nothing(url: str, reference: Recognizer) -> None:
    _wait_running(2)
    want = [json_record(reference.read([data])[0], reference) for _, data in IMAGES]
    done = threading.Semaphore(0)
    killer_result: list[str] = []

    def kill_when_loaded() -> None:
        for _ in range(20):  # after 20 answers, mid-load
            if not done.acquire(timeout=120):
                return
        victim = _replicas()[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killer_result.append(victim)

    killer = threading.Thread(target=kill_when_loaded, daemon=True)
    killer.start()
    answers, retried = _clients(url, 4, 40, on_answer=done.release)
    killer.join(timeout=10)
    assert killer_result, "no replica was killed"
    assert sum(len(a) for a in answers) == 160
    for per_client in answers:
        for index, record in per_client:
            assert isinstance(record, dict), record
            _same(record, want[index], exact=False)
    _wait_running(2)
    assert killer_result[0] not in _replicas()  # Serve replaced it
    print(f"replica {killer_result[0]} killed; the clients sent {retried} request(s) again")


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (255, 255, 255)).save(out, format="PNG")
    return out.getvalue()


def test_bad_images_are_error_records(url: str, reference: Recognizer) -> None:
    good = [IMAGES[0][1], IMAGES[1][1], IMAGES[2][1]]
    truncated = good[0][: len(good[0]) // 2]
    images = [good[0], b"not an image", good[1], truncated, _png(2000, 1000), good[2]]
    records = ReadClient(url).read(images, names=[f"img{i}" for i in range(len(images))])
    assert [r["source"] for r in records] == [f"img{i}" for i in range(len(images))]
    assert [r["error"] is not None for r in records] == [False, True, False, True, True, False]
    assert "not an image" in records[1]["error"] and "truncated" in records[3]["error"]
    assert "1000000-pixel limit" in records[4]["error"]
    for k, data in zip((0, 2, 5), good):
        _same(records[k], {**json_record(reference.read([data])[0], reference), "source": f"img{k}"}, exact=False)


def test_request_without_usable_image_is_400(url: str) -> None:
    import urllib.error
    import urllib.request

    records = ReadClient(url).read([b"junk"])  # 400, and the record says why
    assert len(records) == 1 and "not an image" in records[0]["error"]
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(url + "/read", data=b"junk", method="POST"), timeout=60)
    assert info.value.code == 400
    with pytest.raises(RequestRefused, match="no image"):
        ReadClient(url).read_one(b"")


def test_limits(url: str) -> None:
    client = ReadClient(url, retries=0)
    with pytest.raises(RequestRefused, match="17 images exceed the 16-image limit") as info:
        client.read([IMAGES[0][1]] * 17)
    assert info.value.status == 413
    with pytest.raises(RequestRefused, match="byte limit") as info:
        client.read_one(b"\0" * (1024 * 1024 + 1))
    assert info.value.status == 413


def _post(url: str, body: bytes, content_type: str) -> tuple[int, dict[str, Any]]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url + "/read", data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_fuzz_corpus_over_http(url: str, tmp_path) -> None:
    """The bad-input corpus (tests/fuzz_corpus.py) posted 16 files a request, then each bad
    kind alone: one record per file, an error exactly for the bad ones (and for those over
    this server's 1-megapixel limit), the documented status codes: 200 when one image was
    read, 413 when none was and one was over the pixel limit, else 400."""
    from fuzz_corpus import make_corpus

    from serving.client import multipart

    corpus = make_corpus(tmp_path / "fuzz")
    readable = {e.path.name: e.readable for e in corpus}
    for start in range(0, len(corpus), 16):
        chunk = corpus[start:start + 16]
        body, content_type = multipart([e.path.read_bytes() for e in chunk], [e.path.name for e in chunk])
        status, answer = _post(url, body, content_type)
        records = answer["results"]
        assert [r["source"] for r in records] == [e.path.name for e in chunk]
        for record in records:
            assert (record["error"] is None) == readable[record["source"]], record
            assert record["error"] is None or record["error"].startswith(record["source"]), record["error"]
        assert status == (200 if any(e.readable for e in chunk) else 400 if not any(
            "pixel limit" in r["error"] for r in records) else 413)
    alone = {}
    for entry in corpus:
        if not entry.readable and entry.kind not in alone:
            alone[entry.kind] = _post(url, entry.path.read_bytes(), "application/octet-stream")[0]
    for kind in ("huge_header_png", "huge_header_gif", "huge_header_jpeg", "decompression_bomb"):
        assert alone.pop(kind) == 413, kind
    assert set(alone.values()) == {400}, alone
    status, answer = _post(url, *multipart([b"junk"], ["a.png"]))
    assert status == 400 and answer["results"][0]["error"].startswith("a.png: ")
    body = (b"--b\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n--b--\r\n")
    status, answer = _post(url, body, "multipart/form-data; boundary=b")
    assert status == 400 and "form fields are not images" in answer["error"]
