"""Train CLIP4STR.

    python -m training.train --config CFG [section.key=value ...] [--pretrained TAG|FILE]
                             [--resume DIR] [--output DIR]
    torchrun --nproc_per_node N -m training.train --config CFG ...   (DDP, one process per GPU
                                                                     or, with gloo, per CPU)

CFG is a file in ``training/configs`` (``clip4str-b16``, ``clip4str-l14``, ``clip4str-tiny``,
...) or a path. Overrides address the config's sections, e.g. ``train.max_steps=500``,
``train.train_data=["/data/lmdb"]``, ``model.decoder.depth=2``. The best checkpoint by
validation accuracy is written to ``OUTPUT/best`` (safetensors + JSON); ``OUTPUT/last``
holds the resumable training state.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from training.checkpoint import save_checkpoint
from training.config import ModelConfig, TrainConfig, config_path
from training.data import build_dataset, collate
from training.evaluate import evaluate_loader
from training.model.clip4str import CLIP4STR
from training.optim import build_optimizer, lr_factor, set_lr


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``section.key=value`` pairs in a config document (values parsed as JSON)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


class TrainingStep(nn.Module):
    """Wraps the loss so DistributedDataParallel sees it as ``forward``."""

    def __init__(self, model: CLIP4STR, num_perms: int) -> None:
        super().__init__()
        self.model = model
        self.num_perms = num_perms

    def forward(self, images: torch.Tensor, labels: list[str], rng: np.random.Generator) -> dict:
        return self.model.losses(images, labels, rng, self.num_perms)


def _train_dataset(cfg: ModelConfig, tcfg: TrainConfig) -> Dataset:
    parts = [build_dataset(s, cfg.image, cfg.charset_train, cfg.max_label_length, train=True,
                           augment=tcfg.augment, seed=tcfg.seed) for s in tcfg.train_data]
    if tcfg.synthetic_train:
        spec = f"synth:{tcfg.synthetic_train}:{tcfg.seed}:{tcfg.synthetic_difficulty}"
        parts.append(build_dataset(spec, cfg.image, cfg.charset_train,
                                   cfg.max_label_length, train=True, augment=tcfg.augment, seed=tcfg.seed))
    if not parts:
        raise ValueError("no training data: set train.train_data and/or train.synthetic_train")
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def _val_dataset(cfg: ModelConfig, tcfg: TrainConfig) -> Dataset | None:
    parts = [build_dataset(s, cfg.image, cfg.charset_train, cfg.max_label_length, train=False,
                           augment=False, seed=0) for s in tcfg.val_data]
    if tcfg.synthetic_val:
        # a seed far from the training one: held-out words
        spec = f"synth:{tcfg.synthetic_val}:{tcfg.seed + 1_000_003}:{tcfg.synthetic_difficulty}"
        parts.append(build_dataset(spec, cfg.image,
                                   cfg.charset_train, cfg.max_label_length, train=False, augment=False,
                                   seed=0))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


class Logger:
    """CSV (default) or TensorBoard scalars, written by rank 0 only."""

    def __init__(self, out: Path, kind: str, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        self.csv_path = out / "log.csv"
        if enabled and kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            return
        new = not self.csv_path.exists()
        with self.csv_path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "key", "value"])
            for key, value in values.items():
                writer.writerow([step, key, f"{value:.6g}"])


def _setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _autocast(device: torch.device, precision: str):
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return torch.autocast(device.type, enabled=False), None
    use_bf16 = precision in ("bf16", "auto") and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if use_bf16 else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast(device.type, dtype=dtype), scaler


def save_train_state(path: Path, model: CLIP4STR, optimizer: torch.optim.Optimizer, step: int,
                     best: float, rng: np.random.Generator, elapsed: float) -> None:
    """Resumable state (tensors and plain values only, loadable with ``weights_only=True``)."""
    path.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, path)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "best": best,
                "rng": rng.bit_generator.state, "elapsed": elapsed,
                "torch_rng": torch.get_rng_state()}, path / "train_state.pt")


def train(model_cfg: ModelConfig, tcfg: TrainConfig, pretrained: str | None = None,
          resume: str | None = None, init: str | None = None) -> dict[str, Any]:
    """Run training; returns a summary (steps, best validation accuracy, time)."""
    rank, world, device = _setup_distributed()
    torch.manual_seed(tcfg.seed)
    out = Path(tcfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"model": model_cfg.to_dict(), "train": asdict(tcfg)},
                                                    indent=2))
    model = CLIP4STR(model_cfg, pretrained=pretrained).to(device)
    optimizer = build_optimizer(model, tcfg, tcfg.batch_size * world)
    rng = np.random.default_rng(tcfg.seed)  # same on every rank: the same permutations
    if init:  # start from a checkpoint's weights (a new run: fresh optimizer and schedule)
        from safetensors.torch import load_file

        state = load_file(str(Path(init) / "model.safetensors"))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    step, best, elapsed_before = 0, -1.0, 0.0
    if resume:
        from safetensors.torch import load_file

        state = torch.load(Path(resume) / "train_state.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(load_file(str(Path(resume) / "model.safetensors")))
        optimizer.load_state_dict(state["optimizer"])
        step, best, elapsed_before = int(state["step"]), float(state["best"]), float(state["elapsed"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])

    train_set = _train_dataset(model_cfg, tcfg)
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=tcfg.seed) if world > 1 else None
    loader = DataLoader(train_set, batch_size=tcfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=tcfg.num_workers, collate_fn=collate, drop_last=True,
                        persistent_workers=tcfg.num_workers > 0)
    val_set = _val_dataset(model_cfg, tcfg) if rank == 0 else None
    val_loader = (DataLoader(val_set, batch_size=max(tcfg.batch_size, 64), num_workers=0, collate_fn=collate)
                  if val_set is not None else None)

    step_module: nn.Module = TrainingStep(model, tcfg.num_perms)
    if world > 1:
        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda"
                                              else None)
    autocast, scaler = _autocast(device, tcfg.precision)
    logger = Logger(out, tcfg.log, rank == 0)
    budget = tcfg.max_minutes * 60 if tcfg.max_minutes else None
    start = time.time() - elapsed_before
    bar = tqdm(total=tcfg.max_steps, initial=step, disable=rank != 0, file=sys.stderr, dynamic_ncols=True)
    epoch = 0
    history: list[dict[str, float]] = []
    model.train()

    def progress() -> float:
        fraction = step / tcfg.max_steps
        if budget:
            fraction = max(fraction, (time.time() - start) / budget)
        return fraction

    def validate() -> None:
        nonlocal best
        if rank != 0:
            return
        if val_loader is None:
            save_checkpoint(model, out / "best", meta={"step": step})
            return
        result = evaluate_loader(model, val_loader)
        history.append({"step": step, **result})
        logger.log(step, {"val/accuracy": result["accuracy"], "val/ned": result["ned"]})
        bar.write(f"step {step}: val accuracy {result['accuracy']:.2f} 1-NED {result['ned']:.2f}")
        if result["accuracy"] > best:
            best = result["accuracy"]
            save_checkpoint(model, out / "best", meta={"step": step, "val": result})

    done = False
    while not done:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for images, labels in loader:
            set_lr(optimizer, lr_factor(progress(), tcfg.warmup_fraction))
            images = images.to(device, non_blocking=True)
            with autocast:
                parts = step_module(images, labels, rng)
                loss = parts["visual"] + parts["cross"]
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            bar.update(1)
            if rank == 0 and (step % 10 == 0 or step == 1):
                values = {"train/loss": loss.item(), "train/visual": parts["visual"].item(),
                          "train/cross": parts["cross"].item(), "train/grad_norm": float(grad_norm),
                          "train/lr": optimizer.param_groups[0]["lr"]}
                logger.log(step, values)
                bar.set_postfix(loss=f"{values['train/loss']:.3f}")
            if step % tcfg.val_every == 0:
                validate()
                if rank == 0:
                    save_train_state(out / "last", model, optimizer, step, best, rng, time.time() - start)
            if step >= tcfg.max_steps or progress() >= 1.0:
                done = True
                break
        epoch += 1
    if step % tcfg.val_every:
        validate()
    bar.close()
    elapsed = time.time() - start
    if rank == 0:
        save_train_state(out / "last", model, optimizer, step, best, rng, elapsed)
    summary = {"steps": step, "best_val_accuracy": best, "minutes": elapsed / 60, "world_size": world,
               "rank": rank, "history": history, "output": str(out),
               "param_checksum": float(sum(p.detach().double().abs().sum() for p in model.parameters()))}
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if world > 1:
        dist.barrier()
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="config name in training/configs or a JSON path")
    parser.add_argument("overrides", nargs="*", help="section.key=value (value as JSON)")
    parser.add_argument("--pretrained", help="open_clip tag (e.g. openai) or a local CLIP weights file")
    parser.add_argument("--resume", help="a previous run's OUTPUT/last directory")
    parser.add_argument("--init", help="start from this checkpoint's weights (fresh optimizer and schedule)")
    parser.add_argument("--output", help="output directory (overrides train.output_dir)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    document = json.loads(config_path(args.config).read_text())
    document = apply_overrides(document, args.overrides)
    if args.output:
        document.setdefault("train", {})["output_dir"] = args.output
    model_cfg = ModelConfig.from_dict(document["model"])
    tcfg = TrainConfig.from_dict(document.get("train", {}))
    summary = train(model_cfg, tcfg, pretrained=args.pretrained, resume=args.resume, init=args.init)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
