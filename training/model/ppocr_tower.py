"""PP-OCRv6's text-recognition backbone as CLIP4STR's image tower.

PaddleOCR's PP-OCRv6 small recognizer (Apache-2.0) ships inside the ``rapidocr`` wheel as
ONNX, together with PyTorch definitions of its network family. The tower is that network
up to the features before its CTC classifier, ``(B, W/8, 120)`` for a ``(B, 3, 48, W)``
input, followed by a LayerNorm and a projection to the decoder width: those tokens take
``F_i``'s place. Weights are read from the installed wheel's ONNX file (found through the
import system, never downloaded) into rapidocr's own module definitions after their
re-parameterisation (``rep()``), so the tower is an ordinary trainable ``nn.Module``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

#: the tower kinds this module builds, with the ONNX file inside ``rapidocr/models``
ONNX_FILES = {"ppocrv6-rec-small": "PP-OCRv6_rec_small.onnx"}
ARCH_NAMES = {"ppocrv6-rec-small": "PP-OCRv6_rec_small"}
#: channels of the features before the CTC classifier
FEATURE_DIM = 120
#: width downsampling of the backbone: ``W`` pixels give ``W / 8`` tokens
WIDTH_STRIDE = 8


def rapidocr_root() -> Path:
    """The installed ``rapidocr`` package directory (``pip install rapidocr==3.10.0``)."""
    spec = importlib.util.find_spec("rapidocr")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the PP-OCRv6 image tower needs the rapidocr package: pip install 'rapidocr==3.10.0'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def onnx_path(kind: str) -> Path:
    """The ONNX file of tower ``kind`` inside the installed rapidocr wheel."""
    path = rapidocr_root() / "models" / ONNX_FILES[kind]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall rapidocr==3.10.0")
    return path


#: the ONNX tensor that holds the features before the CTC classifier
FEATURE_TENSOR = "p2o.pd_op.transpose.8.0"


def feature_graph(kind: str, out: str | Path) -> Path:
    """Write the package's ONNX graph cut at the features (for onnxruntime: several times
    faster than the PyTorch module on a CPU, same numbers within 1e-4)."""
    import onnx.utils

    out = Path(out)
    onnx.utils.extract_model(str(onnx_path(kind)), str(out), ["x"], [FEATURE_TENSOR])
    return out


def _build_network(kind: str) -> nn.Module:
    """rapidocr's PyTorch ``BaseModel`` for ``kind``, re-parameterised for inference."""
    from omegaconf import OmegaConf
    from rapidocr.inference_engine.pytorch.networks.architectures.base_model import BaseModel

    arch = OmegaConf.load(rapidocr_root() / "inference_engine/pytorch/networks/arch_config.yaml")
    network = BaseModel(OmegaConf.to_container(arch[ARCH_NAMES[kind]], resolve=True))
    same = [m for m in network.modules() if isinstance(getattr(m, "conv", None), nn.Conv2d)
            and m.conv.padding == "same"]
    for module in network.modules():
        if hasattr(module, "rep"):
            module.rep()
    # rep() turns "same" padding of the stem's 2x2 convolutions into padding 0, which
    # shrinks the map; Paddle (and the ONNX file) pad one pixel at the end (SAME_UPPER)
    for module in same:
        conv = module.conv
        if conv.kernel_size != (2, 2) or conv.stride != (1, 1):
            raise ValueError(f"unexpected 'same' convolution {conv}")
        module.conv = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), conv)
    return network


