"""CLIP image and text towers from open_clip, as CLIP4STR uses them.

The image encoder keeps every token (CLS included) after ``ln_post`` and the projection:
``F_i`` is ``(B, 1 + P, D)``. The text encoder reads 16 BPE ids with the positional
embedding and causal mask cut to 16 and keeps every token after ``ln_final`` and the
projection: ``F_t`` is ``(B, 16, D)``.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn

from training.config import ModelConfig


def build_clip(cfg: ModelConfig, pretrained: str | None = None) -> open_clip.model.CLIP:
    """An open_clip CLIP built from ``cfg.clip``; weights from a pretrained tag or file.

    ``pretrained`` is a local weights file (anything open_clip's ``load_checkpoint``
    reads, safetensors included) or one of open_clip's tags for ``cfg.open_clip_name``
    (which needs a network the first time).
    """
    clip = open_clip.model.CLIP(**cfg.clip, quick_gelu=cfg.quick_gelu)
    if pretrained is None:
        return clip
    if Path(pretrained).is_file():
        open_clip.load_checkpoint(clip, str(pretrained), strict=True, weights_only=True)
        return clip
    if cfg.open_clip_name is None:
        raise ValueError(f"{pretrained!r} is not a file and config {cfg.name!r} has no open_clip model name")
    reference = open_clip.create_model(
        cfg.open_clip_name, pretrained=pretrained, force_quick_gelu=cfg.quick_gelu
    )
    clip.load_state_dict(reference.state_dict(), strict=True)
    return clip


class ImageEncoder(nn.Module):
    """CLIP ViT returning all tokens after ``ln_post`` and ``@ proj``."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, images: Tensor) -> Tensor:
        v = self.visual
        x = v.conv1(images)
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        x = v.ln_pre(x)
        x = v.transformer(x)
        x = v.ln_post(x)
        return x @ v.proj


class TextEncoder(nn.Module):
    """CLIP text transformer over ``context_length`` ids, all tokens projected."""

    def __init__(self, clip: open_clip.model.CLIP, context_length: int, frozen_layers: int) -> None:
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = nn.Parameter(clip.positional_embedding.detach()[:context_length].clone())
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer(
            "attn_mask", torch.triu(torch.full((context_length, context_length), float("-inf")), 1),
            persistent=False,
        )
        self.context_length = context_length
        self.frozen_layers = frozen_layers
        self.freeze()

    def freeze(self) -> None:
        """Freeze the token and positional embeddings and the lower ``frozen_layers`` blocks."""
        self.token_embedding.requires_grad_(False)
        self.positional_embedding.requires_grad_(False)
        for block in self.transformer.resblocks[: self.frozen_layers]:
            block.requires_grad_(False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.transformer(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection
