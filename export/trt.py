"""TensorRT engines for a bundle (needs an NVIDIA GPU and the ``trt`` extra: TensorRT 10 or 11).

    python -m export.trt CKPT_OR_BUNDLE -o BUNDLE_DIR [--fp16] [--max-batch 64] [--opt-batch 8]

First it checks that engines can be built here (an NVIDIA GPU, then the ``tensorrt``
package) and says what is missing before any other work. Given a checkpoint, the ONNX
bundle is then exported (``export.onnx``, the ``export`` extra). One engine per graph is
built with TensorRT's ONNX parser into a **strongly typed** network: the engine runs every
tensor in the type the ONNX graph gives it, so the FP16 engines keep the FP32 islands of the
fp16 graphs (LayerNorm, softmax, the head; ``export.precision``). No precision flag or
per-layer precision is set, and TF32 is off, so FP32 stays FP32 (TensorRT 10 and 11 differ
here; ``runtime.trt_api`` holds the difference). One optimisation profile covers the batch
axis (min 1, opt 8, max ``--max-batch``); a timing cache speeds up rebuilds. Engines go to
``trt/<graph>.<precision>.sm<CC>.trt<VERSION>.engine`` and are listed in the manifest's
``engines`` (entries for the same graph, precision, GPU and TensorRT version are replaced).

Exit codes: 0 engines built; 1 export or build failed (or a missing extra, said in one
line); 2 bad arguments; 3 no NVIDIA GPU or no ``tensorrt`` package: nothing was done, a given
bundle is left as it was.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from export.manifest import read_manifest, write_manifest
from runtime import trt_api
from runtime.bundle import MANIFEST_NAME
from runtime.gpu import GpuProbe, tensorrt_status
from runtime.preprocess import Preprocessing
from runtime.specialist import GRAPH_NAME as SPECIALIST_GRAPH

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NO_TENSORRT = 3
ENGINE_DIR = "trt"
#: the precisions TensorRT engines are built in (int8 runs in onnxruntime only; cf. runtime.backends.PRECISIONS)
PRECISIONS = ("fp32", "fp16")
#: pixels per image token of the aspect-keeping towers (PP-OCR's backbone downsamples by 8)
TOWER_WIDTH_STRIDE = 8


class TensorRTUnavailable(RuntimeError):
    """No NVIDIA GPU or no TensorRT here; the message says which."""


@dataclass(frozen=True)
class BuildSettings:
    """The optimisation profile over the batch axis and the builder's workspace."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
    workspace_gib: float = 4.0
    #: ``(min, opt, max)`` of each named dynamic axis besides the batch (an aspect-keeping
    #: tower's ``width`` and ``tokens``; :func:`dynamic_axis_ranges` reads them from a manifest)
    axes: tuple[tuple[str, tuple[int, int, int]], ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min ({self.min_batch}) <= opt ({self.opt_batch}) "
                             f"<= max ({self.max_batch}) batch")


#: ``builder(onnx_path, engine_path, input_shapes, settings, timing_cache_path)``;
#: ``input_shapes`` maps each input name to its shape with ``"batch"`` for the batch axis
Builder = Callable[[Path, Path, dict[str, list[Any]], BuildSettings, Path], None]


