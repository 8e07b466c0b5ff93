"""Reading and checking a bundle (docs/bundle.md): the runtime's side of the contract.

:func:`load_bundle` reads ``manifest.json``, refuses a bundle that breaks the contract
(unknown schema version, missing keys, a path leading outside the bundle, a missing file,
a wrong sha256) with a :class:`BundleError` naming the problem, and returns a
:class:`Bundle` the backends and the recognizer read from. No torch, no onnx: json,
hashlib and numpy only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from runtime.charset import resolve_charset
from runtime.correction.settings import CorrectionSettings, SettingsError
from runtime.preprocess import Preprocessing

#: Schema versions this runtime reads: 2 adds the optional ``correction`` section (a schema-1
#: bundle gets the default model's correction settings).
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
#: The schema version a bundle with a ``correction`` section is written with.
CORRECTION_SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
#: The bundle installed with the package, used when no bundle is named.
DEFAULT_BUNDLE = Path(__file__).parent / "assets" / "default_bundle"
#: The four graphs, in the order they run.
GRAPH_NAMES = ("image_encoder", "visual_decoder", "text_encoder", "cross_decoder")
REQUIRED_KEYS = (
    "schema_version", "model", "charset", "test_charset", "preprocessing", "decode",
    "threshold", "tokenizer", "graphs", "files",
)
DECODE_KEYS = ("num_steps", "eos_id", "bos_id", "pad_id", "text_context_length")
_CHUNK = 1 << 20


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the bundle and the problem."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, shape (``"batch"`` marks the dynamic axis), dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of one precision."""

    name: str
    precision: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class EngineSpec:
    """One TensorRT engine listed in the manifest."""

    graph: str
    precision: str
    file: str
    compute_capability: str
    tensorrt_version: str
    min_batch: int
    opt_batch: int
    max_batch: int


@dataclass(frozen=True)
class DecodeSettings:
    """The ``decode`` section: what the graphs were exported for."""

    num_steps: int
    eos_id: int
    bos_id: int
    pad_id: int
    text_context_length: int
    refine_iters: int = 1
    fast: bool = False
    topk: int = 5
    #: the final word is rescored against the image encoder's ``ctc_log_probs``
    #: (``runtime.decoding.ctc_rescored``)
    ctc_rescoring: bool = False


@dataclass
class Bundle:
    """A checked bundle: its directory, manifest and the parsed sections."""

    root: Path
    manifest: dict[str, Any]
    charset: str
    test_charset: str
    preprocessing: Preprocessing
    decode: DecodeSettings
    threshold: float
    tokenizer_path: Path
    graphs: dict[str, dict[str, GraphSpec]]
    engines: list[EngineSpec] = field(default_factory=list)
    #: the correction settings fitted to this model (the manifest's ``correction`` section;
    #: the defaults for a schema-1 bundle), with the manifest's threshold
    correction: CorrectionSettings = field(default_factory=CorrectionSettings)

    @property
    def precisions(self) -> list[str]:
        """Precisions with all four graphs, in manifest order."""
        return [p for p, g in self.graphs.items() if all(n in g for n in GRAPH_NAMES)]

    def graph(self, precision: str, name: str) -> GraphSpec:
        try:
            return self.graphs[precision][name]
        except KeyError:
            raise BundleError(f"{self.root}: no {precision} graph {name!r} "
                              f"(precisions: {', '.join(self.precisions)})") from None

    def path(self, relative: str) -> Path:
        """Absolute path of a file of the bundle (checked to stay inside it)."""
        return inside(self.root, relative)

    def engines_for(self, graph: str, precision: str) -> list[EngineSpec]:
        return [e for e in self.engines if e.graph == graph and e.precision == precision]


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def inside(root: Path, relative: str) -> Path:
    """``root / relative`` after refusing absolute paths, ``..`` and links leading out."""
    if not isinstance(relative, str) or not relative:
        raise BundleError(f"{root}: invalid path {relative!r} in the manifest")
    posix = PurePosixPath(relative.replace("\\", "/"))
    if posix.is_absolute() or Path(relative).is_absolute() or (posix.parts and ":" in posix.parts[0]):
        raise BundleError(f"{root}: absolute path {relative!r} in the manifest (paths must be relative)")
    if ".." in posix.parts:
        raise BundleError(f"{root}: path {relative!r} leads outside the bundle directory")
    path = root.joinpath(*posix.parts)
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        raise BundleError(f"{root}: path {relative!r} leads outside the bundle directory") from None
    return path


