"""Model and training configuration: JSON files that fully rebuild a model.

A checkpoint carries its :class:`ModelConfig` as JSON next to the safetensors weights;
nothing else is needed to rebuild the network, its charset and its preprocessing.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from runtime.charset import resolve_charset
from runtime.correction.settings import DEFAULT_THRESHOLD
from runtime.preprocess import Preprocessing

CONFIG_DIR = Path(__file__).parent / "configs"
IMAGE_TOWERS = ("clip-vit", "ppocrv6-rec-small")


@dataclass
class DecoderConfig:
    """The PARSeq-style two-stream decoder (used twice: visual and cross-modal)."""

    depth: int = 1
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1


@dataclass
class ModelConfig:
    """Everything that defines a CLIP4STR network and how it reads its input."""

    name: str
    #: open_clip ``CLIP`` arguments: ``embed_dim``, ``vision_cfg``, ``text_cfg``
    clip: dict[str, Any]
    #: open_clip's registered model name, used to fetch a pretrained tag (None: custom)
    open_clip_name: str | None = None
    #: the image tower: "clip-vit" (the paper's: ``clip.vision_cfg``) or a pretrained
    #: text-recognition backbone shipped in a PyPI package, "ppocrv6-rec-small"
    #: (PP-OCRv6's, from the rapidocr wheel; ``clip.vision_cfg`` is then unused)
    image_tower: str = "clip-vit"
    #: PP-OCR tower only: add what PP-OCR's own (frozen) CTC classifier says about each image
    #: token, its character and that character's index in the word
    #: (``training.model.ppocr_tower.CTCEncoding``)
    ctc_encoding: bool = False
    #: needs ``ctc_encoding``: the final word is the decoders' or the CTC classifier's best
    #: path, whichever scores higher under both (``runtime.decoding.ctc_rescored``)
    ctc_rescoring: bool = False
    #: QuickGELU in every tower (the OpenAI/CLIP4STR checkpoints) or plain GELU
    quick_gelu: bool = True
    image: Preprocessing = field(default_factory=lambda: Preprocessing(224, 224))
    charset_train: str = "94"
    charset_test: str = "36"
    max_label_length: int = 25
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    text_context_length: int = 16
    #: text blocks (from the bottom) frozen with the token and positional embeddings;
    #: None freezes the lower half
    text_frozen_layers: int | None = None
    refine_iters: int = 1
    #: paper eq. 8: a single cross-modal pass with the visual prediction as context
    fast_decode: bool = False
    #: each branch's first prediction: left-to-right, one step per character (True), or
    #: PARSeq's non-autoregressive pass, every position at once from its position query
    #: with only BOS as context (False); the refinement passes follow either way
    autoregressive: bool = True
    #: the confidence gate's default threshold, carried into the bundle
    threshold: float = DEFAULT_THRESHOLD

    @property
    def embed_dim(self) -> int:
        return int(self.clip["embed_dim"])

    @property
    def num_steps(self) -> int:
        """Decode steps: the longest label plus EOS."""
        return self.max_label_length + 1

    @property
    def frozen_text_layers(self) -> int:
        layers = int(self.clip["text_cfg"]["layers"])
        return layers // 2 if self.text_frozen_layers is None else self.text_frozen_layers

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["image"] = self.image.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = copy.deepcopy(data)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        if "image" in data:
            data["image"] = Preprocessing.from_dict(data["image"])
        if "decoder" in data:
            data["decoder"] = DecoderConfig(**data["decoder"])
        config = cls(**data)
        if config.image_tower not in IMAGE_TOWERS:
            raise ValueError(f"unknown image_tower {config.image_tower!r}; known: {', '.join(IMAGE_TOWERS)}")
        if config.ctc_rescoring and not config.ctc_encoding:
            raise ValueError("ctc_rescoring needs ctc_encoding (the tower's CTC classifier)")
        resolve_charset(config.charset_train)
        resolve_charset(config.charset_test)
        return config


@dataclass
class TrainConfig:
    """Optimisation and data settings of ``python -m training.train``."""

    train_data: list[str] = field(default_factory=list)
    val_data: list[str] = field(default_factory=list)
    #: synthetic words generated on the fly (0: none); mixed with ``train_data``
    synthetic_train: int = 0
    synthetic_val: int = 0
    #: the generator's difficulty for both (0: flat text on plain backgrounds, 1: every effect)
    synthetic_difficulty: float = 1.0
    batch_size: int = 64
    #: base learning rate for a batch of 512 (CLIP4STR: 8.4e-5); scaled by batch/512
    lr: float = 8.4e-5
    #: decoder learning rate multiplier (CLIP4STR: 19x the CLIP towers' rate)
    decoder_lr_scale: float = 19.0
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_fraction: float = 0.075
    max_steps: int = 1000
    max_minutes: float | None = None
    grad_clip: float = 20.0
    num_perms: int = 6
    augment: bool = True
    val_every: int = 200
    num_workers: int = 2
    seed: int = 0
    precision: str = "auto"  # auto: bf16/fp16 autocast on GPU, fp32 on CPU
    log: str = "csv"  # csv or tensorboard
    output_dir: str = "runs/default"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown train config keys: {sorted(unknown)}")
        data = dict(data)
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)


def config_path(name_or_path: str) -> Path:
    """A config file given by path or by name in ``training/configs``."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return path
    named = CONFIG_DIR / f"{name_or_path}.json"
    if named.is_file():
        return named
    available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
    raise FileNotFoundError(f"no config {name_or_path!r}; available: {available}")


def load_config(name_or_path: str) -> tuple[ModelConfig, TrainConfig]:
    """Read a config file with ``model`` and (optionally) ``train`` sections."""
    data = json.loads(config_path(name_or_path).read_text())
    return ModelConfig.from_dict(data["model"]), TrainConfig.from_dict(data.get("train", {}))


def model_config(name_or_path: str) -> ModelConfig:
    """The model section of a named or given config."""
    return load_config(name_or_path)[0]
