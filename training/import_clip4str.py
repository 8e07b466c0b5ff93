"""Import the weights the CLIP4STR authors published into this project's checkpoint format.

``python -m training.import_clip4str FILE -o CKPT_DIR [--arch clip4str-b16|clip4str-l14|CONFIG.json]``

The released files (github.com/VamosC/CLIP4STR: Lightning ``.ckpt`` files on the GitHub
release page and Zenodo, ``.pt`` files on huggingface.co/mzhaoshuai/CLIP4STR) hold the
state dict of the authors' ``VL4STR`` Lightning module, under ``state_dict`` or at the top:

* ``clip_model.*`` -- OpenAI-CLIP parameter names (``visual.*``, ``token_embedding``,
  ``positional_embedding`` (77 rows), ``transformer.*``, ``ln_final``, ``text_projection``,
  ``logit_scale``); every tower uses QuickGELU (hard-coded in their ``strhub/clip/model.py``);
* ``visual_decoder.*`` and ``cross_decoder.*`` -- PARSeq's two-stream decoder:
  ``text_embed.embedding``, ``pos_queries``, ``layers.N.{self_attn,cross_attn,linear1,linear2,
  norm1,norm2,norm_q,norm_c}``, ``norm``, ``head``.

Every tensor of the file is either mapped onto :class:`training.model.clip4str.CLIP4STR`
(renamed, and the text positional embedding cut to the 16 rows this project keeps) or listed
in :data:`IGNORED` with the reason; a missing, unknown or mis-shaped tensor is an error that
names it. Files are read with ``torch.load(weights_only=True)`` only (see :func:`load_release`).
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import re
import string
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from runtime.charset import CHARSET_94
from runtime.preprocess import Preprocessing
from training.config import CONFIG_DIR, ModelConfig, model_config

#: The 94-character training charset of CLIP4STR (its ``configs/charset/94_full.yaml``, the
#: same string as PARSeq's): digits, lower case, upper case, ASCII punctuation, in that order.
RELEASE_CHARSET = string.digits + string.ascii_lowercase + string.ascii_uppercase + string.punctuation
#: The authors' test transform (``SceneTextDataModule.get_transform`` defaults, used by
#: ``test_dataloaders`` and ``read.py``): the published accuracy was measured with these.
EVAL_MEAN = EVAL_STD = (0.5, 0.5, 0.5)
#: Their training transform (``data.openai_meanstd: true`` in ``configs/main.yaml``).
TRAIN_MEAN = (0.48145466, 0.4578275, 0.40821073)
TRAIN_STD = (0.26862954, 0.26130258, 0.27577711)
#: Text context of CLIP4STR's text branch (``context_length: 16`` in ``configs/model/vl4str.yaml``).
RELEASE_CONTEXT_LENGTH = 16

#: Tensors of the released module that inference does not use.
IGNORED = {
    "clip_model.logit_scale": "CLIP's contrastive temperature; CLIP4STR never reads it",
}

#: The published files (names, backbones and training data from the authors' README).
KNOWN_RELEASES = {
    "clip4str_base16x16_synth_a5e3386222.ckpt": ("clip4str-b16", "OpenAI CLIP ViT-B/16", "MJ+ST"),
    "clip4str_base16x16_d70bde1f2d.ckpt": ("clip4str-b16", "OpenAI CLIP ViT-B/16", "Real(3.3M)"),
    "clip4str_base_6e9fe947ac.pt": ("clip4str-b16", "OpenCLIP ViT-B/16 DataComp-1B", "RBU(6.5M)"),
    "clip4str_large_3c9d881b88.pt": ("clip4str-l14", "OpenCLIP ViT-L/14 DataComp-1B", "RBU(6.5M)"),
}

#: Our parameter name -> the released one (first full match wins).
RULES: tuple[tuple[str, str], ...] = (
    (r"image_encoder\.visual\.(.+)", r"clip_model.visual.\1"),
    (r"text_encoder\.(token_embedding\.weight|positional_embedding|text_projection)", r"clip_model.\1"),
    (r"text_encoder\.((?:transformer|ln_final)\..+)", r"clip_model.\1"),
    (r"(\w+_decoder)\.embedding\.weight", r"\1.text_embed.embedding.weight"),
    (r"(\w+_decoder\.layers\.\d+)\.mlp\.0\.(weight|bias)", r"\1.linear1.\2"),
    (r"(\w+_decoder\.layers\.\d+)\.mlp\.3\.(weight|bias)", r"\1.linear2.\2"),
    (r"(\w+_decoder\.layers\.\d+)\.norm_query\.(weight|bias)", r"\1.norm_q.\2"),
    (r"(\w+_decoder\.layers\.\d+)\.norm_content\.(weight|bias)", r"\1.norm_c.\2"),
    (r"(\w+_decoder\.layers\.\d+)\.norm_cross\.(weight|bias)", r"\1.norm1.\2"),
    (r"(\w+_decoder\.layers\.\d+)\.norm_mlp\.(weight|bias)", r"\1.norm2.\2"),
    (r"(\w+_decoder\.layers\.\d+\.(?:self|cross)_attn\.\w+(?:\.\w+)?)", r"\1"),
    (r"(\w+_decoder\.(?:pos_queries|norm\.weight|norm\.bias|head\.weight|head\.bias))", r"\1"),
)
#: Our tensors that keep only the first rows of the released one (77 -> 16 text positions).
ROW_SLICED = frozenset({"text_encoder.positional_embedding"})

Shapes = Mapping[str, Sequence[int]]


class ReleaseError(ValueError):
    """A released file that cannot be imported; the message names the tensor or key."""


# -- reading a released file -------------------------------------------------------------


class _Inert:
    """Stand-in for a global the file names outside its weights (e.g. an optimizer or LR
    scheduler object): built from nothing, keeps nothing, runs none of the file's code."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "<ignored object>"


