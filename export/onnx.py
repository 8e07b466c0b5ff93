"""Checkpoint -> bundle: the four ONNX graphs, precision variants, BPE file and manifest.

    python -m export.onnx CKPT -o BUNDLE_DIR [--precision fp32 fp16 int8] [--with-checkpoint]
        [--calibration SET [--validation SET...] [--calibration-method auto]]
    python -m export.onnx BUNDLE_DIR --precision int8 --calibration SET ...   # in place

With ``--calibration`` the int8 image encoder is quantized statically (``export.static_int8``:
QDQ, per-channel weights, ranges from the crops of SET, a sensitivity pass on the
``--validation`` sets that keeps the costliest layer groups in FP32); without it, int8 is
the dynamic quantization of ``export.precision.to_int8``. Given a bundle instead of a
checkpoint, the named precisions are (re)derived from its fp32 graphs in place.

The graphs are traced with PyTorch's TorchScript exporter (``dynamo=False``; ``--exporter
dynamo`` selects torch.export), simplified with onnxslim, their duplicated weights merged,
checked with ``onnx.checker``, compared with PyTorch on the trace inputs and linted against
the TensorRT rules (``export.lint``). The bundle is built in a temporary directory next to
``BUNDLE_DIR`` and moved into place only when complete, so a failed export leaves an
existing bundle untouched. See docs/bundle.md for the layout.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from export.graphs import GraphDef, count_layernorms, graph_defs
from export.lint import lint_model
from export.manifest import BATCH_AXIS, base_manifest, current_umask, graph_entry, read_manifest, write_manifest
from export.precision import INT8_GRAPHS, rename_inputs, store_exact_half, to_fp16, to_int8
from export.static_int8 import METHODS as STATIC_METHODS
from runtime.backends import PRECISIONS
from runtime.bundle import MANIFEST_NAME
from runtime.specialist import GRAPH_NAME as SPECIALIST_GRAPH
from training.checkpoint import CONFIG_NAME, WEIGHTS_NAME, checkpoint_dir, load_checkpoint, read_config
from training.model.clip4str import CLIP4STR, default_bpe_path

log = logging.getLogger("export")

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = 18
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
#: an int8 graph is kept only when it is at most this fraction of the fp32 graph's size
INT8_MIN_SAVING = 0.75
#: largest |ONNX - PyTorch| accepted on the trace inputs, relative to max(1, max |PyTorch|)
PARITY_TOLERANCE = 1e-3


class ExportError(RuntimeError):
    """An export that cannot be completed; the message says why."""


# -- one graph ------------------------------------------------------------------------


def _trace(graph: GraphDef, path: Path, opset: int, exporter: str) -> None:
    names = (*graph.inputs, *graph.outputs)
    axes = {n: {0: BATCH_AXIS, **graph.dynamic.get(n, {})} for n in names}
    with warnings.catch_warnings():
        # TracerWarnings (python ints from shapes) and the TorchScript exporter's
        # deprecation notice: the graphs are checked against PyTorch below instead
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dims = {BATCH_AXIS: torch.export.Dim(BATCH_AXIS, min=1, max=4096)}
            for label in {a for n in graph.inputs for a in graph.dynamic.get(n, {}).values()}:
                dims[label] = torch.export.Dim(label, min=1, max=65536)
            shapes = tuple({axis: dims[label] for axis, label in axes[n].items()} for n in graph.inputs)
            torch.onnx.export(graph.module, graph.example, str(path), input_names=list(graph.inputs),
                              output_names=list(graph.outputs), opset_version=opset, dynamo=True,
                              dynamic_shapes=shapes, external_data=False, verbose=False)
        else:
            torch.onnx.export(graph.module, graph.example, str(path), input_names=list(graph.inputs),
                              output_names=list(graph.outputs), opset_version=opset, dynamo=False,
                              do_constant_folding=True, dynamic_axes=axes)


def dedupe_initializers(model: onnx.ModelProto) -> int:
    """Merge initializers with identical dtype, shape and bytes (onnxslim's constant folding
    makes one copy of a weight per unrolled step); returns how many were removed."""
    graph = model.graph
    canonical: dict[tuple[int, tuple[int, ...], str], str] = {}
    rename: dict[str, str] = {}
    keep = []
    for init in graph.initializer:
        data = numpy_helper.to_array(init)
        key = (init.data_type, tuple(init.dims), hashlib.sha256(data.tobytes()).hexdigest())
        if key in canonical:
            rename[init.name] = canonical[key]
        else:
            canonical[key] = init.name
            keep.append(init)
    if not rename:
        return 0
    rename_inputs(graph, rename)
    outputs = {o.name for o in graph.output}
    if outputs & set(rename):
        raise ExportError("a graph output is a duplicated initializer")
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return len(rename)


def _fix_shapes(model: onnx.ModelProto, graph: GraphDef, outputs: Sequence[torch.Tensor]) -> None:
    """Batch axis named ``batch``, the graph's other dynamic axes named, every other axis of
    the inputs and outputs static."""
    shapes = [tuple(t.shape) for t in graph.example] + [tuple(t.shape) for t in outputs]
    for value, shape in zip([*model.graph.input, *model.graph.output], shapes, strict=True):
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise ExportError(f"{graph.name}: {value.name} has rank {len(dims)}, PyTorch gives {len(shape)}")
        dynamic = {0: BATCH_AXIS, **graph.dynamic.get(value.name, {})}
        for axis, (dim, size) in enumerate(zip(dims, shape, strict=True)):
            if axis in dynamic:
                dim.dim_param = dynamic[axis]
            else:
                dim.dim_value = int(size)


def _ort_session(model: onnx.ModelProto | Path, threads: int = 1) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def parity_on_example(model: onnx.ModelProto, graph: GraphDef, expected: Sequence[torch.Tensor],
                      threads: int = 1) -> dict[str, float]:
    """Max |ONNX - PyTorch| per output on the trace inputs (onnxruntime CPU), and for a
    graph with dynamic axes besides the batch, on inputs resized along them as well (so a
    size the trace froze into the graph is caught here, not by a user)."""
    session = _ort_session(model, threads)
    cases = [(graph.example, expected)]
    if graph.dynamic:
        other = tuple(_resized(t, graph.dynamic.get(n, {})) for n, t in zip(graph.inputs, graph.example, strict=True))
        with torch.no_grad():
            out = graph.module(*other)
        cases.append((other, out if isinstance(out, tuple) else (out,)))
    diffs: dict[str, float] = {}
    for inputs, reference in cases:
        feeds = {name: t.numpy() for name, t in zip(graph.inputs, inputs, strict=True)}
        got = session.run(list(graph.outputs), feeds)
        for name, g, e in zip(graph.outputs, got, reference, strict=True):
            if g.shape != tuple(e.shape):
                raise ExportError(f"{graph.name}: {name} has shape {g.shape} in ONNX, {tuple(e.shape)} in PyTorch")
            diffs[name] = max(diffs.get(name, 0.0), float(np.abs(g - e.numpy()).max()))
    return diffs


def _resized(tensor: torch.Tensor, axes: dict[int, str]) -> torch.Tensor:
    """``tensor`` with each dynamic axis cut to three quarters (a different, valid size:
    widths stay multiples of 8 when the trace width is a multiple of 32)."""
    for axis in axes:
        size = tensor.shape[axis]
        tensor = tensor.narrow(axis, 0, max(1, size * 3 // 4))
    return tensor.contiguous()


def export_graph(graph: GraphDef, path: Path, opset: int = DEFAULT_OPSET, exporter: str = "torchscript",
                 slim: bool = True, threads: int = 1) -> dict[str, Any]:
    """Trace, simplify, check and save one graph at ``path``; returns a report."""
    start = time.perf_counter()
    with torch.no_grad():
        expected = graph.module(*graph.example)
    expected = expected if isinstance(expected, tuple) else (expected,)
    raw = path.with_name(path.stem + ".raw.onnx")
    _trace(graph, raw, opset, exporter)
    model = onnx.load(str(raw))
    raw.unlink()
    nodes_raw = len(model.graph.node)
    if slim:
        import onnxslim

        model = onnxslim.slim(model)
    removed = dedupe_initializers(model)
    _fix_shapes(model, graph, expected)
    onnx.checker.check_model(model, full_check=True)
    diffs = parity_on_example(model, graph, expected, threads)
    for name, ref in zip(graph.outputs, expected, strict=True):
        limit = PARITY_TOLERANCE * max(1.0, float(ref.abs().max()))
        if diffs[name] > limit:
            raise ExportError(f"{graph.name}: ONNX differs from PyTorch on {name} by {diffs[name]:.3g} "
                              f"(limit {limit:.3g}); try --no-slim or the other --exporter")
    onnx.save(model, str(path))
    return {"nodes_raw": nodes_raw, "nodes": len(model.graph.node), "duplicates_merged": removed,
            "max_abs_diff": diffs, "seconds": round(time.perf_counter() - start, 2),
            "min_layernorms": count_layernorms(graph.module)}


def lint_or_raise(path: Path, min_layernorms: int = 1) -> None:
    findings = lint_model(path, min_layernorms=min_layernorms)
    if findings:
        listed = "\n  ".join(str(f) for f in findings[:20])
        raise ExportError(f"{path.name} breaks the TensorRT graph rules ({len(findings)} finding(s)):\n  {listed}")


# -- the bundle -----------------------------------------------------------------------


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary directory next to ``out`` that replaces ``out`` on success."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise ExportError(f"{out}: not empty and not a bundle; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    stage.chmod(0o777 & ~current_umask())
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    backup = None
    if out.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        backup.rmdir()
        out.rename(backup)
    stage.rename(out)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _versions() -> dict[str, str]:
    import onnxruntime

    out = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    with contextlib.suppress(ImportError):
        import onnxslim

        out["onnxslim"] = onnxslim.__version__
    return out


def _decode_model(model: CLIP4STR) -> CLIP4STR:
    """The model with the decode schema-1 bundles are exported for (refine once, not fast)."""
    if model.cfg.refine_iters != 1 or model.cfg.fast_decode:
        log.warning("checkpoint decodes with refine_iters=%d fast=%s; the bundle is exported for the "
                    "default decode (refine_iters=1, fast=False)", model.cfg.refine_iters, model.cfg.fast_decode)
        model.cfg = replace(model.cfg, refine_iters=1, fast_decode=False)
    return model


def export_bundle(ckpt_dir: str | Path, out_dir: str | Path, precisions: Sequence[str] = ("fp32",), *,
                  include_checkpoint: bool = False, opset: int = DEFAULT_OPSET, exporter: str = "torchscript",
                  slim: bool = True, lint: bool = True, threads: int = 1, static_int8: Sequence[str] = ()) -> Path:
    """Export the checkpoint at ``ckpt_dir`` to a bundle at ``out_dir``; returns ``out_dir``.

    ``precisions``: any of fp32, fp16, int8 (fp32 is always written: the others derive from
    it). ``include_checkpoint`` copies model.json and model.safetensors into the bundle.
    """
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ExportError(f"unknown precision(s) {unknown} (choose from {', '.join(PRECISIONS)})")
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r} (choose from {', '.join(EXPORTERS)})")
    if opset < 17:
        raise ExportError(f"opset {opset} < 17: LayerNorm would not be one node")
    wanted = ["fp32", *[p for p in PRECISIONS[1:] if p in precisions]]
    source = checkpoint_dir(ckpt_dir)
    try:
        cfg, meta = read_config(source)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"{source}: not a readable checkpoint ({exc})") from None
    out = Path(out_dir)
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        try:
            model = _decode_model(load_checkpoint(source))
        except Exception as exc:  # safetensors and torch raise their own types
            raise ExportError(f"{source}: cannot load the weights ({type(exc).__name__}: {exc})") from None
        with _staging(out) as stage:
            graphs, report = _write_graphs(model, stage, opset, exporter, slim, lint, threads)
            minimum = {name: info["min_layernorms"] for name, info in report.items()}
            derive_precisions(stage, graphs, wanted, lint, minimum, static_int8)
            _store_exact_half(stage, graphs)
            shutil.copyfile(default_bpe_path(), stage / BPE_NAME)
            if include_checkpoint:
                for name in (CONFIG_NAME, WEIGHTS_NAME):
                    shutil.copyfile(source / name, stage / name)
            extra = {"exporter": exporter, "opset": opset, "slim": slim, "versions": _versions(),
                     "checkpoint": {"meta": meta, "weights_sha256": _sha256(source / WEIGHTS_NAME)},
                     "graphs": report, "seconds": round(time.perf_counter() - start, 1)}
            write_manifest(stage, base_manifest(cfg, stage, BPE_NAME, graphs, extra))
    finally:
        torch.set_num_threads(previous_threads)
    log.info("bundle written to %s in %.1f s", out, time.perf_counter() - start)
    return out


def _store_exact_half(stage: Path, graphs: dict[str, Any]) -> None:
    """FP32 graph files with FP16 storage where exact (an FP16 checkpoint); after the other
    precisions were derived from the plain files."""
    for name, entry in graphs["fp32"].items():
        converted = store_exact_half(stage / entry["file"])
        if converted:
            log.info("fp32 %s: %d weights stored as float16 (exactly their values)", name, converted)


def _sha256(path: Path) -> str:
    from runtime.bundle import sha256_file

    return sha256_file(path)


def _write_graphs(model: CLIP4STR, stage: Path, opset: int, exporter: str, slim: bool, lint: bool,
                  threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The four fp32 graphs: manifest entries and the per-graph export report."""
    (stage / "fp32").mkdir()
    entries: dict[str, Any] = {}
    report: dict[str, Any] = {}
    for graph in graph_defs(model):
        fp32 = f"fp32/{graph.name}.onnx"
        log.info("exporting %s", graph.name)
        info = export_graph(graph, stage / fp32, opset, exporter, slim, threads)
        if lint:
            lint_or_raise(stage / fp32, info["min_layernorms"])
        entries[graph.name] = graph_entry(stage, fp32)
        report[graph.name] = info
    return {"fp32": entries}, report