def _torch_capability() -> str | None:
    """The GPU's compute capability as PyTorch sees it (a second opinion when cuda-bindings
    are missing), or None."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{major}.{minor}"
    except Exception:  # no torch, or a CUDA build that cannot start
        pass
    return None


def detect(gpu: GpuProbe | None = None, trt: tuple[str | None, str | None] | None = None) -> tuple[str, str]:
    """``(compute capability "major.minor", TensorRT version)`` of this machine, or
    :class:`TensorRTUnavailable` saying what is missing, the GPU first.

    ``gpu`` and ``trt`` default to this machine's probes (``runtime.gpu``); tests pass fakes.
    """
    from runtime.backends import gpu_status

    gpu = gpu or gpu_status()
    cc = gpu.compute_capability or (None if gpu.absent else _torch_capability())
    version, trt_reason = trt or tensorrt_status()
    missing = []
    if cc is None:
        missing.append(f"no usable NVIDIA GPU ({gpu.reason}); engines are built on the GPU they run on")
    if version is None:
        missing.append(trt_reason or "tensorrt is not installed")
    if missing:
        raise TensorRTUnavailable("; ".join(missing))
    return str(cc), str(version)


def engine_file(graph: str, precision: str, compute_capability: str, version: str) -> str:
    """``trt/<graph>.<precision>.sm<CC>.trt<VERSION>.engine`` (CC without the dot)."""
    return f"{ENGINE_DIR}/{graph}.{precision}.sm{compute_capability.replace('.', '')}.trt{version}.engine"


def timing_cache_file(compute_capability: str, version: str) -> str:
    return f"{ENGINE_DIR}/timing.sm{compute_capability.replace('.', '')}.trt{version}.cache"


def tensorrt_builder(onnx_path: Path, engine_path: Path, input_shapes: dict[str, list[Any]],
                     settings: BuildSettings, timing_cache: Path, trt: Any = None) -> None:
    """Build one engine with TensorRT 10 or 11: strongly typed network, batch profile, timing
    cache (``trt``: the tensorrt module; tests pass a fake)."""
    if trt is None:
        import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = trt_api.create_network(trt, builder)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path.name}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    trt_api.configure(trt, config, int(settings.workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        profile.set_shape(tensor.name, *profile_shapes(input_shapes[tensor.name], settings))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path.name}: TensorRT could not build the engine (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))


def dynamic_axis_ranges(manifest: dict[str, Any]) -> tuple[tuple[str, tuple[int, int, int]], ...]:
    """The profile ranges of an aspect-keeping bundle's ``width`` and ``tokens`` axes:
    from the narrowest input to the widest, optimised for a typical word (half the widest)."""
    spec = Preprocessing.from_dict(manifest["preprocessing"])
    if not spec.keep_aspect:
        return ()
    width = (spec.min_width, spec.typical_width, spec.width)
    return (("width", width), ("tokens", tuple(max(1, w // TOWER_WIDTH_STRIDE) for w in width)))


def profile_shapes(shape: Sequence[Any], settings: BuildSettings) -> list[tuple[int, ...]]:
    """The (min, opt, max) shapes of one input: ``batch`` and the named axes from
    ``settings``, every other axis as the manifest gives it."""
    ranges = {"batch": (settings.min_batch, settings.opt_batch, settings.max_batch), **dict(settings.axes)}
    for d in shape:
        if isinstance(d, str) and d not in ranges:
            raise ValueError(f"no profile range for the dynamic axis {d!r}")
    return [tuple(ranges[d][k] if isinstance(d, str) else int(d) for d in shape) for k in range(3)]


def build_engines(bundle_dir: str | Path, precisions: Sequence[str], settings: BuildSettings,
                  builder: Builder | None = None, compute_capability: str | None = None,
                  version: str | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Build an engine per graph and precision, add them to the manifest; returns the entries.

    ``builder``, ``compute_capability`` and ``version`` default to TensorRT on this GPU
    (:func:`detect`); tests pass a fake builder.
    """
    bundle_dir = Path(bundle_dir)
    if compute_capability is None or version is None:
        compute_capability, version = detect()
    builder = builder or tensorrt_builder
    manifest = read_manifest(bundle_dir)
    settings = replace(settings, axes=settings.axes or dynamic_axis_ranges(manifest))
    missing = [p for p in precisions if p not in manifest["graphs"]]
    if missing:
        from export.onnx import add_precisions

        log(f"adding the {', '.join(missing)} ONNX graphs the engines are built from")
        manifest = add_precisions(bundle_dir, missing)
    (bundle_dir / ENGINE_DIR).mkdir(exist_ok=True)
    cache = bundle_dir / timing_cache_file(compute_capability, version)
    built = []
    for precision in precisions:
        for graph, entry in manifest["graphs"][precision].items():
            if graph == SPECIALIST_GRAPH:  # a fine-tune's specialist reads its few doubtful crops with
                continue  # onnxruntime on the CPU whatever the backend: no engine for it
            rel = engine_file(graph, precision, compute_capability, version)
            log(f"building {rel} (batch {settings.min_batch}..{settings.max_batch}, opt {settings.opt_batch})")
            shapes = {t["name"]: list(t["shape"]) for t in entry["inputs"]}
            builder(bundle_dir / entry["file"], bundle_dir / rel, shapes, settings, cache)
            built.append({"graph": graph, "precision": precision, "file": rel,
                          "compute_capability": compute_capability, "tensorrt_version": version,
                          "min_batch": settings.min_batch, "opt_batch": settings.opt_batch,
                          "max_batch": settings.max_batch})
    replaced = {(e["graph"], e["precision"], e["compute_capability"], e["tensorrt_version"]) for e in built}
    kept = [e for e in manifest.get("engines") or []
            if (e["graph"], e["precision"], e["compute_capability"], e["tensorrt_version"]) not in replaced]
    manifest["engines"] = kept + built
    write_manifest(bundle_dir, manifest)
    return built


