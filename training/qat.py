"""Quantization-aware fine-tuning of the PP-OCR tower, so that its static INT8 graph reads
as the FP32 one does.

    python -m training.qat TRAIN... --val VAL... -o OUT [--minutes 20] [--from CKPT]

Post-training quantization of the tower changes 5-7% of its readings even with every
activation at 16 bits (docs/int8.md): the readings flip under the ~1% noise that int8
weights add. Here the tower and its CTC head learn under that noise: every convolution and
linear weight is seen through int8 fake quantization (symmetric, per output channel, the
scheme ``export.static_int8`` gives onnxruntime's quantizer: ``scale = max|w| / 127``;
per channel it commutes with folding a following batch norm into the convolution), and,
optionally, the input of each of those layers through uint8 fake quantization (per tensor,
ranges fixed from the FP32 tower's activations on the first batches). The target is the
FP32 original's per-frame CTC distribution on the training crops (distillation, no labels
needed), so what is learnt is to read as FP32 does under quantization, not a new domain.

With ``--grid QDQ.onnx`` the activations are fake-quantized where onnxruntime's int8 graph
of the starting model quantizes them, with its scales and zero points
(``training.qat_ranges``; ``benchmarks.int8_screen --ranges-from`` quantizes the trained
weights on the same grid). Three runs, the last on that grid, did not bring onnxruntime's
int8 readings closer to FP32 (docs/int8.md, "Quantization-aware fine-tuning"); nothing from
them is shipped.

OUT gets ``checkpoint/`` (the whole model with the tower's float weights after training;
``python -m export.onnx OUT/checkpoint -o BUNDLE --precision int8 --calibration SET``
quantizes it as any checkpoint) and ``qat_state.safetensors`` (the tower's state, written at
every validation: a run started again with the same OUT resumes from it, with the time
already spent counted). The last line on stdout is one JSON object: the fake-quantized
tower's CTC reading of the validation sets (accuracy, strings that differ from FP32's)
before and after.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from runtime.decoding import CharCodec
from training.checkpoint import save_checkpoint
from training.finetune import (
    Batches,
    Tower,
    answers,
    distillation,
    load_tower_state,
    preprocessed_crops,
    progress_bar,
    read_sets,
    save_tower_state,
    start_model,
)

#: int8 weights: symmetric, -127..127 (onnxruntime's range for symmetric int8)
WEIGHT_RANGE = (-127, 127)
#: uint8 activations, asymmetric, zero exactly representable
ACTIVATION_RANGE = (0, 255)
STATE_FILE = "qat_state.safetensors"
PROGRESS_FILE = "qat_progress.json"


@dataclass(frozen=True)
class QATSettings:
    """What a quantization-aware fine-tune does (docs/int8.md has the runs)."""

    minutes: float = 20.0
    batch: int = 16
    #: AdamW learning rates of the backbone, the SVTR neck and the CTC head (cosine to 0)
    lr_backbone: float = 1e-5
    lr_neck: float = 3e-5
    lr_head: float = 1e-4
    #: fake-quantize the inputs of the convolutions and linear layers too (uint8)
    activations: bool = True
    #: batches whose FP32 activations fix those ranges (mean of the per-batch min and max)
    range_batches: int = 24
    #: an onnxruntime QDQ graph of the starting model whose activation grids are used
    #: instead (``training.qat_ranges``; its FP32 input graph ``prepared.onnx`` beside it)
    grid: str = ""
    eval_every_s: float = 120.0
    seed: int = 0
    threads: int = 0


class WeightFakeQuant(nn.Module):
    """A parametrization: the weight as its symmetric per-output-channel int8 values
    (gradients pass straight through)."""

    def forward(self, weight: Tensor) -> Tensor:
        dims = tuple(range(1, weight.dim()))
        scale = (weight.detach().abs().amax(dim=dims) / WEIGHT_RANGE[1]).clamp_min(1e-12).float()
        zero = torch.zeros(weight.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, *WEIGHT_RANGE)


class ActivationFakeQuant:
    """A forward pre-hook: first records the range of a layer's input, then (after
    :meth:`fix`) passes it through uint8 fake quantization with that range."""

    def __init__(self) -> None:
        self.lows: list[float] = []
        self.highs: list[float] = []
        self.scale: float | None = None
        self.zero: int = 0

    def fix(self) -> None:
        low = min(0.0, float(np.mean(self.lows))) if self.lows else 0.0
        high = max(0.0, float(np.mean(self.highs))) if self.highs else 1.0
        self.scale = max(high - low, 1e-8) / ACTIVATION_RANGE[1]
        self.zero = int(round(-low / self.scale))

    def __call__(self, module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
        x = args[0]
        if self.scale is None:
            self.lows.append(float(x.detach().min()))
            self.highs.append(float(x.detach().max()))
            return None
        return (torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero, *ACTIVATION_RANGE), *args[1:])


def quantized_layers(tower: nn.Module) -> list[tuple[str, nn.Module]]:
    """The convolutions and linear layers of ``tower``: what the static INT8 graph quantizes."""
    return [(name, m) for name, m in tower.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def add_fake_quant(tower: nn.Module, activations: bool = True) -> tuple[list[ActivationFakeQuant], list[Any]]:
    """Fake int8 weights in every quantized layer of ``tower`` (in place) and, with
    ``activations``, input hooks that record ranges until :meth:`ActivationFakeQuant.fix`;
    the hooks and their handles."""
    hooks, handles = [], []
    for _, layer in quantized_layers(tower):
        parametrize.register_parametrization(layer, "weight", WeightFakeQuant())
        if activations:
            hook = ActivationFakeQuant()
            handles.append(layer.register_forward_pre_hook(hook))
            hooks.append(hook)
    return hooks, handles


def strip_fake_quant(tower: nn.Module, handles: Sequence[Any]) -> None:
    """Undo :func:`add_fake_quant`: the layers keep their float weights (as trained)."""
    for handle in handles:
        handle.remove()
    for _, layer in quantized_layers(tower):
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)


def float_state(tower: nn.Module) -> dict[str, Tensor]:
    """The tower's state with its float weights under their own names (the values the
    fake quantization reads), as a plain :class:`Tower` state."""
    out = {}
    for name, value in tower.state_dict().items():
        out[name.replace("parametrizations.weight.original", "weight")] = value.detach().clone()
    return out


def load_float_state(tower: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a plain :class:`Tower` state into a tower with fake quantization."""
    names = {name.replace("parametrizations.weight.original", "weight"): name for name in tower.state_dict()}
    tower.load_state_dict({names[name]: value for name, value in state.items()})