def derive_precisions(bundle_dir: Path, graphs: dict[str, Any], precisions: Sequence[str], lint: bool = True,
                      min_layernorms: dict[str, int] | None = None,
                      static_int8: Sequence[str] = ()) -> dict[str, Any]:
    """Write the fp16/int8 variants of the fp32 graphs listed in ``graphs`` (the manifest's
    ``graphs`` section, updated in place and returned). ``static_int8``: graphs quantized
    statically afterwards (:func:`add_static_int8`), whose int8 entry is the fp32 file until then."""
    bundle_dir = Path(bundle_dir)
    fp32 = graphs["fp32"]
    for precision in [p for p in PRECISIONS[1:] if p in precisions]:
        (bundle_dir / precision).mkdir(exist_ok=True)
        entries: dict[str, Any] = {}
        for name, entry in fp32.items():
            if name == SPECIALIST_GRAPH:  # a fine-tune's specialist is read in fp32 only
                continue
            src = _plain_fp32(bundle_dir / entry["file"], bundle_dir / f".{name}.plain.onnx")
            rel = f"{precision}/{name}.onnx"
            if precision == "fp16":
                log.info("fp16 %s: %s kept in fp32", name, to_fp16(src, bundle_dir / rel))
                if lint:
                    lint_or_raise(bundle_dir / rel, (min_layernorms or {}).get(name, 1))
            elif name in static_int8:
                rel = entry["file"]
            elif name in INT8_GRAPHS:
                to_int8(src, bundle_dir / rel)
                ratio = (bundle_dir / rel).stat().st_size / src.stat().st_size
                if ratio > INT8_MIN_SAVING:  # e.g. a convolutional tower: MatMuls are few
                    (bundle_dir / rel).unlink()
                    rel = entry["file"]
                    log.info("int8 %s: quantization keeps %.0f%% of the size; the fp32 graph serves", name,
                             100 * ratio)
                else:
                    log.info("int8 %s", name)
            else:
                rel = entry["file"]  # the decoders stay fp32
            entries[name] = graph_entry(bundle_dir, rel)
            if src.name.endswith(".plain.onnx"):
                src.unlink()
        graphs[precision] = entries
    return graphs