def _prepare_bundle(source: Path, out: Path | None, precisions: list[str]) -> Path:
    """The bundle to build into: exported from a checkpoint, copied, or ``source`` itself."""
    if (source / MANIFEST_NAME).is_file():
        if out is None or out.resolve() == source.resolve():
            return source
        if out.exists() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
            raise ValueError(f"{out}: not empty and not a bundle; refusing to overwrite it")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(source, out)
        return out
    if not (source / "model.json").is_file():
        raise ValueError(f"{source}: neither a bundle (manifest.json) nor a checkpoint (model.json)")
    if out is None:
        raise ValueError("a checkpoint needs -o BUNDLE_DIR")
    from export.onnx import export_bundle

    return export_bundle(source, out, precisions)


def _missing_extra(exc: ImportError) -> str:
    """One line for a missing package: which extra installs it."""
    message = str(exc)
    if "pip install" in message:
        return message
    return f"{message}: the export extra installs what this needs (pip install 'clipllama[export]')"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.trt",
                                     description="Build TensorRT engines for a bundle (exit 3: no GPU/TensorRT).")
    parser.add_argument("source", type=Path, help="checkpoint directory or bundle directory")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="bundle directory (default: the given bundle, updated in place)")
    parser.add_argument("--fp16", action="store_true", help="build FP16 engines (default: FP32)")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--opt-batch", type=int, default=8)
    parser.add_argument("--workspace-gib", type=float, default=4.0)
    args = parser.parse_args(argv)
    precisions = ["fp16"] if args.fp16 else ["fp32"]
    try:
        settings = BuildSettings(1, min(args.opt_batch, args.max_batch), args.max_batch, args.workspace_gib)
    except ValueError as exc:
        parser.error(str(exc))
    if not (args.source / MANIFEST_NAME).is_file() and not (args.source / "model.json").is_file():
        print(f"export.trt: {args.source}: neither a bundle (manifest.json) nor a checkpoint (model.json)",
              file=sys.stderr)
        return EXIT_FAILED
    try:  # before any export: can engines be built here at all?
        cc, version = detect()
    except TensorRTUnavailable as exc:
        print(f"export.trt: no TensorRT engines built: {exc}. Nothing was changed "
              f"(exit code {EXIT_NO_TENSORRT}).", file=sys.stderr)
        return EXIT_NO_TENSORRT
    try:
        bundle = _prepare_bundle(args.source, args.output, ["fp32", *precisions])
        built = build_engines(bundle, precisions, settings, compute_capability=cc, version=version,
                              log=lambda m: print(m, file=sys.stderr))
    except ImportError as exc:
        print(f"export.trt: {_missing_extra(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, OSError) as exc:
        print(f"export.trt: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # export errors, TensorRT's own types; the bundle keeps its old manifest
        print(f"export.trt: engine build failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for entry in built:
        print(bundle / entry["file"])
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