def readings(tower: nn.Module, crops: list[np.ndarray], codec: CharCodec) -> list[str]:
    """The tower's greedy CTC reading of each crop."""
    from runtime.ctc_reading import ctc_prediction

    tower.eval()
    return [ctc_prediction(codec, row.numpy()).text for row in answers(tower, crops, 32)]


def score(tower: nn.Module, sets: dict[str, tuple[list[np.ndarray], list[str], list[str]]],
          codec: CharCodec) -> dict[str, dict[str, float]]:
    """Per set: accuracy (%, protocol) and strings that differ from the FP32 original's."""
    from runtime.charset import WordAccuracy

    out = {}
    for name, (crops, labels, reference) in sets.items():
        texts = readings(tower, crops, codec)
        accuracy = WordAccuracy()
        accuracy.update(texts, labels)
        out[name] = {"accuracy": round(float(accuracy.as_dict()["accuracy"]), 3),
                     "changed": sum(a != b for a, b in zip(texts, reference))}
    return out


def _graph_grids(tower: nn.Module, grid: Path, crops: list[np.ndarray]) -> tuple[list[Any], dict[str, Any]]:
    """Hook ``grid``'s activation grids into ``tower`` (matched on two training crops of one
    width); a one-line error when the graph is not of this model."""
    from training.qat_ranges import graph_fake_quant

    prepared = grid.with_name("prepared.onnx")
    if not grid.is_file() or not prepared.is_file():
        raise SystemExit(f"error: --grid {grid}: needs the QDQ graph and prepared.onnx beside it "
                         "(benchmarks.int8_screen writes both)")
    widths: dict[int, list[np.ndarray]] = {}
    for x in crops:
        widths.setdefault(x.shape[-1], []).append(x)
    group = max(widths.values(), key=len)
    probe = np.concatenate((group * 2)[:2])
    handles, report = graph_fake_quant(tower.eval(), grid, prepared, probe)
    if report["matched"] < report["quantized_tensors"] // 2:
        for handle in handles:
            handle.remove()
        raise SystemExit(f"error: --grid {grid}: only {report['matched']} of its {report['quantized_tensors']} "
                         "activations match the tower: quantize the model training starts from")
    return handles, report