def _plain_fp32(path: Path, scratch: Path) -> Path:
    """``path``, or at ``scratch`` its copy with float32 weights when it stores them as
    float16 (``store_exact_half``): the converters and quantizers want constant float weights."""
    from export.static_int8 import unpack_half

    model = onnx.load(str(path))
    if not unpack_half(model):
        return path
    onnx.save(model, str(scratch))
    return scratch


def add_precisions(bundle_dir: str | Path, precisions: Sequence[str], lint: bool = True,
                   static: StaticInt8 | None = None) -> dict[str, Any]:
    """Add fp16/int8 variants to an existing bundle (in place); returns the new manifest.
    With ``static`` the int8 image encoder is then quantized statically (:func:`add_static_int8`)."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    report = manifest.get("created", {}).get("graphs", {})
    minimum = {name: int(info.get("min_layernorms", 1)) for name, info in report.items()}
    later = ("image_encoder",) if static is not None and "int8" in precisions else ()
    derive_precisions(bundle_dir, manifest["graphs"], precisions, lint, minimum, later)
    _drop_unlisted(bundle_dir, manifest)
    manifest = write_manifest(bundle_dir, manifest)
    if static is not None and "int8" in precisions:
        manifest = add_static_int8(bundle_dir, static)
    return manifest


@dataclass
class StaticInt8:
    """How the int8 image encoder is quantized statically (``export.static_int8``)."""

    calibration: str
    validation: Sequence[str] = ()
    method: str = "auto"
    crops: int = 320
    tolerance: float = 0.2
    sensitivity: bool = True
    threads: int | None = None
    #: layer groups (prefixes of node scopes, e.g. ``features/neck``) always kept in FP32
    keep_fp32: Sequence[str] = ()
    #: 7-bit weights, exact on x86 CPUs without VNNI (``runtime.backends.WEIGHTS_7BIT``)
    reduce_range: bool = False
    #: weight initializers quantized to 7 bits, the rest to 8
    weights_7bit: Sequence[str] = ()
    #: write a second int8 image encoder for x86 CPUs without VNNI (``graphs.int8_no_vnni``),
    #: validated on this CPU, which must be one; the bundle's int8 graphs stay as they are
    no_vnni: bool = False


def add_static_int8(bundle_dir: str | Path, settings: StaticInt8) -> dict[str, Any]:
    """Quantize the bundle's fp32 image encoder statically into ``int8/image_encoder.onnx``,
    point the int8 entry at it and record how (``quantization``); returns the manifest.

    With ``settings.no_vnni``: the image encoder for x86 CPUs without VNNI, whose uint8 x int8
    products saturate (``runtime.backends.int8_dot_saturates``), quantized as ``settings`` say
    (e.g. the first convolution's weights in 7 bits) and validated here, so this must be such
    a CPU; it goes to ``int8/image_encoder_no_vnni.onnx`` and ``graphs.int8_no_vnni``, the
    int8 entry and the CPU default stay, and ``export.recheck`` run on such a CPU chooses its
    ``int8+fp32`` threshold."""
    from export.static_int8 import QuantizeError, dev_sets_from, static_int8_encoder
    from runtime.backends import INT8_NO_VNNI, RECHECK_KEYS, int8_dot_saturates

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if "int8" not in manifest["graphs"]:
        raise ExportError(f"{bundle_dir}: no int8 entry to quantize into (export with --precision int8)")
    key = INT8_NO_VNNI if settings.no_vnni else "int8"
    if settings.no_vnni and not int8_dot_saturates():
        raise ExportError("--no-vnni: this CPU's int8 products do not saturate (it has VNNI or is not x86), so "
                          "the validation would not show what CPUs without VNNI read; run it on such a CPU")
    if settings.no_vnni and not settings.validation:
        raise ExportError("--no-vnni needs --validation sets: the graph is for the CPUs it is validated on")
    rel = "int8/image_encoder_no_vnni.onnx" if settings.no_vnni else "int8/image_encoder.onnx"
    try:
        dev = dev_sets_from(settings.validation)
        record = static_int8_encoder(bundle_dir, manifest["graphs"]["fp32"]["image_encoder"]["file"], rel,
                                     settings.calibration, dev, settings.method, settings.crops,
                                     settings.tolerance, settings.threads, settings.sensitivity,
                                     tuple(settings.keep_fp32), settings.reduce_range,
                                     tuple(settings.weights_7bit))
    except QuantizeError as exc:
        raise ExportError(f"static int8: {exc}") from None
    entry = graph_entry(bundle_dir, rel)
    entry["quantization"] = record
    manifest["graphs"].setdefault(key, {})["image_encoder"] = entry
    defaults = manifest.setdefault("defaults", {})
    defaults.pop(RECHECK_KEYS[key], None)  # fitted to the int8 graph this one replaces (export.recheck)
    validated = record.get("validation", {}).get("int8", {}).get("accuracy_drop")
    if settings.no_vnni:
        log.info("int8 image_encoder for CPUs without VNNI: %s", rel)
    elif validated and all(drop <= settings.tolerance + 1e-9 for drop in validated.values()):
        defaults["cpu_precision"] = "int8"  # --precision auto reads int8 on a CPU
        log.info("int8 reads within %.2f points of fp32 on every validation set: the CPU default",
                 settings.tolerance)
    else:
        defaults.pop("cpu_precision", None)
    log.info("int8 image_encoder: static, %s calibration, %d layer group(s) kept in fp32",
             record["calibration"]["method"], len(record["excluded"]))
    return write_manifest(bundle_dir, manifest)


def _drop_unlisted(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    """Remove graph files of a precision folder that no manifest entry names any more (a
    dynamic int8 encoder replaced by the fp32 one, say), so ``files`` lists only what is used."""
    used = {g["file"] for entries in manifest["graphs"].values() for g in entries.values()}
    for precision in PRECISIONS[1:]:
        for path in sorted((bundle_dir / precision).glob("*.onnx")):
            if f"{precision}/{path.name}" not in used:
                path.unlink()


def _log_to_stderr() -> None:
    """Progress of the ``export`` loggers on stderr (other libraries' loggers stay quiet)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.onnx",
                                     description="Export a checkpoint to a bundle (docs/bundle.md).")
    parser.add_argument("ckpt", help="checkpoint directory (model.json + model.safetensors), or a bundle "
                                     "to add precisions to in place")
    parser.add_argument("-o", "--output", help="bundle directory to write (required for a checkpoint)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS,
                        help="precisions to write (fp32 is always written)")
    parser.add_argument("--with-checkpoint", action="store_true", help="copy the checkpoint into the bundle")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--exporter", choices=EXPORTERS, default="torchscript")
    parser.add_argument("--no-slim", action="store_true", help="skip onnxslim")
    parser.add_argument("--no-lint", action="store_true", help="do not fail on TensorRT graph-rule findings")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for tracing and checks")
    quant = parser.add_argument_group("static int8 (export.static_int8)")
    quant.add_argument("--calibration", metavar="SET",
                       help="crops to calibrate the int8 image encoder on (training crops, never an eval set); "
                            "without it int8 is dynamic")
    quant.add_argument("--validation", nargs="+", default=[], metavar="SET",
                       help="labelled sets the calibration method and the FP32 exclusions are chosen on")
    quant.add_argument("--calibration-method", default="auto", choices=("auto", *STATIC_METHODS),
                       help="activation ranges (auto: the one that loses least on --validation)")
    quant.add_argument("--calibration-crops", type=int, default=320, metavar="N",
                       help="crops taken from --calibration (default 320)")
    quant.add_argument("--tolerance", type=float, default=0.2, metavar="POINTS",
                       help="accuracy points int8 may lose on each validation set (default 0.2)")
    quant.add_argument("--no-sensitivity", action="store_true", help="quantize every layer (no exclusions)")
    quant.add_argument("--keep-fp32", nargs="+", default=[], metavar="GROUP",
                       help="layer groups kept in FP32 whatever the sensitivity pass says (prefixes of node "
                            "scopes, e.g. features/neck)")
    quant.add_argument("--reduce-range", action="store_true",
                       help="7-bit weights: exact on x86 CPUs without VNNI, whose 8-bit dot products saturate")
    quant.add_argument("--weights-7bit", nargs="+", default=[], metavar="INITIALIZER",
                       help="only these weights in 7 bits (the layers whose 8-bit products saturate without VNNI; "
                            "'first-conv': the first convolution's, where they saturate for PP-OCRv6)")
    quant.add_argument("--no-vnni", action="store_true",
                       help="write a second int8 image encoder for x86 CPUs without VNNI (validated here, which "
                            "must be such a CPU), keeping the bundle's int8 graphs; such CPUs then read it")
    args = parser.parse_args(argv)
    if args.calibration and "int8" not in args.precision:
        parser.error("--calibration quantizes the int8 variant: add --precision int8")
    if args.calibration_crops < 1:
        parser.error("--calibration-crops must be at least 1")
    if args.validation and not args.calibration:
        parser.error("--validation needs --calibration")
    if args.no_vnni and not (args.calibration and args.validation):
        parser.error("--no-vnni needs --calibration and --validation (and a bundle with int8 graphs)")
    _log_to_stderr()
    static = None
    if args.calibration:
        static = StaticInt8(args.calibration, args.validation, args.calibration_method, args.calibration_crops,
                            args.tolerance, not args.no_sensitivity, max(1, args.threads), tuple(args.keep_fp32),
                            args.reduce_range, tuple(args.weights_7bit), args.no_vnni)
    try:
        if (Path(args.ckpt) / MANIFEST_NAME).is_file():
            if args.output is not None and Path(args.output).resolve() != Path(args.ckpt).resolve():
                raise ExportError("given a bundle, the precisions are added in place: leave out -o")
            if static is not None and static.no_vnni:  # the bundle's int8 graphs stay as they are
                add_static_int8(args.ckpt, static)
            else:
                add_precisions(args.ckpt, args.precision, lint=not args.no_lint, static=static)
            out = Path(args.ckpt)
        else:
            if args.output is None:
                raise ExportError("-o BUNDLE_DIR is required when exporting a checkpoint")
            out = export_bundle(args.ckpt, args.output, args.precision, include_checkpoint=args.with_checkpoint,
                                opset=args.opset, exporter=args.exporter, slim=not args.no_slim,
                                lint=not args.no_lint, threads=args.threads,
                                static_int8=("image_encoder",) if static is not None else ())
            if static is not None:
                add_static_int8(out, static)
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
