"""The GPU path in one run, one JSON report (``bash benchmarks/gpu_check.sh [REPORT]``).

    python -m benchmarks.gpu_check [--out gpu_check.json] [--budget-s 420] [--repeats 20]

Parts, each ``{"status": "ok" | "skipped" | "failed", "reason", ...}``:

* ``environment``: Python, torch and its CUDA, the GPU probe (``runtime.gpu``), TensorRT,
  onnxruntime's providers.
* ``torch_clip4str_b16`` and ``torch_default``: PyTorch CUDA latency of ``clip4str-b16``
  (random weights) and of the embedded default model at batch 1, 8 and 32: eager FP32, BF16
  autocast, and CUDA graphs where capture works (milliseconds per batch and per image).
* ``verify``: ``export.verify`` of the embedded bundle against its checkpoint on the shipped
  sample images (``runtime/assets/samples``, labelled by file name): identical strings and
  the largest logit difference per precision (runs on the CPU too).
* ``trt_engines``: where ``tensorrt`` imports and a GPU is there, FP32 engines for a copy of
  the embedded bundle, their parity with onnxruntime on the CPU and their latency.
* ``ort_gpu``: where onnxruntime has the CUDA (and TensorRT) provider, the same for those.

Everything it reads is inside the repository checkout (no network, no ``../shared``). A part
whose packages or hardware are missing is skipped with the reason; a part past the time
budget is skipped too. Exit status 0 unless a part failed. The paper's anchor: CLIP4STR-B at
3.41-3.52 ms per image on an A100 in PyTorch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "runtime" / "assets" / "samples"
BUNDLE = REPO / "runtime" / "assets" / "default_bundle"
BATCHES = (1, 8, 32)
PAPER_ANCHOR = "CLIP4STR-B: 3.41-3.52 ms per image, A100, PyTorch (the paper)"


class Skip(Exception):
    """A part that cannot run here; the message says why."""


def _need(*modules: str) -> None:
    """Skip unless every module imports (the reason names the missing ones)."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
            missing.append(f"{name} ({type(exc).__name__}: {exc})".splitlines()[0][:160])
    if missing:
        raise Skip("needs " + "; ".join(missing))


def _cuda_torch() -> Any:
    _need("torch")
    import torch

    if not torch.cuda.is_available():
        raise Skip(f"no CUDA GPU for PyTorch (torch {torch.__version__}, CUDA build {torch.version.cuda})")
    return torch