def _require(data: dict[str, Any], keys: tuple[str, ...], where: str, root: Path) -> None:
    if not isinstance(data, dict):
        raise BundleError(f"{root}: {where} is not an object")
    missing = [k for k in keys if k not in data]
    if missing:
        raise BundleError(f"{root}: {where} lacks key(s) {', '.join(missing)}")


def _tensors(items: Any, where: str, root: Path) -> tuple[TensorSpec, ...]:
    if not isinstance(items, list) or not items:
        raise BundleError(f"{root}: {where} must be a non-empty list")
    out = []
    for item in items:
        _require(item, ("name", "shape", "dtype"), where, root)
        shape = tuple(d if isinstance(d, str) else int(d) for d in item["shape"])
        out.append(TensorSpec(str(item["name"]), shape, str(item["dtype"])))
    return tuple(out)


def _parse_graphs(raw: Any, root: Path) -> dict[str, dict[str, GraphSpec]]:
    if not isinstance(raw, dict) or not raw:
        raise BundleError(f"{root}: manifest 'graphs' must map precisions to graphs")
    graphs: dict[str, dict[str, GraphSpec]] = {}
    for precision, entries in raw.items():
        if not isinstance(entries, dict):
            raise BundleError(f"{root}: graphs[{precision!r}] is not an object")
        graphs[precision] = {}
        for name, entry in entries.items():
            where = f"graphs[{precision!r}][{name!r}]"
            _require(entry, ("file", "inputs", "outputs"), where, root)
            graphs[precision][name] = GraphSpec(
                name, precision, entry["file"], _tensors(entry["inputs"], f"{where}.inputs", root),
                _tensors(entry["outputs"], f"{where}.outputs", root),
            )
    if not any(all(n in g for n in GRAPH_NAMES) for g in graphs.values()):
        raise BundleError(f"{root}: no precision has all four graphs ({', '.join(GRAPH_NAMES)})")
    return graphs


