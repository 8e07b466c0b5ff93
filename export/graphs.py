"""The four exported graphs as ``nn.Module`` wrappers around the model's own code.

Each wrapper calls the model's submodules and the decode functions of
``training.model.decoder`` (``autoregressive`` with ``early_exit=False``, ``refine``), so
the traced graphs and eager PyTorch share one implementation of the decode
(docs/bundle.md, "The four graphs").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from training.model.clip4str import CLIP4STR
from training.model.decoder import predict, refine

#: names of the dynamic axes of an aspect-keeping tower's graphs (docs/bundle.md)
WIDTH_AXIS = "width"
TOKENS_AXIS = "tokens"
#: Batch of the example inputs the graphs are traced with (not 1, so no size-1
#: broadcasting is baked in; the batch axis is dynamic anyway).
TRACE_BATCH = 2


class ImageEncoderGraph(nn.Module):
    """``images (B,3,H,W)`` -> ``image_features (B,1+P,D)`` (and, for a model with CTC
    rescoring, ``ctc_log_probs (B,P,C+1)``: the tower's CTC classifier)."""

    def __init__(self, model: CLIP4STR) -> None:
        super().__init__()
        self.encoder = model.image_encoder
        self.with_ctc = model.cfg.ctc_rescoring

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if self.with_ctc:
            return self.encoder.encode_with_ctc(images)
        return self.encoder(images)


class TextEncoderGraph(nn.Module):
    """``text_ids (B,16)`` -> ``text_features (B,16,D)``."""

    def __init__(self, model: CLIP4STR) -> None:
        super().__init__()
        self.encoder = model.text_encoder

    def forward(self, text_ids: Tensor) -> Tensor:
        return self.encoder(text_ids)


class VisualDecoderGraph(nn.Module):
    """``image_features`` -> AR logits (26 unrolled steps) and one refinement pass."""

    def __init__(self, model: CLIP4STR) -> None:
        super().__init__()
        self.decoder = model.visual_decoder
        self.bos_id = model.codec.bos_id
        self.num_steps = model.cfg.num_steps
        self.autoregressive = model.cfg.autoregressive

    def forward(self, image_features: Tensor) -> tuple[Tensor, Tensor]:
        ar = predict(self.decoder, image_features, self.bos_id, self.num_steps, self.autoregressive,
                     early_exit=False)
        return ar, refine(self.decoder, image_features, ar, self.bos_id)


class CrossDecoderGraph(nn.Module):
    """Cross-modal decoder: AR over ``[F_i, F_t(visual AR)]``, refinement over
    ``[F_i, F_t(visual refined)]`` (the order of ``CLIP4STR.forward``)."""

    def __init__(self, model: CLIP4STR) -> None:
        super().__init__()
        self.decoder = model.cross_decoder
        self.bos_id = model.codec.bos_id
        self.num_steps = model.cfg.num_steps
        self.autoregressive = model.cfg.autoregressive

    def forward(self, image_features: Tensor, text_features_ar: Tensor,
                text_features_refined: Tensor) -> tuple[Tensor, Tensor]:
        memory = torch.cat([image_features, text_features_ar], dim=1)
        ar = predict(self.decoder, memory, self.bos_id, self.num_steps, self.autoregressive, early_exit=False)
        memory = torch.cat([image_features, text_features_refined], dim=1)
        return ar, refine(self.decoder, memory, ar, self.bos_id)


@dataclass
class GraphDef:
    """One graph: its wrapper, example inputs and the names of its inputs and outputs."""

    name: str
    module: nn.Module
    example: tuple[Tensor, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    #: axes besides the batch that stay dynamic, by tensor name: ``{name: {axis: label}}``
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)


@torch.no_grad()
def graph_defs(model: CLIP4STR, batch: int = TRACE_BATCH, seed: int = 0) -> list[GraphDef]:
    """The four graphs of ``model`` with example inputs of batch ``batch``."""
    model.eval()
    cfg = model.cfg
    generator = torch.Generator().manual_seed(seed)
    # an aspect-keeping tower takes any width up to cfg.image.width: trace below the maximum
    # so a width the trace saw cannot be mistaken for a constant
    width = cfg.image.typical_width
    images = torch.randn(batch, 3, cfg.image.height, width, generator=generator)
    image_features = model.encode_image(images)
    vocab = int(model.text_encoder.token_embedding.num_embeddings)
    text_ids = torch.randint(0, vocab, (batch, cfg.text_context_length), generator=generator)
    text_features = model.encode_text(text_ids)
    tokens = {"image_features": {1: TOKENS_AXIS}} if cfg.image.keep_aspect else {}
    # the wrappers are new modules (training mode by default): the exporter restores the
    # mode it found after tracing, which would switch dropout (and the tower's training
    # behaviour) on in the model they wrap
    pixels = {"images": {3: WIDTH_AXIS}} if cfg.image.keep_aspect else {}
    encoder_outputs: tuple[str, ...] = ("image_features",)
    if cfg.ctc_rescoring:
        encoder_outputs += ("ctc_log_probs",)
        pixels["ctc_log_probs"] = {1: TOKENS_AXIS}
    return [
        GraphDef("image_encoder", ImageEncoderGraph(model).eval(), (images,), ("images",), encoder_outputs,
                 {**pixels, **tokens}),
        GraphDef("visual_decoder", VisualDecoderGraph(model).eval(), (image_features,), ("image_features",),
                 ("ar_logits", "refined_logits"), tokens),
        GraphDef("text_encoder", TextEncoderGraph(model).eval(), (text_ids,), ("text_ids",), ("text_features",)),
        GraphDef("cross_decoder", CrossDecoderGraph(model).eval(), (image_features, text_features, text_features),
                 ("image_features", "text_features_ar", "text_features_refined"),
                 ("ar_logits", "refined_logits"), tokens),
    ]


class CTCTowerGraph(nn.Module):
    """``images (B,3,H,W)`` -> ``ctc_log_probs (B,P,C+1)``: a PP-OCR tower and its CTC head
    alone (a fine-tuned bundle's specialist, :mod:`runtime.specialist`)."""

    def __init__(self, model: CLIP4STR) -> None:
        super().__init__()
        self.encoder = model.image_encoder

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder.ctc_log_probs(self.encoder.features(images))


@torch.no_grad()
def ctc_tower_graph(model: CLIP4STR, name: str, batch: int = TRACE_BATCH, seed: int = 0) -> GraphDef:
    """The :class:`CTCTowerGraph` of ``model`` (a PP-OCR tower with a CTC head), named ``name``."""
    model.eval()
    cfg = model.cfg
    if not cfg.ctc_rescoring or not cfg.image.keep_aspect:
        raise ValueError("a CTC tower graph needs a model with a PP-OCR tower and its CTC head")
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, cfg.image.height, cfg.image.typical_width, generator=generator)
    return GraphDef(name, CTCTowerGraph(model).eval(), (images,), ("images",), ("ctc_log_probs",),
                    {"images": {3: WIDTH_AXIS}, "ctc_log_probs": {1: TOKENS_AXIS}})


def count_layernorms(module: nn.Module) -> int:
    """LayerNorm modules in ``module`` (each call becomes one LayerNormalization node)."""
    return sum(isinstance(m, nn.LayerNorm) for m in module.modules())
