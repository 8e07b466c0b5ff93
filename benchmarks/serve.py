"""Serving and batch reading: throughput (crops/s) and latency (p50/p99) of single-image
requests at 1, 8 and 32 concurrent clients for the in-process recognizer (one shared
recognizer with one onnxruntime thread, as a replica has; one call at a time) and the Ray
Serve deployment with 1 and 2 replicas (one CPU each); the throughput of ``clipllama-batch``
and of one in-process ``Recognizer.read`` loop over the same crops.

    python -m benchmarks.serve [--set ../shared/data/eval/ic13/labels_857.tsv] [--requests 200]

Crops: the labelled set's images when it is there, else rendered words (serving.samples).
Each configuration is warmed up, then runs ``--requests`` requests (spread over the clients);
``--rounds`` rounds, every other one in reverse order, and the medians are reported (the
machines are shared and noisy). clipllama-batch's time includes its start (actors loading the
bundle), as a user waits for it.
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

from benchmarks.common import clean_nan, fmt, machine, machine_line, markdown_table, median, percentile, print_json
from runtime.recognizer import DEFAULT_BATCH_SIZE
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
    """clipllama-batch's pipeline over the crops written to a folder (Ray already started):
    throughput over the whole run, its start included, and the time of a run over one chunk
    (mostly that start: actors created, bundle loaded)."""
    from serving import batch

    resources = batch.Resources(concurrency=concurrency, num_cpus=num_cpus)

    def run(chunks: list[dict[str, Any]]) -> tuple[int, float]:
        start, count = time.perf_counter(), 0
        with _quiet():
            for records in batch.read_chunks(chunks, settings, DEFAULT_BATCH_SIZE, resources):
                count += len(records)
        return count, time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "crops"
        folder.mkdir()
        for i, (_, data) in enumerate(named):
            (folder / f"{i:05d}.png").write_bytes(data)
        named_sets, _ = batch.list_inputs([str(folder)])
        chunks = batch.plan(named_sets, DEFAULT_BATCH_SIZE, False, set()).chunks
        _, start_s = run(chunks[:1])
        count, wall = run(chunks)
    assert count == len(named)
    return {"crops": count, "crops_per_s": count / wall, "wall_s": wall, "start_s": start_s}


def read_loop(settings: RecognizerSettings, images: Sequence[bytes]) -> dict[str, Any]:
    recognizer = settings.build(num_cpus=1)  # one onnxruntime thread, as an actor has
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


def run_round(name: str, settings: RecognizerSettings, named: Sequence[tuple[str, bytes]], requests: int,
              port: int) -> Any:
    """One configuration, once."""
    images = [data for _, data in named]
    if name == "in-process":
        return in_process(settings, images, requests)
    if name == "read-loop":
        return read_loop(settings, images)
    if name.startswith("serve-"):
        return served(settings, images, requests, int(name[-1]), port)
    return batch_reading(settings, named, int(name[-1]), 1.0 if name == "batch-1" else 0.8)


def combine(rounds: list[Any]) -> Any:
    """Medians over rounds (per client count for the request configurations), with the
    lowest and highest throughput."""
    first = rounds[0]
    if "crops_per_s" not in first:
        return {c: combine([r[c] for r in rounds]) for c in first}
    rates = [r["crops_per_s"] for r in rounds]
    out = {k: median([r[k] for r in rounds]) for k in first if isinstance(first[k], float)}
    return {**out, "crops_per_s_min": min(rates), "crops_per_s_max": max(rates), "rounds": len(rounds)}


def table(results: dict[str, Any]) -> str:
    base = results["in-process"]
    rows = []
    for name in ("in-process", "serve-1", "serve-2"):
        for clients, r in results[name].items():
            ratio = r["crops_per_s"] / base[clients]["crops_per_s"]
            rows.append([name, clients, fmt(r["crops_per_s"]), _spread(r), fmt(ratio, 2, "x"), fmt(r["p50_ms"]),
                         fmt(r["p99_ms"])])
    one = base[1]["crops_per_s"]
    for name in ("read-loop", "batch-1", "batch-2"):
        r = results[name]
        label = f"{name} (one chunk: {r['start_s']:.1f} s)" if "start_s" in r else name
        rows.append([label, "-", fmt(r["crops_per_s"]), _spread(r), fmt(r["crops_per_s"] / one, 2, "x"), "-", "-"])

    return markdown_table(["configuration", "clients", "crops/s", "range", "vs in-process", "p50 ms", "p99 ms"],
                          rows)


def _spread(r: dict[str, Any]) -> str:
    return f"{r['crops_per_s_min']:.0f}-{r['crops_per_s_max']:.0f}"


CONFIGURATIONS = ("in-process", "read-loop", "serve-1", "serve-2", "batch-1", "batch-2")


def main(argv: Sequence[str] | None = None) -> int:
    message = missing_serve_extra()
    if message:
        print(message, file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", type=Path, default=DEFAULT_SET, help="labelled set whose images are read")
    parser.add_argument("--crops", type=int, default=400, help="crops used (default: 400)")
    parser.add_argument("--requests", type=int, default=200, help="requests per configuration (default: 200)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds, every other one in reverse order; medians reported (default: 2)")
    parser.add_argument("--llm", default="none", help="LLM for every configuration (default: none)")
    args = parser.parse_args(argv)
    import ray
    from ray import serve

    settings = RecognizerSettings(llm=args.llm)
    named = crops(args.set, args.crops)
    info = machine()
    ray.init(include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    measured: dict[str, list[Any]] = {name: [] for name in CONFIGURATIONS}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for k in range(args.rounds):
            for name in CONFIGURATIONS if k % 2 == 0 else reversed(CONFIGURATIONS):
                measured[name].append(run_round(name, settings, named, args.requests, port))
                print(f"round {k + 1}: {name} done", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    results = {name: combine(rounds) for name, rounds in measured.items()}
    print(machine_line(info))
    print(f"crops: {len(named)} from {args.set if args.set.is_file() else 'rendered words'}; LLM: {args.llm}; "
          f"{args.requests} requests per configuration and round; {args.rounds} rounds (medians)")
    print(table(results))
    print_json(clean_nan({"machine": info, "results": json.loads(json.dumps(results)),
                          "rounds": json.loads(json.dumps(measured))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