def _parse_engines(raw: Any, root: Path) -> list[EngineSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BundleError(f"{root}: manifest 'engines' must be a list")
    keys = ("graph", "precision", "file", "compute_capability", "tensorrt_version")
    engines = []
    for i, entry in enumerate(raw):
        _require(entry, keys, f"engines[{i}]", root)
        engines.append(EngineSpec(
            str(entry["graph"]), str(entry["precision"]), entry["file"], str(entry["compute_capability"]),
            str(entry["tensorrt_version"]), int(entry.get("min_batch", 1)),
            int(entry.get("opt_batch", entry.get("max_batch", 1))), int(entry.get("max_batch", 1)),
        ))
    return engines


def _check_files(root: Path, manifest: dict[str, Any], verify: bool) -> None:
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError(f"{root}: manifest 'files' must map paths to sha256")
    listed = {str(PurePosixPath(p.replace("\\", "/"))) for p in files}
    referenced = [manifest["tokenizer"]["file"]]
    referenced += [g["file"] for entries in manifest["graphs"].values() for g in entries.values()]
    referenced += [e["file"] for e in manifest.get("engines") or []]
    for rel in referenced:
        inside(root, rel)
        if str(PurePosixPath(rel.replace("\\", "/"))) not in listed:
            raise BundleError(f"{root}: {rel} is used by the manifest but not listed in 'files'")
    for rel, expected in files.items():
        path = inside(root, rel)
        if not path.is_file():
            raise BundleError(f"{root}: missing file {rel}")
        if verify:
            actual = sha256_file(path)
            if actual != str(expected).lower():
                raise BundleError(f"{root}: {rel} has sha256 {actual}, the manifest says {expected} "
                                  "(corrupt or modified file)")


def load_bundle(path: str | Path | None, verify: bool = True) -> Bundle:
    """Read and check the bundle at ``path`` (its directory or its manifest; None: the
    default bundle installed with the package).

    ``verify`` checks every file's sha256 against the manifest (once, at load).
    """
    if path is None:
        if not (DEFAULT_BUNDLE / MANIFEST_NAME).is_file():
            raise BundleError(f"no default bundle is installed ({DEFAULT_BUNDLE}); name a bundle directory")
        path = DEFAULT_BUNDLE
    root = Path(path)
    if root.is_file() and root.name == MANIFEST_NAME:
        root = root.parent
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle directory")
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{root}: not a bundle (no {MANIFEST_NAME})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{root}: unreadable {MANIFEST_NAME} ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{root}: {MANIFEST_NAME} is not a JSON object")
    version = manifest.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise BundleError(f"{root}: unknown schema version {version!r} "
                          f"(this runtime reads {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))})")
    _require(manifest, REQUIRED_KEYS, "manifest", root)
    _require(manifest["decode"], DECODE_KEYS, "manifest 'decode'", root)
    _require(manifest["tokenizer"], ("file",), "manifest 'tokenizer'", root)
    _require(manifest["preprocessing"], ("height", "width", "mean", "std"), "manifest 'preprocessing'", root)
    graphs = _parse_graphs(manifest["graphs"], root)
    engines = _parse_engines(manifest.get("engines"), root)
    _check_files(root, manifest, verify)
    try:
        charset = resolve_charset(manifest["charset"])
        test_charset = resolve_charset(manifest["test_charset"])
        preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
        raw = manifest["decode"]
        decode = DecodeSettings(
            num_steps=int(raw["num_steps"]), eos_id=int(raw["eos_id"]), bos_id=int(raw["bos_id"]),
            pad_id=int(raw["pad_id"]), text_context_length=int(raw["text_context_length"]),
            refine_iters=int(raw.get("refine_iters", 1)), fast=bool(raw.get("fast", False)),
            topk=int(raw.get("topk", 5)), ctc_rescoring=bool(raw.get("ctc_rescoring", False)),
        )
        threshold = float(manifest["threshold"])
    except (TypeError, ValueError, KeyError) as exc:
        raise BundleError(f"{root}: invalid manifest value ({exc})") from None
    if decode.bos_id != len(charset) + 1 or decode.eos_id != 0:
        raise BundleError(f"{root}: decode ids (eos {decode.eos_id}, bos {decode.bos_id}) do not match "
                          f"a charset of {len(charset)} characters")
    if decode.ctc_rescoring:
        for precision, specs in graphs.items():
            encoder = specs.get("image_encoder")
            if encoder is not None and "ctc_log_probs" not in {o.name for o in encoder.outputs}:
                raise BundleError(f"{root}: decode.ctc_rescoring is on but the {precision} image_encoder "
                                  "has no ctc_log_probs output")
    correction = parse_correction(manifest, threshold, root)
    return Bundle(root=root, manifest=manifest, charset=charset, test_charset=test_charset,
                  preprocessing=preprocessing, decode=decode, threshold=threshold,
                  tokenizer_path=inside(root, manifest["tokenizer"]["file"]), graphs=graphs, engines=engines,
                  correction=correction)


def parse_correction(manifest: dict[str, Any], threshold: float, root: Path) -> CorrectionSettings:
    """The manifest's ``correction`` section over the defaults (schema 2; none: the defaults),
    with the manifest's ``threshold`` (the gate's one definition: the section may not set it)."""
    try:
        base = CorrectionSettings(threshold=threshold)
    except SettingsError as exc:
        raise BundleError(f"{root}: manifest 'threshold': {exc}") from None
    section = manifest.get("correction")
    if section is None:
        return base
    if manifest["schema_version"] < CORRECTION_SCHEMA_VERSION:
        raise BundleError(f"{root}: a 'correction' section needs schema_version {CORRECTION_SCHEMA_VERSION}")
    if not isinstance(section, dict):
        raise BundleError(f"{root}: manifest 'correction' is not an object")
    for key in ("threshold", "mode"):
        if key in section:
            raise BundleError(f"{root}: manifest 'correction' may not set {key!r} (the threshold is the "
                              "manifest's 'threshold'; the mode is the user's --llm-mode)")
    try:
        return CorrectionSettings.from_dict(section, base)
    except (SettingsError, TypeError) as exc:
        raise BundleError(f"{root}: manifest 'correction': {exc}") from None
