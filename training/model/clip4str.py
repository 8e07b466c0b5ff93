"""CLIP4STR: image encoder + visual decoder, text encoder + cross-modal decoder.

Inference is CLIP4STR's dual predict-and-refine (docs/DESIGN.md, step 6); training is permuted
sequence modelling over both branches with the cross branch cut off from the image
encoder's gradients (step 5).
"""

from __future__ import annotations

import numpy as np
import open_clip
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from runtime.charset import resolve_charset
from runtime.decoding import CharCodec, Prediction, ctc_rescored, softmax
from runtime.tokenizer import BPETokenizer, TextBridge
from training.config import ModelConfig
from training.model.decoder import CharDecoder, padding_bias, permutation_logits, predict, refine
from training.model.permutations import attention_masks, generate_permutations
from training.model.ppocr_tower import WIDTH_STRIDE, CTCEncoding, PPOCRImageEncoder
from training.model.towers import ImageEncoder, TextEncoder, build_clip


def default_bpe_path() -> str:
    """CLIP's merges file as open_clip ships it (the export copies it into bundles)."""
    return open_clip.tokenizer.default_bpe()


class CLIP4STR(nn.Module):
    """The CLIP4STR network of a :class:`ModelConfig`."""

    def __init__(self, cfg: ModelConfig, pretrained: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        clip = build_clip(cfg, pretrained)
        if cfg.image_tower == "clip-vit":
            self.image_encoder: nn.Module = ImageEncoder(clip.visual)
        else:  # a pretrained text-recognition backbone; its weights come from its package
            ctc = (CTCEncoding(cfg.image_tower, resolve_charset(cfg.charset_train), cfg.embed_dim, cfg.num_steps)
                   if cfg.ctc_encoding else None)
            self.image_encoder = PPOCRImageEncoder(cfg.image_tower, cfg.embed_dim, cfg.image.width // WIDTH_STRIDE,
                                                   ctc=ctc)
            clip.visual = None
        self.text_encoder = TextEncoder(clip, cfg.text_context_length, cfg.frozen_text_layers)
        self.codec = CharCodec(cfg.charset_train)
        self.bridge = TextBridge(self.codec, cfg.charset_test, BPETokenizer(default_bpe_path()),
                                 cfg.text_context_length)
        width = cfg.embed_dim
        args = (width, self.codec.num_tokens, self.codec.num_classes, cfg.num_steps, cfg.decoder)
        self.visual_decoder = CharDecoder(*args)
        self.cross_decoder = CharDecoder(*args)

    @property
    def device(self) -> torch.device:
        return self.visual_decoder.pos_queries.device

    # -- stages -------------------------------------------------------------------------
    def encode_image(self, images: Tensor) -> Tensor:
        return self.image_encoder(images)

    def encode_text(self, ids: Tensor) -> Tensor:
        return self.text_encoder(ids)

    def text_ids(self, logits: Tensor) -> Tensor:
        """BPE ids of the argmax prediction in ``logits`` (through the shared bridge)."""
        ids = self.bridge(logits.argmax(-1).cpu().numpy())
        return torch.from_numpy(ids).to(logits.device)

    # -- inference ----------------------------------------------------------------------
    def forward(self, images: Tensor, early_exit: bool = True) -> dict[str, Tensor]:
        """Dual predict-and-refine. Returns the logits of every stage; ``final`` is the
        cross-modal output (and ``ctc_log_probs``, the tower's CTC classifier, when
        ``cfg.ctc_rescoring``: read the words with :meth:`predictions`)."""
        if self.cfg.ctc_rescoring:
            features, ctc = self.image_encoder.encode_with_ctc(images)
            return {**self.decode(features, early_exit), "ctc_log_probs": ctc}
        return self.decode(self.encode_image(images), early_exit)

    def predictions(self, out: dict[str, Tensor], topk: int = 0, fill_gaps: bool = False) -> list[Prediction]:
        """The words of a :meth:`forward` output: the final logits decoded, or rescored
        against the CTC reading when the output has one (the runtime's own decoding;
        ``fill_gaps``: as the manifest's ``correction.joint.fill_gaps``)."""
        probs = softmax(out["final"].float().cpu().numpy())
        if "ctc_log_probs" in out:
            return ctc_rescored(self.codec, probs, out["ctc_log_probs"].float().cpu().numpy(), topk,
                                fill_gaps=fill_gaps)
        return self.codec.decode(probs, topk=topk)

    def decode(self, image_features: Tensor, early_exit: bool = True) -> dict[str, Tensor]:
        """Dual predict-and-refine from ``F_i`` (see :meth:`forward`)."""
        cfg, bos = self.cfg, self.codec.bos_id
        visual = predict(self.visual_decoder, image_features, bos, cfg.num_steps, cfg.autoregressive, early_exit)
        text_features = self.encode_text(self.text_ids(visual))
        memory = torch.cat([image_features, text_features], dim=1)
        out = {"visual_ar": visual}
        if cfg.fast_decode:
            cross = refine(self.cross_decoder, memory, visual, bos)
            out.update(cross_refined=cross, final=cross)
            return out
        cross = predict(self.cross_decoder, memory, bos, cfg.num_steps, cfg.autoregressive, early_exit)
        out["cross_ar"] = cross
        for _ in range(cfg.refine_iters):
            visual = refine(self.visual_decoder, image_features, visual, bos)
            memory = torch.cat([image_features, self.encode_text(self.text_ids(visual))], dim=1)
            cross = refine(self.cross_decoder, memory, cross, bos)
        if cfg.refine_iters:
            out.update(visual_refined=visual, cross_refined=cross)
        out["final"] = cross
        return out

    @torch.inference_mode()
    def read(self, images: Tensor, topk: int = 5) -> list[Prediction]:
        """Decoded words with per-character probabilities and the top-k per position."""
        return self.predictions(self.forward(images.to(self.device)), topk)

    # -- training -----------------------------------------------------------------------
    def losses(self, images: Tensor, labels: list[str], rng: np.random.Generator,
               num_perms: int = 6) -> dict[str, Tensor]:
        """Visual and cross-modal permutation losses for a batch of images (see
        :meth:`losses_from_features`)."""
        return self.losses_from_features(self.encode_image(images), labels, rng, num_perms)

    def losses_from_features(self, image_features: Tensor, labels: list[str], rng: np.random.Generator,
                             num_perms: int = 6) -> dict[str, Tensor]:
        """Visual and cross-modal permutation losses for a batch of labels.

        The cross branch reads the ground truth as context and a memory made of the image
        features (detached) and the text encoding of the visual left-to-right prediction
        (detached), so its gradients never reach the image encoder.
        """
        codec, device = self.codec, image_features.device
        targets = torch.from_numpy(codec.encode(labels)).to(device)
        perms = generate_permutations(targets.shape[1] - 2, num_perms, rng).to(device)
        context, expected = targets[:, :-1], targets[:, 1:]
        padding = padding_bias((context == codec.pad_id) | (context == codec.eos_id))

        visual_loss, first_logits = self._perm_loss(self.visual_decoder, image_features, context,
                                                   expected, perms, padding)
        text_features = self.encode_text(self.text_ids(first_logits.detach()))
        memory = torch.cat([image_features.detach(), text_features], dim=1)
        cross_loss, _ = self._perm_loss(self.cross_decoder, memory, context, expected, perms, padding)
        return {"visual": visual_loss, "cross": cross_loss}

    def loss(self, images: Tensor, labels: list[str], rng: np.random.Generator,
             num_perms: int = 6) -> tuple[Tensor, dict[str, float]]:
        """The training loss (visual + cross) and its parts as floats for logging."""
        return self.loss_from_features(self.encode_image(images), labels, rng, num_perms)

    def loss_from_features(self, image_features: Tensor, labels: list[str], rng: np.random.Generator,
                           num_perms: int = 6) -> tuple[Tensor, dict[str, float]]:
        """:meth:`loss` from ``F_i`` (e.g. a frozen tower's cached features, projected)."""
        parts = self.losses_from_features(image_features, labels, rng, num_perms)
        total = parts["visual"] + parts["cross"]
        stats = {"loss": total.item(), "visual_loss": parts["visual"].item(), "cross_loss": parts["cross"].item()}
        return total, stats

    def _perm_loss(self, decoder: CharDecoder, memory: Tensor, context: Tensor, expected: Tensor,
                   perms: Tensor, padding: Tensor) -> tuple[Tensor, Tensor]:
        """Token-count-weighted cross entropy over the permutations; EOS is a target only
        for the first two (canonical) orders. Also returns the left-to-right logits."""
        pad, eos = self.codec.pad_id, self.codec.eos_id
        masks = [attention_masks(perm) for perm in perms]
        content_masks = torch.stack([m[0] for m in masks])
        query_masks = torch.stack([m[1] for m in masks])
        logits = permutation_logits(decoder, context, memory, query_masks, content_masks, padding)
        targets = expected.unsqueeze(0).repeat(len(perms), 1, 1)
        targets[2:] = torch.where(targets[2:] == eos, pad, targets[2:])
        total = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), ignore_index=pad, reduction="sum")
        return total / (targets != pad).sum(), logits[0]
