"""The ways this project reads a batch, behind one timing interface.

* :class:`TorchEngine`: the PyTorch model in eager mode (``training.checkpoint``), the
  baseline: the same preprocessing code, ``forward`` and the same decoding and gate.
* :class:`BundleEngine`: the bundle through ``runtime.recognizer.Recognizer`` on one
  backend and precision (onnxruntime CPU/CUDA/TensorRT, TensorRT engines).

``run(images)`` returns the batch's wall time and the milliseconds spent per stage (the
recognizer's stage names; the PyTorch model has one ``forward`` stage for all graphs).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from runtime.recognizer import STAGES

#: The stages that run inside a graph (or the eager model), not on the host.
GRAPH_STAGES = ("image_encoder", "image_encoder_recheck", "visual_decoder", "text_encoder", "cross_decoder", "forward")
#: Stage columns of the reports, in pipeline order.
ALL_STAGES = ("preprocess", "forward", *STAGES[1:])


@dataclass
class BatchTiming:
    """One timed batch: wall time and the time per stage, both for the whole batch."""

    wall_ms: float
    stages_ms: dict[str, float] = field(default_factory=dict)
    gated: int = 0
    errors: int = 0

    @property
    def graph_ms(self) -> float:
        return sum(v for k, v in self.stages_ms.items() if k in GRAPH_STAGES)

    @property
    def host_ms(self) -> float:
        """Time outside the graphs (and outside llama.cpp)."""
        return max(0.0, self.wall_ms - self.graph_ms - self.stages_ms.get("llm", 0.0))


class TorchEngine:
    """The checkpoint in PyTorch, eager, on the CPU (or ``device``)."""

    kind = "pytorch"

    def __init__(self, ckpt: str | Path, threads: int | None = None, device: str = "cpu") -> None:
        import torch

        from training.checkpoint import load_checkpoint

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = load_checkpoint(ckpt, device=device)
        self.key = "pytorch"
        self.label = f"PyTorch eager {device} fp32"
        self.backend, self.precision = f"torch-{device}", "fp32"
        self.threshold = float(self.model.cfg.threshold)

    def run(self, images: list[Image.Image]) -> BatchTiming:
        """Read ``images`` in batches of equal padded width, as ``Recognizer.read`` does."""
        from runtime.correction.gate import gate
        from runtime.preprocess import load_image, preprocess, width_groups

        torch, model = self.torch, self.model
        stages = dict.fromkeys(("preprocess", "forward", "decode_gate"), 0.0)
        gated = 0
        start = time.perf_counter()
        pictures = [load_image(image) for image in images]
        stages["preprocess"] += 1000 * (time.perf_counter() - start)
        for indices in width_groups([p.size for p in pictures], model.cfg.image, max(1, len(pictures))):
            t0 = time.perf_counter()
            x = torch.from_numpy(preprocess([pictures[i] for i in indices], model.cfg.image)).to(model.device)
            t1 = time.perf_counter()
            with torch.inference_mode():
                out = model(x)
            t2 = time.perf_counter()
            gated += sum(gate(p, self.threshold).needs_llm for p in model.predictions(out, topk=5))
            t3 = time.perf_counter()
            for stage, ms in (("preprocess", t1 - t0), ("forward", t2 - t1), ("decode_gate", t3 - t2)):
                stages[stage] += 1000 * ms
        return BatchTiming(1000 * (time.perf_counter() - start), stages, gated)

    def close(self) -> None:
        pass


class BundleEngine:
    """The bundle on one backend and precision, through the runtime's recognizer."""

    kind = "onnx"

    def __init__(self, bundle: str | Path, backend: str, precision: str, threads: int | None = None,
                 corrector: Any | None = None, llm_mode: str = "rescore") -> None:
        from runtime.backends import select_backend
        from runtime.bundle import load_bundle
        from runtime.recognizer import Recognizer

        loaded = load_bundle(bundle)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            chosen = select_backend(loaded, backend, precision, threads)
        self.recognizer = Recognizer(loaded, chosen, corrector, llm_mode=llm_mode)
        self.backend, self.precision = chosen.name, precision
        #: what a user must hear about this engine (an int8 graph this CPU computes worse)
        self.warnings: list[str] = list(getattr(chosen, "warnings", []))
        spec = getattr(getattr(chosen, "fast", chosen), "specs", {}).get("image_encoder")
        #: the image encoder graph file timed (which int8 graph this CPU reads); None for engines
        self.image_encoder: str | None = spec.file if spec is not None else None
        self.key = f"{chosen.name}/{precision}"
        self.label = f"{chosen.name} {precision}"
        self.threshold = self.recognizer.threshold

    def run(self, images: list[Image.Image]) -> BatchTiming:
        start = time.perf_counter()
        results = self.recognizer.read(images, batch_size=max(1, len(images)))
        wall = 1000 * (time.perf_counter() - start)
        stages: dict[str, float] = {}
        for result in results:
            for stage, ms in result.timings_ms.items():
                stages[stage] = stages.get(stage, 0.0) + ms
        timing = BatchTiming(wall, stages, sum(r.gated for r in results), sum(not r.ok for r in results))
        timing.results = results  # type: ignore[attr-defined]
        return timing

    def close(self) -> None:
        self.recognizer.close()


def backend_choices(bundle_path: str | Path) -> list[tuple[str, str]]:
    """Every (backend, precision) this machine can run for the bundle: onnxruntime CPU for
    each precision, CUDA and TensorRT providers when installed with a GPU, TensorRT engines
    that match this GPU."""
    import onnxruntime as ort

    from runtime.backends import RECHECKED, gpu_compute_capability, matching_engines, recheck_threshold
    from runtime.bundle import BundleError, load_bundle

    bundle = load_bundle(bundle_path, verify=False)
    providers = ort.get_available_providers()
    gpu = gpu_compute_capability() is not None
    out = [("ort-cpu", p) for p in bundle.precisions]
    try:
        recheck_threshold(bundle)
    except BundleError:
        pass
    else:
        out.append(("ort-cpu", RECHECKED))
    if gpu and "CUDAExecutionProvider" in providers:
        out += [("ort-cuda", p) for p in bundle.precisions]
    if gpu and "TensorrtExecutionProvider" in providers:
        out += [("ort-trt", p) for p in bundle.precisions]
    for precision in sorted({e.precision for e in bundle.engines}):
        if gpu and len(matching_engines(bundle, precision, warn=False)) == 4:
            out.append(("trt", precision))
    return out