def _onnx_weights(path: Path) -> list[tuple[str, np.ndarray]]:
    """The ONNX file's weight tensors in graph order (constants of shape or index kept out)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    keep = ("conv2d_", "batch_norm2d_", "linear_", "p2o.pd_op.reshape.", "helper.reshape.")
    return [(t.name, numpy_helper.to_array(t)) for t in model.graph.initializer if t.name.startswith(keep)]


def _paddle_to_torch(network: nn.Module, weights: list[tuple[str, np.ndarray]]) -> dict[str, Tensor]:
    """Pair the ONNX tensors with the torch state dict.

    The backbone's convolutions come in graph order as ``(weight, bias as (1, C, 1, 1))``;
    Paddle's linear weights are stored transposed; batch norms are ``scale, bias, mean,
    variance``. The neck's shortcut convolution (``skip_conv``) comes first in the graph
    but last in the module, so the neck is matched by Paddle's batch-norm numbering.
    """
    names = [k for k in network.state_dict() if not k.endswith("num_batches_tracked")]
    state = network.state_dict()
    neck_start = next(i for i, k in enumerate(names) if k.startswith("head.ctc_encoder"))
    onnx_neck = next(i for i, (n, _) in enumerate(weights) if n.startswith("batch_norm2d_")) - 1
    out: dict[str, Tensor] = {}
    for name, (onnx_name, array) in zip(names[:neck_start], weights[:onnx_neck], strict=True):
        out[name] = _check(name, state[name], array.reshape(state[name].shape), onnx_name)
    # neck: three conv + BN groups (ordered by BN index = module creation order), then the rest
    rest = weights[onnx_neck:]
    groups, tail = [], []
    i = 0
    while i < len(rest):
        if rest[i][0].startswith("conv2d_") and i + 1 < len(rest) and rest[i + 1][0].startswith("batch_norm2d_"):
            groups.append(rest[i : i + 5])
            i += 5
        else:
            tail.append(rest[i])
            i += 1
    groups.sort(key=lambda g: int(g[1][0].split("_")[2].split(".")[0]))
    enc = "head.ctc_encoder.encoder."
    for prefix, group in zip((f"{enc}conv_reduce.", f"{enc}local_conv.", f"{enc}skip_conv."), groups, strict=True):
        conv = f"{prefix}conv." if "local_conv" not in prefix else f"{prefix}0."
        norm = f"{prefix}norm." if "local_conv" not in prefix else f"{prefix}1."
        targets = [f"{conv}weight", f"{norm}weight", f"{norm}bias", f"{norm}running_mean", f"{norm}running_var"]
        for target, (onnx_name, array) in zip(targets, group, strict=True):
            out[target] = _check(target, state[target], array, onnx_name)
    tail_names = [k for k in names[neck_start:] if k not in out and not k.startswith("head.ctc_head")]
    for name, (onnx_name, array) in zip(tail_names, tail, strict=False):
        if array.ndim == 2:  # Paddle's Linear weight is (in, out)
            array = array.T
        out[name] = _check(name, state[name], array, onnx_name)
    missing = [k for k in names if k not in out and not k.startswith("head.ctc_head")]
    if missing:
        raise ValueError(f"PP-OCR weights: no ONNX tensor for {missing[:5]}")
    return out


def _check(name: str, reference: Tensor, array: np.ndarray, onnx_name: str) -> Tensor:
    if tuple(array.shape) != tuple(reference.shape):
        raise ValueError(f"PP-OCR weights: {onnx_name} {array.shape} does not fit {name} {tuple(reference.shape)}")
    return torch.from_numpy(np.array(array, dtype=np.float32))


def ctc_classifier(kind: str, charset: str) -> tuple[Tensor, Tensor]:
    """PP-OCR's own CTC classifier restricted to blank + ``charset``: weight ``(1+C, 120)``
    and bias ``(1+C,)``, rows in the decoders' class order (row 0: blank, in the place of
    EOS; row i: the i-th character). Its dictionary is the ONNX file's ``character``
    metadata (class k + 1 is line k; 0 is blank)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path(kind)))
    lines = next(p.value for p in model.metadata_props if p.key == "character").split("\n")
    classes = {c: i + 1 for i, c in reversed(list(enumerate(lines)))}
    missing = [c for c in charset if c not in classes]
    if missing:
        raise ValueError(f"PP-OCR's dictionary lacks {missing!r}")
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("linear_")}
    head = max((n for n in weights if n.endswith(".w_0")), key=lambda n: weights[n].shape[1])
    w, b = weights[head], weights[head.replace(".w_0", ".b_0")]  # (120, classes), (classes,)
    rows = [0, *(classes[c] for c in charset)]
    return torch.from_numpy(np.array(w[:, rows].T, dtype=np.float32)), torch.from_numpy(np.array(b[rows],
                                                                                               dtype=np.float32))