def environment() -> dict[str, Any]:
    from runtime.backends import gpu_status
    from runtime.gpu import tensorrt_status

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    probe = gpu_status()
    info["gpu"] = {"compute_capability": probe.compute_capability, "reason": probe.reason}
    info["tensorrt"] = dict(zip(("version", "reason"), tensorrt_status()))
    try:
        import onnxruntime

        info["onnxruntime"] = {"version": onnxruntime.__version__,
                               "providers": onnxruntime.get_available_providers()}
    except ImportError as exc:
        info["onnxruntime"] = {"reason": str(exc)}
    try:
        import torch

        info["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                         "cuda_available": torch.cuda.is_available()}
        if torch.cuda.is_available():
            info["torch"]["device"] = torch.cuda.get_device_name(0)
    except ImportError as exc:
        info["torch"] = {"reason": str(exc)}
    return info


def _time_cuda(torch: Any, fn: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of ``fn`` on the GPU (CUDA events; 3 warm-up calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _graph_runner(torch: Any, model: Any, x: Any) -> Callable[[], Any]:
    """``model(x)`` captured in a CUDA graph (raises when capture does not apply)."""
    static = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):
            model(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        model(static)
    return graph.replay


def torch_latency(model: Any, shape: tuple[int, int, int], repeats: int, deadline: float) -> dict[str, Any]:
    """Eager FP32, BF16 autocast and CUDA-graph latency at each of :data:`BATCHES`."""
    import torch

    rows: dict[str, Any] = {}
    for batch in BATCHES:
        if time.monotonic() > deadline:
            rows[str(batch)] = {"skipped": "time budget spent"}
            continue
        x = torch.randn(batch, *shape, device="cuda")
        row: dict[str, Any] = {}

        def eager(x: Any = x) -> Any:
            with torch.no_grad():
                return model(x)

        def bf16(x: Any = x) -> Any:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return model(x)

        for name, fn in (("eager_fp32", eager), ("bf16_autocast", bf16)):
            ms = _time_cuda(torch, fn, repeats)
            row[name] = {"ms_per_batch": round(ms, 3), "ms_per_image": round(ms / batch, 4)}
        try:
            ms = _time_cuda(torch, _graph_runner(torch, model, x), repeats)
            row["cuda_graph_fp32"] = {"ms_per_batch": round(ms, 3), "ms_per_image": round(ms / batch, 4)}
        except Exception as exc:  # noqa: BLE001 - capture fails on host syncs inside forward
            row["cuda_graph_fp32"] = {"skipped": f"capture does not apply ({type(exc).__name__}: {exc})"[:300]}
        rows[str(batch)] = row
    return rows


def torch_b16(repeats: int, deadline: float) -> dict[str, Any]:
    torch = _cuda_torch()
    _need("open_clip", "training.model.clip4str")
    from training.config import model_config
    from training.model.clip4str import CLIP4STR

    torch.manual_seed(0)
    cfg = model_config("clip4str-b16")
    model = CLIP4STR(cfg).eval().cuda()
    shape = (3, cfg.image.height, cfg.image.width)
    return {"model": "clip4str-b16, random weights", "input": list(shape),
            "batches": torch_latency(model, shape, repeats, deadline), "anchor": PAPER_ANCHOR}


def torch_default(repeats: int, deadline: float) -> dict[str, Any]:
    torch = _cuda_torch()
    _need("safetensors", "open_clip", "training.model.clip4str")
    from training.checkpoint import load_checkpoint

    model = load_checkpoint(BUNDLE, device="cuda")
    image = model.cfg.image
    width = image.typical_width if image.keep_aspect else image.width
    shape = (3, image.height, width)
    del torch
    return {"model": "embedded default (its checkpoint in the bundle)", "input": list(shape),
            "batches": torch_latency(model, shape, repeats, deadline)}


def _labelled_samples(folder: Path) -> Path:
    """A labels.tsv for the shipped samples (each file is named after its word)."""
    out = Path(tempfile.mkdtemp(prefix="gpu_check_")) / "samples" / "labels.tsv"
    out.parent.mkdir()
    out.write_text("".join(f"{p.resolve()}\t{p.stem}\n" for p in sorted(SAMPLES.glob("*.png"))))
    return out


def verify(deadline: float) -> dict[str, Any]:
    _need("torch", "safetensors", "open_clip", "training.model.clip4str")
    from export import verify as export_verify

    labels = _labelled_samples(SAMPLES)
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    precisions = [p for p in ("fp32", "fp16", "int8") if p in manifest["graphs"]]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = export_verify.main([str(BUNDLE), "--ckpt", str(BUNDLE), str(labels), "--precision", *precisions,
                                     "--threads", "2", "--json"])
    shutil.rmtree(labels.parent.parent, ignore_errors=True)
    if status != 0:
        raise RuntimeError(f"export.verify exited {status}: {out.getvalue()[-500:]}")
    report = json.loads(out.getvalue().strip().splitlines()[-1])
    return {"samples": str(SAMPLES.relative_to(REPO)), **report.get("total", {}),
            "sets": {name: {k: v for k, v in r.items() if k in ("n", "pytorch", "precisions")}
                     for name, r in report.get("sets", {}).items()}}


def _images() -> list[Any]:
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.png"))]


def _compare(bundle: Path, backend: str, precision: str, repeats: int) -> dict[str, Any]:
    """Parity with onnxruntime on the CPU, and latency per batch size, of one backend."""
    from runtime.recognizer import Recognizer

    images = _images()
    with Recognizer.from_bundle(bundle, backend="ort-cpu", llm="none", precision="fp32") as cpu:
        reference = cpu.read(images)
    with Recognizer.from_bundle(bundle, backend=backend, llm="none", precision=precision) as gpu:
        results = gpu.read(images)
        row: dict[str, Any] = {"backend": gpu.backend.name, "notes": list(getattr(gpu.backend, "notes", []))}
        same = sum(a.text == b.text for a, b in zip(results, reference))
        row["identical_pct"] = round(100.0 * same / len(images), 1)
        row["max_confidence_diff"] = max(abs((a.confidence or 0) - (b.confidence or 0))
                                         for a, b in zip(results, reference))
        latency = {}
        for batch in BATCHES:
            chunk = (images * (batch // len(images) + 1))[:batch]
            gpu.read(chunk, batch_size=batch)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                gpu.read(chunk, batch_size=batch)
                times.append(1000 * (time.perf_counter() - start))
            latency[str(batch)] = {"ms_per_batch": round(statistics.median(times), 3),
                                   "ms_per_image": round(statistics.median(times) / batch, 4)}
        row["latency_end_to_end"] = latency
    return row


def trt_engines(repeats: int, deadline: float) -> dict[str, Any]:
    from export.trt import BuildSettings, TensorRTUnavailable, build_engines, detect

    try:
        cc, version = detect()
    except TensorRTUnavailable as exc:
        raise Skip(str(exc)) from None
    work = Path(tempfile.mkdtemp(prefix="gpu_check_trt_")) / "bundle"
    shutil.copytree(BUNDLE, work)
    try:
        started = time.monotonic()
        build_engines(work, ["fp32"], BuildSettings(max_batch=32), compute_capability=cc, version=version,
                      log=lambda m: print(m, file=sys.stderr))
        row = {"compute_capability": cc, "tensorrt": version, "build_s": round(time.monotonic() - started, 1),
               "fp32": _compare(work, "trt", "fp32", repeats)}
        if time.monotonic() < deadline:
            try:
                build_engines(work, ["fp16"], BuildSettings(max_batch=32), compute_capability=cc, version=version,
                              log=lambda m: print(m, file=sys.stderr))
                row["fp16"] = _compare(work, "trt", "fp16", repeats)
            except ImportError as exc:  # fp16 graphs are derived by export.onnx (the export extra)
                row["fp16"] = {"skipped": f"fp16 graphs need the export extra ({exc})"}
        return row
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)


def ort_gpu(repeats: int, deadline: float) -> dict[str, Any]:
    import onnxruntime

    from runtime.gpu import ort_gpu_problem

    problem = ort_gpu_problem(onnxruntime.get_available_providers())
    if problem:
        raise Skip(problem)
    rows = {}
    for backend in ("ort-cuda", "ort-trt"):
        if time.monotonic() > deadline:
            rows[backend] = {"skipped": "time budget spent"}
            continue
        try:
            rows[backend] = _compare(BUNDLE, backend, "fp32", repeats)
        except Exception as exc:  # noqa: BLE001 - one provider failing is a finding, not the end
            rows[backend] = {"failed": f"{type(exc).__name__}: {exc}"[:400]}
    return rows


def run_part(name: str, fn: Callable[[], dict[str, Any]], deadline: float) -> dict[str, Any]:
    """One part, timed; ``skipped``/``failed`` with the reason instead of raising."""
    if time.monotonic() > deadline:
        return {"status": "skipped", "reason": "time budget spent"}
    started = time.monotonic()
    try:
        result = {"status": "ok", **fn()}
    except Skip as exc:
        result = {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the report says what broke, the other parts still run
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:600],
                  "traceback": traceback.format_exc()[-2000:]}
    result["seconds"] = round(time.monotonic() - started, 1)
    print(f"gpu_check: {name}: {result['status']}"
          + (f" ({result['reason']})" if result.get("reason") else ""), file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                     description="The GPU path in one run: one JSON report (see the module doc).")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting parts after this many seconds")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    began = time.monotonic()
    deadline = began + args.budget_s
    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "environment": environment,
        "torch_clip4str_b16": lambda: torch_b16(args.repeats, deadline),
        "torch_default": lambda: torch_default(args.repeats, deadline),
        "verify": lambda: verify(deadline),
        "trt_engines": lambda: trt_engines(args.repeats, deadline),
        "ort_gpu": lambda: ort_gpu(args.repeats, deadline),
    }
    report: dict[str, Any] = {"tool": "benchmarks.gpu_check", "anchor": PAPER_ANCHOR, "parts": {}}
    for name, fn in parts.items():
        report["parts"][name] = run_part(name, fn, deadline)
    report["seconds"] = round(time.monotonic() - began, 1)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"gpu_check: report in {args.out} ({report['seconds']} s)", file=sys.stderr)
    return 1 if any(p["status"] == "failed" for p in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