def _grid_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    return {"quantized_tensors": report["quantized_tensors"], "matched": report["matched"],
            "unmatched": report["unmatched"]}


def qat(train: list[tuple[Any, str]], val: dict[str, list[tuple[Any, str]]], out: Path, settings: QATSettings,
        source: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Quantization-aware fine-tune (see the module doc); the summary the command prints."""
    started = time.monotonic()
    model, source, rng = start_model(source, settings.threads, settings.seed, "training.qat")
    spec, codec = model.cfg.image, CharCodec(model.cfg.charset_train)
    teacher = Tower(copy.deepcopy(model)).to(memory_format=torch.channels_last).eval().requires_grad_(False)
    tower = Tower(model).to(memory_format=torch.channels_last)

    train_x = preprocessed_crops([x for x, _ in train], spec)
    targets = answers(teacher, train_x, settings.batch)
    val_sets = {}
    for name, pairs in val.items():
        crops = preprocessed_crops([x for x, _ in pairs], spec)
        val_sets[name] = (crops, [y for _, y in pairs], readings(teacher, crops, codec))
    fp32 = score(teacher, val_sets, codec)

    grid_report: dict[str, Any] | None = None
    if settings.grid:
        grid_handles, grid_report = _graph_grids(tower, Path(settings.grid), train_x)
        hooks, handles = add_fake_quant(tower, activations=False)
        handles = [*grid_handles, *handles]
    else:
        hooks, handles = add_fake_quant(tower, settings.activations)
    batches = Batches(train_x, targets, settings.batch, rng)
    with torch.no_grad():  # the activation ranges (weights already fake-quantized)
        for _ in range(settings.range_batches if hooks else 0):
            tower(batches.draw()[0])
    for hook in hooks:
        hook.fix()
    resumed = 0.0
    state_path, progress_path = out / STATE_FILE, out / PROGRESS_FILE
    if state_path.is_file() and progress_path.is_file():
        load_float_state(tower, load_tower_state(state_path))
        resumed = float(json.loads(progress_path.read_text())["train_seconds"])
        print(f"note: resuming {out} after {resumed / 60:.1f} minutes", file=sys.stderr)
    before = score(tower, val_sets, codec)
    history = [{"seconds": round(resumed, 1), "val": before}]

    parts = ((tower.features.backbone, settings.lr_backbone), (tower.features.neck, settings.lr_neck),
             (tower.classifier, settings.lr_head))
    for part, lr in parts:
        part.requires_grad_(lr > 0)
    optimizer = torch.optim.AdamW([{"params": list(part.parameters()), "lr": lr} for part, lr in parts if lr > 0],
                                  weight_decay=0.0)
    base_rates = [group["lr"] for group in optimizer.param_groups]
    budget = settings.minutes * 60.0
    train_start = time.monotonic() - resumed
    next_eval = time.monotonic() + settings.eval_every_s
    bar = progress_bar(budget, progress)
    step = 0
    out.mkdir(parents=True, exist_ok=True)

    def checkpoint_state(seconds: float) -> None:  # validate, and write what a resumed run starts from
        history.append({"seconds": round(seconds, 1), "step": step, "val": score(tower, val_sets, codec)})
        save_tower_state(float_state(tower), state_path)
        progress_path.write_text(json.dumps({"train_seconds": seconds, "history": history}) + "\n")

    while time.monotonic() - train_start < budget:
        tower.train()
        scale = 0.5 * (1.0 + math.cos(math.pi * min(1.0, (time.monotonic() - train_start) / budget)))
        for group, rate in zip(optimizer.param_groups, base_rates):
            group["lr"] = rate * scale
        images, teacher_rows = batches.draw()
        loss = distillation(tower(images), torch.stack(teacher_rows))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for p in tower.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        step += 1
        now = time.monotonic()
        if bar is not None:
            bar.n = min(budget, now - train_start)
            bar.set_postfix(step=step, loss=f"{float(loss):.4f}")
            bar.refresh()
        if now >= next_eval or now - train_start >= budget:
            checkpoint_state(now - train_start)
            next_eval = time.monotonic() + settings.eval_every_s
    if step and history[-1].get("step") != step:  # the last steps since the last validation
        checkpoint_state(time.monotonic() - train_start)
    elif step:  # validated at the last step: a resumed run must still find the whole budget spent
        progress_path.write_text(json.dumps({"train_seconds": time.monotonic() - train_start,
                                             "history": history}) + "\n")
    if bar is not None:
        bar.close()
    after = history[-1]["val"] if len(history) > 1 else before
    ranges = [{"layer": name, "scale": hook.scale, "zero_point": hook.zero}
              for (name, _), hook in zip(quantized_layers(tower), hooks)]
    strip_fake_quant(tower, handles)
    tower.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors
    meta = {"qat": {"settings": asdict(settings), "from": str(source), "train_crops": len(train),
                    "steps": step, "train_seconds": round(time.monotonic() - train_start, 1),
                    "fp32": fp32, "before": before, "after": after, "history": history,
                    "activation_ranges": ranges, "graph_grids": _grid_summary(grid_report)}}
    checkpoint = save_checkpoint(model, out / "checkpoint", meta=meta)
    summary = {"fp32": fp32, "graph_grids": _grid_summary(grid_report), "fake_int8_before": before,
               "fake_int8_after": after, "steps": step,
               "train_minutes": round((time.monotonic() - train_start) / 60.0, 2),
               "total_minutes": round((time.monotonic() - started) / 60.0, 2), "checkpoint": str(checkpoint)}
    (out / "qat.json").write_text(json.dumps({**summary, "history": history}, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.qat", description=__doc__.split("\n\n")[0])
    parser.add_argument("train", nargs="+", metavar="TRAIN", help="labelled training crops (the labels are not used)")
    parser.add_argument("--val", nargs="+", required=True, metavar="VAL", help="labelled sets to report on")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUT")
    parser.add_argument("--from", dest="source", type=Path, metavar="CKPT",
                        help="checkpoint or bundle with model.json (default: the embedded default model)")
    defaults = QATSettings()
    parser.add_argument("--minutes", type=float, default=defaults.minutes, help="training time (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--lr-backbone", type=float, default=defaults.lr_backbone)
    parser.add_argument("--lr-neck", type=float, default=defaults.lr_neck)
    parser.add_argument("--lr-head", type=float, default=defaults.lr_head)
    parser.add_argument("--weights-only", action="store_true", help="fake-quantize the weights only")
    parser.add_argument("--grid", type=Path, metavar="QDQ_ONNX",
                        help="onnxruntime's int8 graph of the starting model: train on its activation grids")
    parser.add_argument("--eval-every", type=float, default=defaults.eval_every_s, metavar="S")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.batch < 1:
        print("error: --minutes must be above 0 and --batch at least 1", file=sys.stderr)
        return 2
    from runtime.charset import resolve_charset

    charset = resolve_charset("94")
    train = read_sets(args.train, charset, 25)
    val = {str(path): read_sets([path], charset, 25) for path in args.val}
    if not train or not all(val.values()):
        print("error: no usable labelled crop in " + ("TRAIN" if not train else "a --val set"), file=sys.stderr)
        return 2
    settings = QATSettings(minutes=args.minutes, batch=args.batch, lr_backbone=args.lr_backbone,
                           lr_neck=args.lr_neck, lr_head=args.lr_head, activations=not args.weights_only,
                           grid=str(args.grid) if args.grid else "",
                           eval_every_s=args.eval_every, seed=args.seed, threads=args.threads)
    summary = qat(train, val, args.output, settings, args.source, progress=not args.no_progress)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