class CTCEncoding(nn.Module):
    """What PP-OCR's own CTC classifier (frozen) says about each image token, as embeddings
    added to the token: which character it shows and where that character sits in the word.

    Per token t the classifier (restricted to blank + the charset) gives ``p_t``. The
    character part is ``p_t @ E_char`` (a learnt embedding per class, blank included). A new
    character starts at t with probability ``sum_c p_t(c) (1 - p_{t-1}(c))`` over non-blank
    c, and their running sum is the (expected) index of the character the token shows (a
    blank token after character k: k + 0.5); that index, linearly interpolated between
    learnt embeddings for 0..max_chars, is the position part. The decoders' query for the
    i-th character then finds its tokens by index instead of learning to count glyphs from
    many examples, and the CLIP4STR branches refine what the classifier read with their
    visual and linguistic context.
    """

    def __init__(self, kind: str, charset: str, width: int, max_chars: int, load_weights: bool = True) -> None:
        super().__init__()
        classes = len(charset) + 1
        if load_weights:
            weight, bias = ctc_classifier(kind, charset)
        else:
            weight, bias = torch.zeros(classes, FEATURE_DIM), torch.zeros(classes)
        self.classifier = nn.Linear(FEATURE_DIM, classes)
        self.classifier.weight.data.copy_(weight)
        self.classifier.bias.data.copy_(bias)
        self.classifier.requires_grad_(False)
        self.char_embedding = nn.Parameter(torch.empty(classes, width).normal_(std=0.02))
        self.index_embedding = nn.Parameter(torch.empty(max_chars + 1, width).normal_(std=0.02))
        self.register_buffer("steps", torch.arange(max_chars + 1, dtype=torch.float32), persistent=False)

    def char_index(self, features: Tensor) -> Tensor:
        """``(B, T)``: the expected 0-based index of the character at each token; a blank
        token after character k sits half-way, at k + 0.5 (so the tokens after a word's
        last character do not look like that character's)."""
        return self._index(self.classifier(features).softmax(-1))

    @staticmethod
    def _index(probs: Tensor) -> Tensor:
        chars = probs[..., 1:]  # non-blank classes
        previous = torch.cat([torch.zeros_like(chars[:, :1]), chars[:, :-1]], dim=1)
        onset = (chars * (1.0 - previous)).sum(-1)
        return onset.cumsum(1) - 1.0 + 0.5 * probs[..., 0]

    def forward(self, features: Tensor) -> Tensor:
        probs = self.classifier(features).softmax(-1)
        index = self._index(probs).clamp(0.0, float(self.steps.shape[0] - 1))
        weights = (1.0 - (index.unsqueeze(-1) - self.steps).abs()).clamp(min=0.0)  # (B, T, K+1)
        return weights @ self.index_embedding + probs @ self.char_embedding


class MapToSequence(nn.Module):
    """``(B, C, 1, W)`` -> ``(B, W, C)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2).transpose(1, 2)


class PPOCRFeatures(nn.Module):
    """PP-OCRv6's backbone and SVTR neck: ``(B, 3, 48, W)`` -> ``(B, W/8, 120)``."""

    def __init__(self, kind: str = "ppocrv6-rec-small", load_weights: bool = True) -> None:
        super().__init__()
        if kind not in ONNX_FILES:
            raise ValueError(f"unknown PP-OCR tower {kind!r}; known: {sorted(ONNX_FILES)}")
        network = _build_network(kind)
        if load_weights:
            state = _paddle_to_torch(network, _onnx_weights(onnx_path(kind)))
            network.load_state_dict(state, strict=False)
        self.backbone = network.backbone
        self.neck = network.head.ctc_encoder
        # rapidocr's Im2Seq squeezes the height axis, which a dynamic-width ONNX export turns
        # into an If node (TensorRT-unfriendly control flow); the height is 1 here, so a
        # flatten says the same without a branch
        self.neck.encoder_reshape = MapToSequence()

    def train(self, mode: bool = True) -> PPOCRFeatures:
        """The tower always computes as at inference, also while it is fine-tuned: in
        training mode Paddle's backbone pools every image to 40 tokens whatever its width,
        and its batch norms would drift on small batches."""
        super().train(mode)
        for module in self.modules():
            module.training = False
        return self

    def forward(self, images: Tensor) -> Tensor:
        return self.neck(self.backbone(images))


class PPOCRImageEncoder(nn.Module):
    """The PP-OCR features, a LayerNorm, a projection to the decoder width and a learnt
    position embedding (the convolutional features say little about where a token is, and
    the decoders' cross-attention has no other way to know), optionally plus the
    :class:`CTCEncoding`: ``F_i``."""

    def __init__(self, kind: str, width: int, max_tokens: int, load_weights: bool = True,
                 ctc: CTCEncoding | None = None) -> None:
        super().__init__()
        self.features = PPOCRFeatures(kind, load_weights)
        self.norm = nn.LayerNorm(FEATURE_DIM)
        self.proj = nn.Linear(FEATURE_DIM, width)
        self.positional_embedding = nn.Parameter(torch.empty(1, max_tokens, width).normal_(std=0.02))
        self.ctc = ctc

    def project(self, features: Tensor) -> Tensor:
        """``F_i`` from tower features (the part trained while the tower is frozen)."""
        out = self.proj(self.norm(features)) + self.positional_embedding[:, : features.shape[1]]
        if self.ctc is not None:
            out = out + self.ctc(features)
        return out

    def ctc_log_probs(self, features: Tensor) -> Tensor:
        """``(B, T, 1+C)``: the CTC classifier's log-probabilities per token (class 0: blank)."""
        if self.ctc is None:
            raise ValueError("this image encoder has no CTC classifier (ctc_encoding is off)")
        return self.ctc.classifier(features).log_softmax(-1)

    def encode_with_ctc(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``F_i`` and the CTC log-probabilities of the same tower features."""
        features = self.features(images)
        return self.project(features), self.ctc_log_probs(features)

    def forward(self, images: Tensor) -> Tensor:
        return self.project(self.features(images))
