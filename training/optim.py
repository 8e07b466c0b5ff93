"""AdamW parameter groups and the learning-rate schedule of CLIP4STR (docs/DESIGN.md, step 5).

The CLIP towers learn at ``lr * batch / 512``, the decoders ``decoder_lr_scale`` (19) times
faster. Weight decay applies to matrices only: not to 1-D parameters (norms, biases), the
position queries or any embedding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.config import TrainConfig

_NO_DECAY_NAMES = ("embedding", "pos_queries", "class_embedding", "positional_embedding")


def _decays(name: str, parameter: torch.Tensor) -> bool:
    return parameter.ndim >= 2 and not any(key in name for key in _NO_DECAY_NAMES)


def parameter_groups(model: nn.Module, cfg: TrainConfig, total_batch: int) -> list[dict]:
    """Four groups: (towers | decoders) x (decay | no decay), each with its base lr."""
    base = cfg.lr * total_batch / 512
    groups: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_decoder = name.startswith(("visual_decoder.", "cross_decoder."))
        groups.setdefault((is_decoder, _decays(name, parameter)), []).append(parameter)
    out = []
    for (is_decoder, decay), params in sorted(groups.items()):
        lr = base * (cfg.decoder_lr_scale if is_decoder else 1.0)
        out.append({"params": params, "lr": lr, "base_lr": lr,
                    "weight_decay": cfg.weight_decay if decay else 0.0,
                    "name": f"{'decoder' if is_decoder else 'clip'}{'' if decay else '_no_decay'}"})
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig, total_batch: int) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, cfg, total_batch), betas=cfg.betas, eps=cfg.eps)


def lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction, then cosine decay to zero
    (the shape of the one-cycle schedule CLIP4STR trains with)."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / max(1.0 - warmup, 1e-8)))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
