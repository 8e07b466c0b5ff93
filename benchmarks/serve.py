"""Serving and batch reading: throughput (crops/s) and latency (p50/p99) of single-image
requests at 1, 8 and 32 concurrent clients for the in-process recognizer (one shared
recognizer with one onnxruntime thread, as a replica has; one call at a time) and the Ray
Serve deployment with 1 and 2 replicas (one CPU each); the throughput of ``clipllama-batch``
and of one in-process ``Recognizer.read`` loop over the same crops.

    python -m benchmarks.serve [--set ../shared/data/eval/ic13/labels_857.tsv] [--requests 200]

Crops: the labelled set's images when it is there, else rendered words (serving.samples).
Each configuration is warmed up, then runs ``--requests`` requests (spread over the clients).
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import clean_nan, fmt, machine, machine_line, markdown_table, percentile, print_json
from serving.common import RecognizerSettings, missing_serve_extra

DEFAULT_SET = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "ic13" / "labels_857.tsv"
CLIENTS = (1, 8, 32)


def crops(path: Path, count: int) -> list[tuple[str, bytes]]:
    """``count`` ``(name, encoded image)``: the set's files, else rendered words."""
    if path.is_file():
        from runtime.inputs import open_input

        samples = list(open_input(path).samples)[:count]
        return [(s.source, Path(s.data).read_bytes()) for s in samples]
    from serving.samples import word_images

    return [(f"word{i}.png", data) for i, (_, data) in enumerate(word_images(count))]


def drive(call: Callable[[bytes], Any], images: Sequence[bytes], clients: int, requests: int) -> dict[str, Any]:
    """``clients`` threads sending ``requests`` single-image calls in all; rate and latencies."""
    latencies: list[float] = []
    lock = threading.Lock()
    per_client = max(1, requests // clients)

    def work(k: int) -> None:
        mine = []
        for i in range(per_client):
            start = time.perf_counter()
            call(images[(k * per_client + i) % len(images)])
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    for i in range(min(4, len(images))):  # warm-up
        call(images[i])
    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = [1000 * x for x in latencies]
    return {"requests": len(ms), "crops_per_s": len(ms) / wall, "p50_ms": percentile(ms, 50),
            "p99_ms": percentile(ms, 99)}


def in_process(settings: RecognizerSettings, images: Sequence[bytes], requests: int) -> dict[int, Any]:
    recognizer = settings.build(num_cpus=1)  # one onnxruntime thread, as one replica has
    lock = threading.Lock()

    def call(data: bytes) -> Any:
        with lock:
            return recognizer.read([data])

    return {c: drive(call, images, c, requests) for c in CLIENTS}


def served(settings: RecognizerSettings, images: Sequence[bytes], requests: int, replicas: int,
           port: int) -> dict[int, Any]:
    from ray import serve

    from serving.app import Batching, Limits, build_app
    from serving.client import ReadClient

    serve.run(build_app(settings, Limits(), Batching(), replicas=replicas, num_cpus=1.0), name="clipllama",
              route_prefix="/")
    local = threading.local()

    def call(data: bytes) -> Any:
        if not hasattr(local, "client"):
            local.client = ReadClient(f"http://127.0.0.1:{port}")
        return local.client.read_one(data)

    try:
        return {c: drive(call, images, c, requests) for c in CLIENTS}
    finally:
        serve.delete("clipllama")


def batch_reading(settings: RecognizerSettings, named: Sequence[tuple[str, bytes]], concurrency: int,
                  num_cpus: float) -> dict[str, Any]:
    """clipllama-batch over the crops written to a folder (Ray already started)."""
    from serving import batch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "crops"
        folder.mkdir()
        for i, (_, data) in enumerate(named):
            (folder / f"{i:05d}.png").write_bytes(data)
        argv = [str(folder), "-o", str(Path(tmp) / "out"), "--llm", settings.llm or "none",
                "--concurrency", str(concurrency), "--num-cpus", str(num_cpus), "--part-size", "100000"]
        start = time.perf_counter()
        with _quiet():
            status = batch.main(argv)
        wall = time.perf_counter() - start
    return {"crops": len(named), "crops_per_s": len(named) / wall, "wall_s": wall, "status": status,
            "concurrency": concurrency, "num_cpus": num_cpus}


def read_loop(settings: RecognizerSettings, images: Sequence[bytes]) -> dict[str, Any]:
    recognizer = settings.build()  # clipllama-run's default: a thread per CPU
    recognizer.read(list(images[:8]))
    start = time.perf_counter()
    recognizer.read(list(images))
    wall = time.perf_counter() - start
    return {"crops": len(images), "crops_per_s": len(images) / wall, "wall_s": wall}


class _quiet:
    """Ray Data's progress lines off stderr while a run is timed."""

    def __enter__(self) -> None:
        self.saved, sys.stderr = sys.stderr, io.StringIO()

    def __exit__(self, *exc: object) -> None:
        sys.stderr = self.saved


def table(results: dict[str, Any]) -> str:
    base = results["in-process"]
    rows = []
    for name in ("in-process", "serve-1", "serve-2"):
        for clients, r in results[name].items():
            ratio = r["crops_per_s"] / base[clients]["crops_per_s"]
            rows.append([name, clients, fmt(r["crops_per_s"]), fmt(ratio, 2, "x"), fmt(r["p50_ms"]), fmt(r["p99_ms"])])
    one = base[1]["crops_per_s"]
    for name in ("read-loop", "batch-1", "batch-2"):
        r = results[name]
        rows.append([name, "-", fmt(r["crops_per_s"]), fmt(r["crops_per_s"] / one, 2, "x"), "-", "-"])
    return markdown_table(["configuration", "clients", "crops/s", "vs in-process", "p50 ms", "p99 ms"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    message = missing_serve_extra()
    if message:
        print(message, file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", type=Path, default=DEFAULT_SET, help="labelled set whose images are read")
    parser.add_argument("--crops", type=int, default=400, help="crops used (default: 400)")
    parser.add_argument("--requests", type=int, default=200, help="requests per configuration (default: 200)")
    parser.add_argument("--llm", default="none", help="LLM for every configuration (default: none)")
    args = parser.parse_args(argv)
    import ray
    from ray import serve

    settings = RecognizerSettings(llm=args.llm)
    named = crops(args.set, args.crops)
    images = [data for _, data in named]
    info = machine()
    results: dict[str, Any] = {"in-process": in_process(settings, images, args.requests),
                               "read-loop": read_loop(settings, images)}
    ray.init(include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        results["serve-1"] = served(settings, images, args.requests, 1, port)
        results["serve-2"] = served(settings, images, args.requests, 2, port)
        serve.shutdown()
        results["batch-1"] = batch_reading(settings, named, 1, 1.0)
        results["batch-2"] = batch_reading(settings, named, 2, 0.8)
    finally:
        ray.shutdown()
    print(machine_line(info))
    print(f"crops: {len(named)} from {args.set if args.set.is_file() else 'rendered words'}; LLM: {args.llm}; "
          f"{args.requests} requests per configuration")
    print(table(results))
    print_json(clean_nan({"machine": info, "results": json.loads(json.dumps(results))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