@dataclass
class Release:
    """The tensors and hyper-parameters of a released file."""

    state: dict[str, torch.Tensor]
    hparams: dict[str, Any]
    container: str  # "lightning" (state dict under a key) or "state_dict"
    #: globals of the file replaced by :class:`_Inert` (never the real objects)
    stubbed: list[str] = field(default_factory=list)


def _torch_load(path: Path) -> Any:
    mmap = zipfile.is_zipfile(path)  # mmap needs the zip format; old files load into memory
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def load_release(path: str | Path, stub_globals: bool = True) -> Release:
    """Read a released ``.pt``/``.ckpt`` with ``torch.load(weights_only=True)``.

    Lightning checkpoints may also carry training state (optimizer, LR scheduler, callbacks)
    whose pickles name globals that ``weights_only`` refuses. With ``stub_globals`` those
    globals -- and only those, as listed by ``torch.serialization.get_unsafe_globals_in_checkpoint``
    -- are allowlisted as :class:`_Inert` placeholders, never as the real objects, so no code
    from the file runs; the weights themselves only ever need torch's default allowlist.
    """
    path = Path(path)
    if not path.is_file():
        raise ReleaseError(f"{path}: no such file")
    stubbed: list[str] = []
    try:
        try:
            obj = _torch_load(path)
        except pickle.UnpicklingError as exc:
            if not (stub_globals and zipfile.is_zipfile(path)):
                raise ReleaseError(f"{path}: not loadable with torch.load(weights_only=True): "
                                   f"{str(exc).strip().splitlines()[0]}") from None
            stubbed = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            with torch.serialization.safe_globals([(_Inert, name) for name in stubbed]):
                obj = _torch_load(path)
    except ReleaseError:
        raise
    except pickle.UnpicklingError as exc:
        raise ReleaseError(f"{path}: not loadable with torch.load(weights_only=True) even with "
                           f"{stubbed} replaced by inert placeholders: {exc}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise ReleaseError(f"{path}: not a PyTorch checkpoint ({exc})") from None
    return _unpack(path, obj, stubbed)


def _unpack(path: Path, obj: Any, stubbed: list[str]) -> Release:
    if not isinstance(obj, Mapping):
        raise ReleaseError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if isinstance(obj.get("state_dict"), Mapping):
        state, container = obj["state_dict"], "lightning"
    else:
        state, container = obj, "state_dict"
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad or not state:
        keys = ", ".join(map(str, list(obj)[:8]))
        raise ReleaseError(f"{path}: no state dict of tensors (top-level keys: {keys}; "
                           f"non-tensor entries: {bad[:5]})")
    raw = obj.get("hyper_parameters") if container == "lightning" else None
    hparams = {k: v for k, v in raw.items() if _plain(v)} if isinstance(raw, Mapping) else {}
    return Release(dict(state), hparams, container, stubbed)


def _plain(value: Any) -> bool:
    """Whether a hyper-parameter is plain data (stubbed objects are dropped)."""
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# -- the mapping plan --------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """Our tensor ``target`` comes from the released ``source`` (its first ``rows`` rows)."""

    target: str
    source: str
    rows: int | None = None


@dataclass
class ImportPlan:
    steps: list[Step]
    ignored: dict[str, str]  # released name -> reason

    def sliced(self, shapes: Shapes) -> dict[str, str]:
        return {s.source: f"{shapes[s.source][0]} -> {s.rows} rows" for s in self.steps
                if s.rows is not None and shapes[s.source][0] != s.rows}


def source_name(target: str) -> str:
    """The released name of our parameter ``target``."""
    for pattern, template in RULES:
        match = re.fullmatch(pattern, target)
        if match:
            return match.expand(template)
    raise ReleaseError(f"no mapping rule for {target} (the model changed: update RULES)")


def plan_import(source: Shapes, target: Shapes) -> ImportPlan:
    """Match every tensor of ``target`` (ours) to one of ``source`` (the file), checking
    shapes; every source tensor must be used or in :data:`IGNORED`. Works on shapes only."""
    steps, problems, referenced = [], [], set()
    for name, shape in target.items():
        src = source_name(name)
        referenced.add(src)
        if src not in source:
            problems.append(f"missing {src} (for {name}, shape {tuple(shape)})")
            continue
        got = tuple(source[src])
        rows = shape[0] if name in ROW_SLICED else None
        after = (min(got[0], rows), *got[1:]) if rows is not None and got else got
        if after != tuple(shape) or (rows is not None and got[0] < rows):
            problems.append(f"{src} has shape {got}, {name} needs {tuple(shape)}"
                            + (f" (first {rows} rows)" if rows is not None else ""))
            continue
        steps.append(Step(name, src, rows))
    unknown = sorted(set(source) - referenced - set(IGNORED))
    problems += [f"unexpected {name} {tuple(source[name])} (neither mapped nor ignored)" for name in unknown]
    if problems:
        shown = "\n  ".join(problems[:25]) + (f"\n  ... {len(problems) - 25} more" if len(problems) > 25 else "")
        raise ReleaseError(f"{len(problems)} tensor(s) do not fit:\n  {shown}")
    return ImportPlan(steps, {k: IGNORED[k] for k in IGNORED if k in source})


def convert(state: Mapping[str, torch.Tensor], plan: ImportPlan) -> dict[str, torch.Tensor]:
    """Our state dict from the released one, following ``plan``."""
    out = {}
    for step in plan.steps:
        tensor = state[step.source]
        out[step.target] = tensor[: step.rows] if step.rows is not None else tensor
    return out


# -- the model config the file needs -----------------------------------------------------


def _decoder_layers(shapes: Shapes, decoder: str) -> int:
    return len({int(m.group(1)) for n in shapes if (m := re.match(rf"{decoder}\.layers\.(\d+)\.", n))})


def _check_openai_heads(cfg: ModelConfig) -> None:
    """CLIP4STR builds its towers with OpenAI's ``build_model``: heads = width // 64."""
    vision, text = cfg.clip["vision_cfg"], cfg.clip["text_cfg"]
    if vision.get("head_width", 64) != 64 or text["heads"] != text["width"] // 64:
        raise ReleaseError(f"config {cfg.name!r} does not use 64-wide attention heads in both towers, "
                           "as the released CLIP towers do")


def release_config(base: ModelConfig, shapes: Shapes, hparams: Mapping[str, Any],
                   charset: str | None = None, normalization: str = "eval") -> tuple[ModelConfig, dict[str, str]]:
    """``base`` adapted to the file: decoder size, label length, charset, preprocessing.

    Returns the config and notes on where each choice came from.
    """
    _check_openai_heads(base)
    notes: dict[str, str] = {}
    need = ("visual_decoder.pos_queries", "visual_decoder.head.weight", "visual_decoder.layers.0.linear1.weight")
    missing = [n for n in need if n not in shapes]
    if missing:
        raise ReleaseError(f"missing {missing[0]}: not a CLIP4STR (VL4STR) state dict")
    depth = _decoder_layers(shapes, "visual_decoder")
    if _decoder_layers(shapes, "cross_decoder") not in (0, depth):
        raise ReleaseError("cross_decoder.layers and visual_decoder.layers differ in depth")
    width = shapes["visual_decoder.pos_queries"][-1]
    hidden = shapes["visual_decoder.layers.0.linear1.weight"][0]
    heads = hparams.get("dec_num_heads", base.decoder.heads)
    notes["decoder_heads"] = "hyper_parameters.dec_num_heads" if "dec_num_heads" in hparams else f"config {base.name}"
    if not isinstance(heads, int) or width % heads:
        raise ReleaseError(f"decoder heads {heads!r} do not divide the decoder width {width}")
    decoder = replace(base.decoder, depth=depth, heads=heads, mlp_ratio=hidden / width)

    chars, notes["charset"] = _pick_charset(charset, hparams)
    classes = shapes["visual_decoder.head.weight"][0]
    if classes != len(chars) + 1:
        raise ReleaseError(f"visual_decoder.head.weight has {classes} rows but the charset from "
                           f"{notes['charset']} has {len(chars)} characters (+1 for EOS): pass --charset")
    max_length = shapes["visual_decoder.pos_queries"][1] - 1
    context = hparams.get("context_length", RELEASE_CONTEXT_LENGTH)
    if not isinstance(context, int):
        context = RELEASE_CONTEXT_LENGTH
    if hparams.get("max_label_length", max_length) != max_length:
        raise ReleaseError(f"visual_decoder.pos_queries has {max_length + 1} rows but hyper_parameters say "
                           f"max_label_length={hparams['max_label_length']}")
    mean, std = (EVAL_MEAN, EVAL_STD) if normalization == "eval" else (TRAIN_MEAN, TRAIN_STD)
    image = Preprocessing(base.image.height, base.image.width, mean, std, "bicubic")
    size = hparams.get("img_size")
    if isinstance(size, list | tuple) and tuple(size) != (image.height, image.width):
        raise ReleaseError(f"hyper_parameters.img_size={list(size)} but config {base.name} reads "
                           f"{image.height}x{image.width}")
    refine_iters = hparams.get("refine_iters", 1)
    cfg = replace(base, quick_gelu=True, image=image, charset_train="94" if chars == CHARSET_94 else chars,
                  max_label_length=max_length, decoder=decoder, text_context_length=int(context),
                  refine_iters=int(refine_iters) if isinstance(refine_iters, int) else 1, fast_decode=False)
    return cfg, notes


def _pick_charset(charset: str | None, hparams: Mapping[str, Any]) -> tuple[str, str]:
    if charset is not None:
        return charset, "--charset"
    if isinstance(hparams.get("charset_train"), str):
        return hparams["charset_train"], "hyper_parameters.charset_train"
    return RELEASE_CHARSET, "CLIP4STR's configs/charset/94_full.yaml (the file has no charset)"


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our state dict's names and shapes for ``cfg``, without allocating the weights."""
    from training.model.clip4str import CLIP4STR

    with torch.device("meta"):
        model = CLIP4STR(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def resolve(shapes: Shapes, hparams: Mapping[str, Any], arch: str | None = None, charset: str | None = None,
            normalization: str = "eval") -> tuple[ModelConfig, ImportPlan, dict[str, str]]:
    """The config and plan for a file: ``arch`` (a config name or path) or the one paper
    config (``training/configs/clip4str-*.json``) whose plan fits."""
    if arch is not None:
        cfg, notes = release_config(model_config(arch), shapes, hparams, charset, normalization)
        return cfg, plan_import(shapes, target_shapes(cfg)), notes
    fits, errors = [], []
    for path in sorted(CONFIG_DIR.glob("clip4str-*.json")):
        try:
            cfg, notes = release_config(model_config(str(path)), shapes, hparams, charset, normalization)
            fits.append((cfg, plan_import(shapes, target_shapes(cfg)), notes))
        except (ValueError, KeyError, TypeError) as exc:  # ReleaseError is a ValueError
            errors.append(f"{path.stem}: {str(exc).splitlines()[0]}")
    if len(fits) == 1:
        return fits[0]
    conv = shapes.get("clip_model.visual.conv1.weight")
    if not fits:
        raise ReleaseError(f"no config fits this file (clip_model.visual.conv1.weight {conv}); pass "
                           "--arch. Tried:\n  " + "\n  ".join(errors))
    raise ReleaseError(f"several configs fit: {[f[0].name for f in fits]}; pass --arch")


# -- the command -------------------------------------------------------------------------


def import_clip4str(file: str | Path, out_dir: str | Path, arch: str | None = None, charset: str | None = None,
                    normalization: str = "eval", half: bool = False, stub_globals: bool = True,
                    force: bool = False, log: Any = print) -> Path:
    """Import a released CLIP4STR file into checkpoint directory ``out_dir``."""
    from training.checkpoint import CONFIG_NAME, save_checkpoint
    from training.model.clip4str import CLIP4STR

    file, out = Path(file), Path(out_dir)
    if (out / CONFIG_NAME).exists() and not force:
        raise ReleaseError(f"{out} already holds a checkpoint (use --force to overwrite)")
    release = load_release(file, stub_globals)
    shapes = {k: tuple(v.shape) for k, v in release.state.items()}
    cfg, plan, notes = resolve(shapes, release.hparams, arch, charset, normalization)
    if release.stubbed:
        log(f"note: {len(release.stubbed)} global(s) outside the weights were read as inert placeholders: "
            f"{', '.join(release.stubbed)}")
    model = CLIP4STR(cfg)
    model.load_state_dict(convert(release.state, plan), strict=True)
    meta = _meta(file, release, cfg, plan, shapes, notes, normalization)
    save_checkpoint(model.eval(), out, meta=meta, half=half)
    log(f"imported {file.name} ({release.container}, {len(shapes)} tensors: {len(plan.steps)} mapped, "
        f"{len(plan.ignored)} ignored) as {cfg.name} into {out}")
    for source, what in plan.sliced(shapes).items():
        log(f"  sliced {source}: {what}")
    for source, why in plan.ignored.items():
        log(f"  ignored {source}: {why}")
    log(f"  charset from {notes['charset']}; normalisation mean/std {cfg.image.mean}/{cfg.image.std} "
        f"({normalization}); QuickGELU in every tower; {cfg.image.height}x{cfg.image.width} bicubic")
    return out


def _meta(file: Path, release: Release, cfg: ModelConfig, plan: ImportPlan, shapes: Shapes,
          notes: dict[str, str], normalization: str) -> dict[str, Any]:
    known = KNOWN_RELEASES.get(file.name)
    return {
        "imported_from": {
            "project": "github.com/VamosC/CLIP4STR",
            "file": file.name, "bytes": file.stat().st_size, "sha256": file_sha256(file),
            "container": release.container,
            "release": dict(zip(("arch", "pretraining", "train_data"), known, strict=True)) if known else None,
        },
        "importer": "training.import_clip4str",
        "arch": cfg.name,
        "activation": "QuickGELU in every tower (CLIP4STR's CLIP code hard-codes it)",
        "normalization": {
            "used": normalization,
            "eval": {"mean": list(EVAL_MEAN), "std": list(EVAL_STD),
                     "why": "CLIP4STR's test transform; the published accuracy was measured with it"},
            "train": {"mean": list(TRAIN_MEAN), "std": list(TRAIN_STD),
                      "why": "CLIP4STR's training transform (openai_meanstd: true)"},
        },
        "sources": notes,
        "sliced": plan.sliced(shapes),
        "ignored": plan.ignored,
        "stubbed_globals": release.stubbed,
        "hyper_parameters": release.hparams,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.import_clip4str", description=__doc__.splitlines()[0])
    parser.add_argument("file", help="released .pt or .ckpt file")
    parser.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    parser.add_argument("--arch", help="config name (clip4str-b16, clip4str-l14) or path; default: detected")
    parser.add_argument("--charset", help="the head's characters in id order (default: the file's, else 94)")
    parser.add_argument("--normalization", choices=("eval", "train"), default="eval",
                        help="eval: mean/std 0.5 as the authors' evaluation (default); train: OpenAI mean/std")
    parser.add_argument("--half", action="store_true", help="store float16 weights")
    parser.add_argument("--strict-load", action="store_true",
                        help="refuse files whose pickles name any global outside torch's weights_only allowlist")
    parser.add_argument("--dry-run", action="store_true", help="check the mapping, write nothing")
    parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in --output")
    args = parser.parse_args(argv)
    try:
        if args.dry_run:
            release = load_release(args.file, not args.strict_load)
            shapes = {k: tuple(v.shape) for k, v in release.state.items()}
            cfg, plan, notes = resolve(shapes, release.hparams, args.arch, args.charset, args.normalization)
            print(f"{args.file}: fits {cfg.name}; {len(plan.steps)} tensors mapped, ignored {list(plan.ignored)}, "
                  f"sliced {plan.sliced(shapes)}; charset from {notes['charset']}; stubbed {release.stubbed}")
            return 0
        import_clip4str(args.file, args.output, args.arch, args.charset, args.normalization, args.half,
                        not args.strict_load, args.force)
    except (ValueError, KeyError, FileNotFoundError) as exc:  # ReleaseError, bad --arch or config
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
