"""Checkpoints: safetensors weights plus a JSON config that fully rebuilds the model.

Layout of a checkpoint directory::

    CKPT/model.json          {"format": "clipllama-checkpoint", "version": 1, "model": {...}, "meta": {...}}
    CKPT/model.safetensors   the state dict (float32 or float16)

No pickles: resuming training uses a separate ``train_state.pt`` read with
``weights_only=True``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from training.config import ModelConfig
from training.model.clip4str import CLIP4STR

FORMAT = "clipllama-checkpoint"
VERSION = 1
CONFIG_NAME = "model.json"
WEIGHTS_NAME = "model.safetensors"


def checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint directory of ``path`` (the directory or either of its files)."""
    path = Path(path)
    return path.parent if path.is_file() else path


def save_checkpoint(model: CLIP4STR, path: str | Path, meta: dict[str, Any] | None = None,
                    half: bool = False) -> Path:
    """Write ``model.json`` and ``model.safetensors`` into directory ``path``."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        state[name] = tensor.half() if half and tensor.is_floating_point() else tensor
    save_file(state, str(out / WEIGHTS_NAME))
    document = {"format": FORMAT, "version": VERSION, "model": model.cfg.to_dict(), "meta": meta or {}}
    (out / CONFIG_NAME).write_text(json.dumps(document, indent=2))
    return out


def read_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config and metadata of a checkpoint."""
    document = json.loads((checkpoint_dir(path) / CONFIG_NAME).read_text())
    if document.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} (format={document.get('format')!r})")
    if document.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {document.get('version')} is not supported")
    return ModelConfig.from_dict(document["model"]), document.get("meta", {})


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> CLIP4STR:
    """Rebuild the model of a checkpoint in eval mode, weights in float32."""
    cfg, _ = read_config(path)
    model = CLIP4STR(cfg)
    state = load_file(str(checkpoint_dir(path) / WEIGHTS_NAME))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    """``python -m training.checkpoint SRC -o DST [--half] [--decode ar|nar]
    [--ctc-rescoring on|off] [--pad-width N]``: rewrite a checkpoint (e.g. in FP16, or with
    another decode or input padding)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.checkpoint",
                                     description="Copy a checkpoint, optionally with FP16 weights.")
    parser.add_argument("src")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--half", action="store_true", help="store floating-point weights as float16")
    parser.add_argument("--decode", choices=("ar", "nar"),
                        help="first prediction of each branch: autoregressive or PARSeq's parallel pass")
    parser.add_argument("--ctc-rescoring", choices=("on", "off"),
                        help="final word: the decoders' or the tower's CTC reading, whichever scores "
                             "higher (needs ctc_encoding)")
    parser.add_argument("--pad-width", type=int,
                        help="aspect-keeping towers: right-pad every batch to at least this width")
    args = parser.parse_args(argv)
    _, meta = read_config(args.src)
    model = load_checkpoint(args.src)
    if args.decode:
        model.cfg = replace(model.cfg, autoregressive=args.decode == "ar")
        meta = {**meta, "decode": args.decode}
    if args.ctc_rescoring:
        if args.ctc_rescoring == "on" and not model.cfg.ctc_encoding:
            parser.error("--ctc-rescoring on needs a model with ctc_encoding")
        model.cfg = replace(model.cfg, ctc_rescoring=args.ctc_rescoring == "on")
    if args.pad_width is not None:
        try:
            model.cfg = replace(model.cfg, image=replace(model.cfg.image, pad_width=args.pad_width))
        except ValueError as exc:
            parser.error(str(exc))
    save_checkpoint(model, args.output, meta={**meta, "half": args.half}, half=args.half)
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
