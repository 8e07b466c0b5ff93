"""Writing side of the bundle manifest (docs/bundle.md): sections, tensor specs, sha256s.

The reading side is ``runtime/bundle.py``; :func:`write_manifest` always recomputes the
``files`` table from the files on disk, so a manifest never lists a stale hash.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from runtime.bundle import MANIFEST_NAME, sha256_file
from runtime.charset import resolve_charset
from runtime.decoding import CharCodec
from runtime.tokenizer import BPETokenizer
from training.config import ModelConfig

SCHEMA_VERSION = 1
BATCH_AXIS = "batch"
TOOL_VERSION = "0.1.0"
#: top-k alternatives per position the runtime reports by default
DEFAULT_TOPK = 5


def _onnx() -> Any:
    """The onnx package, imported when a graph is read (the runtime-only install has none)."""
    try:
        import onnx
    except ImportError:
        raise ModuleNotFoundError("reading ONNX graphs needs the export extra (pip install 'clipllama[export]')",
                                  name="onnx") from None
    return onnx


def tensor_specs(values: Any, batch_axis: int = 0) -> list[dict[str, Any]]:
    """``[{name, shape, dtype}]`` of ONNX graph inputs or outputs; axis ``batch_axis`` is
    written as ``"batch"``, other symbolic axes keep their name."""
    onnx = _onnx()
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape: list[int | str] = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if axis == batch_axis:
                shape.append(BATCH_AXIS)
            elif dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            else:
                shape.append(dim.dim_param or "?")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        specs.append({"name": value.name, "shape": shape, "dtype": dtype})
    return specs


def graph_entry(bundle_dir: Path, relative: str) -> dict[str, Any]:
    """The manifest entry ``{file, inputs, outputs}`` of the graph at ``relative``."""
    model = _onnx().load(str(bundle_dir / relative), load_external_data=False)
    return {"file": relative, "inputs": tensor_specs(model.graph.input),
            "outputs": tensor_specs(model.graph.output)}


def decode_section(cfg: ModelConfig) -> dict[str, Any]:
    """What the graphs were exported for: schema 1 is the default decode (refine once, not fast)."""
    codec = CharCodec(cfg.charset_train)
    return {"num_steps": cfg.num_steps, "refine_iters": 1, "fast": False, "autoregressive": cfg.autoregressive,
            "ctc_rescoring": cfg.ctc_rescoring, "eos_id": codec.eos_id,
            "bos_id": codec.bos_id, "pad_id": codec.pad_id, "text_context_length": cfg.text_context_length,
            "topk": DEFAULT_TOPK}


def tokenizer_section(bundle_dir: Path, relative: str) -> dict[str, Any]:
    tokenizer = BPETokenizer(bundle_dir / relative)
    return {"type": "clip-bpe", "file": relative, "sha256": sha256_file(bundle_dir / relative),
            "start_id": tokenizer.start_id, "end_id": tokenizer.end_id}


def base_manifest(cfg: ModelConfig, bundle_dir: Path, bpe_file: str,
                  graphs: dict[str, dict[str, dict[str, Any]]], extra: dict[str, Any]) -> dict[str, Any]:
    """Every section but ``files`` (filled by :func:`write_manifest`)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "model": cfg.to_dict(),
        "charset": resolve_charset(cfg.charset_train),
        "test_charset": resolve_charset(cfg.charset_test),
        "preprocessing": cfg.image.to_dict(),
        "decode": decode_section(cfg),
        "threshold": cfg.threshold,
        "tokenizer": tokenizer_section(bundle_dir, bpe_file),
        "graphs": graphs,
        "engines": [],
        # cascade read as well as full, with and without the LLM, at CTC's speed on the default
        # model's validation split (docs/benchmarks.md "Decode modes")
        "defaults": {"decode": "cascade"} if cfg.ctc_rescoring else {},
        "files": {},
        "created": {"tool": "export.onnx", "version": TOOL_VERSION,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra},
    }


def bundle_files(bundle_dir: Path) -> list[str]:
    """Relative POSIX paths of every file of the bundle but the manifest, sorted."""
    return sorted(p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".manifest"))


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Fill ``files`` with the sha256 of every file and write ``manifest.json`` atomically."""
    manifest["files"] = {rel: sha256_file(bundle_dir / rel) for rel in bundle_files(bundle_dir)}
    fd, tmp = tempfile.mkstemp(prefix=".manifest", suffix=".json", dir=bundle_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, bundle_dir / MANIFEST_NAME)
    return manifest


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    return json.loads((bundle_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
