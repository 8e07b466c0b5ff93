"""Importing the CLIP4STR authors' released weights (training/import_clip4str.py).

The released layout below is a table of names and shapes written from the public source of
github.com/VamosC/CLIP4STR -- ``strhub/clip/model.py`` (OpenAI CLIP: ``VisionTransformer``,
``Transformer``/``ResidualAttentionBlock``, ``CLIP``), ``strhub/models/vl_str/system.py``
(``VL4STR``: ``clip_model``, ``visual_decoder``, ``cross_decoder``) and
``strhub/models/vl_str/modules.py`` (PARSeq's ``DecoderLayer``/``Decoder``/``TokenEmbedding``)
-- not from the importer. The reference forwards (``ref_*``) re-implement those modules'
definitions with plain torch ops, so the mapped weights are checked numerically.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from shared_data import data_path
from torch.nn import functional as F

from runtime.charset import CHARSET_94
from runtime.preprocess import preprocess
from training.checkpoint import load_checkpoint, read_config
from training.import_clip4str import (
    EVAL_MEAN,
    RELEASE_CHARSET,
    TRAIN_MEAN,
    ReleaseError,
    import_clip4str,
    load_release,
    main,
    resolve,
)
from training.model.clip4str import CLIP4STR
from training.model.decoder import causal_mask, cloze_mask, padding_bias

torch.set_num_threads(1)
DATA = data_path("eval", "misc_real", "images")

# -- the released layout ---------------------------------------------------------------


def released_layout(vision_width: int, vision_layers: int, patch: tuple[int, int], image: tuple[int, int],
                    text_width: int, text_layers: int, embed: int, vocab: int = 49408, context: int = 77,
                    charset_size: int = 94, max_label_length: int = 25, dec_layers: int = 1,
                    dec_mlp_ratio: int = 4) -> dict[str, tuple[int, ...]]:
    """Names and shapes of ``VL4STR.state_dict()`` (see the module docstring)."""
    table: dict[str, tuple[int, ...]] = {}

    def norm(prefix: str, width: int) -> None:
        table[f"{prefix}.weight"] = table[f"{prefix}.bias"] = (width,)

    def attention(prefix: str, width: int) -> None:  # nn.MultiheadAttention
        table[f"{prefix}.in_proj_weight"], table[f"{prefix}.in_proj_bias"] = (3 * width, width), (3 * width,)
        table[f"{prefix}.out_proj.weight"], table[f"{prefix}.out_proj.bias"] = (width, width), (width,)

    def blocks(prefix: str, width: int, layers: int) -> None:  # ResidualAttentionBlock
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}"
            attention(f"{p}.attn", width)
            norm(f"{p}.ln_1", width)
            table[f"{p}.mlp.c_fc.weight"], table[f"{p}.mlp.c_fc.bias"] = (4 * width, width), (4 * width,)
            table[f"{p}.mlp.c_proj.weight"], table[f"{p}.mlp.c_proj.bias"] = (width, 4 * width), (width,)
            norm(f"{p}.ln_2", width)

    # CLIP.__init__: visual, transformer, token_embedding, positional_embedding, ln_final,
    # text_projection, logit_scale (the attention mask is a plain attribute, not a buffer)
    table["clip_model.positional_embedding"] = (context, text_width)
    table["clip_model.text_projection"] = (text_width, embed)
    table["clip_model.logit_scale"] = ()
    v = "clip_model.visual"
    grid = (image[0] // patch[0]) * (image[1] // patch[1])
    table[f"{v}.class_embedding"] = (vision_width,)
    table[f"{v}.positional_embedding"] = (grid + 1, vision_width)
    table[f"{v}.proj"] = (vision_width, embed)
    table[f"{v}.conv1.weight"] = (vision_width, 3, *patch)  # bias=False
    norm(f"{v}.ln_pre", vision_width)
    blocks(f"{v}.transformer", vision_width, vision_layers)
    norm(f"{v}.ln_post", vision_width)
    blocks("clip_model.transformer", text_width, text_layers)
    table["clip_model.token_embedding.weight"] = (vocab, text_width)
    norm("clip_model.ln_final", text_width)
    # Decoder(DecoderLayer(D, heads, D * mlp_ratio), ...), D = text_projection width;
    # PARSeq tokenizer: [E] + charset + [B] + [P]; the head predicts all but [B] and [P]
    for dec in ("visual_decoder", "cross_decoder"):
        for i in range(dec_layers):
            p = f"{dec}.layers.{i}"
            attention(f"{p}.self_attn", embed)
            attention(f"{p}.cross_attn", embed)
            hidden = embed * dec_mlp_ratio
            table[f"{p}.linear1.weight"], table[f"{p}.linear1.bias"] = (hidden, embed), (hidden,)
            table[f"{p}.linear2.weight"], table[f"{p}.linear2.bias"] = (embed, hidden), (embed,)
            for n in ("norm1", "norm2", "norm_q", "norm_c"):
                norm(f"{p}.{n}", embed)
        table[f"{dec}.text_embed.embedding.weight"] = (charset_size + 3, embed)
        table[f"{dec}.pos_queries"] = (1, max_label_length + 1, embed)
        norm(f"{dec}.norm", embed)
        table[f"{dec}.head.weight"], table[f"{dec}.head.bias"] = (charset_size + 1, embed), (charset_size + 1,)
    return table


B16 = {"vision_width": 768, "vision_layers": 12, "patch": (16, 16), "image": (224, 224),
       "text_width": 512, "text_layers": 12, "embed": 512}
L14 = {"vision_width": 1024, "vision_layers": 24, "patch": (14, 14), "image": (224, 224),
       "text_width": 768, "text_layers": 12, "embed": 768}
#: A small model of the same structure, 64-wide heads like the released towers.
TINY = {"vision_width": 128, "vision_layers": 2, "patch": (4, 8), "image": (32, 128),
        "text_width": 64, "text_layers": 2, "embed": 64}


def tiny_config(tmp_path: Path) -> str:
    """A config file for :data:`TINY` (OpenAI head widths: 2 vision heads, 1 text head)."""
    config = {"model": {
        "name": "clip4str-tiny-openai", "open_clip_name": None, "quick_gelu": True,
        "clip": {"embed_dim": 64,
                 "vision_cfg": {"image_size": [32, 128], "layers": 2, "width": 128, "patch_size": [4, 8]},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}},
        "image": {"height": 32, "width": 128, "mean": [0.5] * 3, "std": [0.5] * 3},
        "decoder": {"depth": 1, "heads": 2, "mlp_ratio": 4.0, "dropout": 0.1},
    }}
    path = tmp_path / "tiny-openai.json"
    path.write_text(json.dumps(config))
    return str(path)


def random_state(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of ``layout``: norms near 1, everything else small."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in layout.items():
        t = torch.randn(shape, generator=gen)
        is_norm = name.endswith(".weight") and any(k in name for k in ("ln_", "norm"))
        state[name] = 1.0 + 0.1 * t if is_norm else 0.02 * t
    state["clip_model.logit_scale"] = torch.tensor(math.log(100.0))
    return state


def write_release(path: Path, state: dict[str, torch.Tensor], hparams: dict | None = None,
                  extra: dict | None = None) -> Path:
    """A file in the released form: Lightning-style when ``hparams`` is given, else flat."""
    obj: dict = state if hparams is None else {"state_dict": state, "hyper_parameters": hparams,
                                                "pytorch-lightning_version": "1.7.7", "epoch": 15}
    obj = {**obj, **(extra or {})}
    torch.save(obj, path)
    return path


def images(n: int = 3) -> list[Image.Image]:
    """A few word crops: real ones from the shared data when present, else drawn."""
    if DATA.is_dir():
        files = sorted(DATA.iterdir())[:n]
        return [Image.open(f).convert("RGB") for f in files]
    out = []
    for word in ("hello", "CLIP", "2024")[:n]:
        image = Image.new("RGB", (128, 32), "white")
        ImageDraw.Draw(image).text((8, 8), word, fill="black")
        out.append(image)
    return out


# -- facts from the public source ---------------------------------------------------------


def test_release_charset_is_clip4str_94_full_in_our_order() -> None:
    # configs/charset/94_full.yaml of CLIP4STR (= PARSeq's), character by character
    yaml_94_full = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    assert RELEASE_CHARSET == yaml_94_full == CHARSET_94
    assert len(RELEASE_CHARSET) == 94


def test_b16_layout_matches_the_authors_parameter_log() -> None:
    # scripts/vl4str_base.sh logs Lightning's summary for ViT-B/16: 158 M total,
    # visual 86.2 M, text transformer 37.8 M, token embedding 25.3 M, each decoder 4.3 M,
    # text_embed 49.7 K, head 48.7 K
    table = released_layout(**B16)

    def count(prefix: str) -> float:
        return sum(math.prod(s) for n, s in table.items() if n.startswith(prefix))

    assert round(count("") / 1e6) == 158
    assert round(count("clip_model.visual.") / 1e5) / 10 == 86.2
    assert round(count("clip_model.transformer.") / 1e5) / 10 == 37.8
    assert round(count("clip_model.token_embedding.") / 1e5) / 10 == 25.3
    assert round(count("visual_decoder.") / 1e5) / 10 == 4.3
    assert round(count("cross_decoder.text_embed.") / 1e2) / 10 == 49.7
    assert round(count("cross_decoder.head.") / 1e2) / 10 == 48.7
    # huggingface.co/mzhaoshuai/CLIP4STR lists clip4str_base_*.pt at 633 MB and
    # clip4str_large_*.pt at 1.79 GB: float32 weights of exactly these layouts
    assert round(4 * count("") / 1e6) == 633
    assert round(4 * sum(math.prod(s) for s in released_layout(**L14).values()) / 1e7) / 100 == 1.79


# -- the full B/16 import -----------------------------------------------------------------


@pytest.fixture(scope="module")
def b16_import(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A random B/16 file in the released (Lightning) layout and its import."""
    root = tmp_path_factory.mktemp("b16")
    state = random_state(released_layout(**B16))
    hparams = {"charset_train": RELEASE_CHARSET, "charset_test": string.digits + string.ascii_lowercase,
               "max_label_length": 25, "img_size": [224, 224], "patch_size": [16, 16], "embed_dim": 512,
               "dec_num_heads": 8, "dec_mlp_ratio": 4, "dec_depth": 1, "refine_iters": 1, "context_length": 16,
               "decode_ar": True, "clip_pretrained": "/x/ViT-B-16.pt"}
    src = write_release(root / "clip4str_base16x16_d70bde1f2d.ckpt", state, hparams)
    assert main([str(src), "-o", str(root / "ckpt")]) == 0
    return src, root / "ckpt", state


def test_b16_release_imports_every_tensor(b16_import: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    _, ckpt, state = b16_import
    cfg, meta = read_config(ckpt)
    assert cfg.name == "clip4str-b16" and cfg.quick_gelu and cfg.charset_train == "94"
    assert (cfg.image.height, cfg.image.width, cfg.image.interpolation) == (224, 224, "bicubic")
    assert cfg.image.mean == EVAL_MEAN == cfg.image.std
    assert meta["normalization"]["train"]["mean"] == list(TRAIN_MEAN)
    assert meta["ignored"] == {"clip_model.logit_scale": meta["ignored"]["clip_model.logit_scale"]}
    assert meta["sliced"] == {"clip_model.positional_embedding": "77 -> 16 rows"}
    assert meta["imported_from"]["release"]["train_data"] == "Real(3.3M)"
    model = load_checkpoint(ckpt)
    ours = model.state_dict()
    assert len(ours) == len(state) - 1  # everything but logit_scale
    v, t = "image_encoder.visual.", "text_encoder."
    pairs = {
        f"{v}conv1.weight": "clip_model.visual.conv1.weight",
        f"{v}transformer.resblocks.11.mlp.c_proj.bias": "clip_model.visual.transformer.resblocks.11.mlp.c_proj.bias",
        f"{t}transformer.resblocks.5.attn.in_proj_weight": "clip_model.transformer.resblocks.5.attn.in_proj_weight",
        f"{t}text_projection": "clip_model.text_projection",
        "visual_decoder.embedding.weight": "visual_decoder.text_embed.embedding.weight",
        "cross_decoder.layers.0.mlp.0.weight": "cross_decoder.layers.0.linear1.weight",
        "cross_decoder.layers.0.mlp.3.bias": "cross_decoder.layers.0.linear2.bias",
        "cross_decoder.layers.0.norm_cross.weight": "cross_decoder.layers.0.norm1.weight",
        "visual_decoder.layers.0.norm_mlp.bias": "visual_decoder.layers.0.norm2.bias",
        "visual_decoder.layers.0.norm_query.weight": "visual_decoder.layers.0.norm_q.weight",
        "visual_decoder.layers.0.norm_content.bias": "visual_decoder.layers.0.norm_c.bias",
        "cross_decoder.head.weight": "cross_decoder.head.weight",
    }
    for ours_name, theirs in pairs.items():
        assert torch.equal(ours[ours_name], state[theirs]), ours_name
    assert torch.equal(ours[f"{t}positional_embedding"], state["clip_model.positional_embedding"][:16])
    # every value of the file arrived somewhere: the sums match tensor for tensor
    theirs_sums = sorted(float(x.double().sum()) for k, x in state.items() if k != "clip_model.logit_scale"
                         and k != "clip_model.positional_embedding")
    ours_sums = sorted(float(x.double().sum()) for k, x in ours.items() if k != f"{t}positional_embedding")
    assert np.allclose(theirs_sums, ours_sums, rtol=0, atol=1e-6)


def test_imported_b16_reads_images(b16_import: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    model = load_checkpoint(b16_import[1])
    batch = torch.from_numpy(preprocess(images(2), model.cfg.image))
    predictions = model.read(batch)
    assert len(predictions) == 2
    for p in predictions:
        assert len(p.text) <= model.cfg.num_steps and all(c in CHARSET_94 for c in p.text)
        assert len(p.char_probs) == len(p.text) and all(0.0 <= q <= 1.0 for q in p.char_probs)


def test_existing_checkpoint_is_not_overwritten(b16_import: tuple[Path, Path, dict[str, torch.Tensor]],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    src, ckpt, _ = b16_import
    before = (ckpt / "model.safetensors").stat().st_mtime_ns
    assert main([str(src), "-o", str(ckpt)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_imported_b16_exports_a_bundle(b16_import: tuple[Path, Path, dict[str, torch.Tensor]],
                                       tmp_path: Path) -> None:
    try:
        from export.onnx import export_bundle
    except ImportError as exc:
        pytest.skip(f"export.onnx.export_bundle is not available yet ({exc})")
    bundle = Path(export_bundle(b16_import[1], tmp_path / "bundle", precisions=("fp32",)))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["preprocessing"]["mean"] == list(EVAL_MEAN)
    assert manifest["charset"] == CHARSET_94


# -- L/14: the plan on shapes only -----------------------------------------------------------


def test_l14_layout_plans_without_allocating() -> None:
    shapes = released_layout(**L14)
    cfg, plan, notes = resolve(shapes, {})  # detected, no --arch
    assert cfg.name == "clip4str-l14" and cfg.decoder.heads == 8 and cfg.max_label_length == 25
    assert len(plan.steps) == len(shapes) - 1 == 497
    assert {s.source for s in plan.steps} | set(plan.ignored) == set(shapes)
    assert plan.sliced(shapes) == {"clip_model.positional_embedding": "77 -> 16 rows"}
    assert "94_full" in notes["charset"]


def test_wrong_arch_names_the_tensor() -> None:
    with pytest.raises(ReleaseError, match=r"clip_model\.visual\.conv1\.weight has shape \(768, 3, 16, 16\)"):
        resolve(released_layout(**B16), {}, arch="clip4str-l14")


# -- errors name the tensor ---------------------------------------------------------------------


def test_missing_misshaped_and_unknown_tensors_are_named(tmp_path: Path) -> None:
    arch = tiny_config(tmp_path)
    shapes = released_layout(**TINY)
    resolve(shapes, {}, arch=arch)  # the intact layout fits
    broken = dict(shapes)
    del broken["cross_decoder.layers.0.norm_c.bias"]
    broken["clip_model.transformer.resblocks.1.mlp.c_fc.weight"] = (256, 32)
    broken["clip_model.visual.attnpool.k_proj.weight"] = (128, 128)
    with pytest.raises(ReleaseError) as err:
        resolve(broken, {}, arch=arch)
    message = str(err.value)
    assert "missing cross_decoder.layers.0.norm_c.bias" in message
    assert "clip_model.transformer.resblocks.1.mlp.c_fc.weight has shape (256, 32)" in message
    assert "unexpected clip_model.visual.attnpool.k_proj.weight" in message
    short = dict(shapes, **{"clip_model.positional_embedding": (8, 64)})
    with pytest.raises(ReleaseError, match=r"clip_model\.positional_embedding has shape \(8, 64\)"):
        resolve(short, {}, arch=arch)


def test_dry_run_checks_without_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_release(tmp_path / "tiny.pt", random_state(released_layout(**TINY)))
    out = tmp_path / "out"
    assert main([str(src), "-o", str(out), "--arch", tiny_config(tmp_path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "fits clip4str-tiny-openai" in text and "clip_model.logit_scale" in text and not out.exists()
    assert main([str(src), "-o", str(out), "--arch", "clip4str-b16", "--dry-run"]) == 2
    assert "clip_model.visual.conv1.weight has shape (128, 3, 4, 8)" in capsys.readouterr().err
    assert main([str(src), "-o", str(out), "--arch", "no-such-config"]) == 2
    assert "no config 'no-such-config'" in capsys.readouterr().err


def test_charset_of_other_size_is_refused(tmp_path: Path) -> None:
    shapes = released_layout(**TINY, charset_size=36)
    with pytest.raises(ReleaseError, match=r"visual_decoder\.head\.weight has 37 rows"):
        resolve(shapes, {}, arch=tiny_config(tmp_path))
    cfg, _, notes = resolve(shapes, {}, arch=tiny_config(tmp_path), charset=string.digits + string.ascii_lowercase)
    assert cfg.charset_train == string.digits + string.ascii_lowercase and notes["charset"] == "--charset"


# -- numerics: the mapped weights compute what the released modules compute -------------------


def ref_attention(p: dict[str, torch.Tensor], prefix: str, q_in: torch.Tensor, kv_in: torch.Tensor, heads: int,
                  mask: torch.Tensor | None = None, pad: torch.Tensor | None = None) -> torch.Tensor:
    """nn.MultiheadAttention's math: packed q/k/v projections, scaled dot product, out_proj."""
    w, b = p[f"{prefix}.in_proj_weight"], p[f"{prefix}.in_proj_bias"]
    d = w.shape[1]
    q, k, v = (x @ w[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d] for i, x in enumerate((q_in, kv_in, kv_in)))
    batch, lq, lk, hd = q.shape[0], q.shape[1], k.shape[1], d // heads
    q, k, v = (x.reshape(batch, -1, heads, hd).transpose(1, 2) for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if mask is not None:
        scores = scores + mask
    if pad is not None:
        scores = scores.masked_fill(pad[:, None, None, :lk], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, lq, d)
    return out @ p[f"{prefix}.out_proj.weight"].T + p[f"{prefix}.out_proj.bias"]


def ref_norm(p: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], p[f"{prefix}.weight"], p[f"{prefix}.bias"], 1e-5)


def ref_stream(p: dict[str, torch.Tensor], x: torch.Tensor, x_norm: torch.Tensor, kv: torch.Tensor,
               memory: torch.Tensor, mask: torch.Tensor | None, pad: torch.Tensor | None, heads: int) -> torch.Tensor:
    """PARSeq ``DecoderLayer.forward_stream``: pre-LN self-attn, cross-attn (norm1), MLP (norm2, GELU)."""
    x = x + ref_attention(p, "self_attn", x_norm, kv, heads, mask, pad)
    x = x + ref_attention(p, "cross_attn", ref_norm(p, "norm1", x), memory, heads)
    hidden = F.gelu(ref_norm(p, "norm2", x) @ p["linear1.weight"].T + p["linear1.bias"])
    return x + hidden @ p["linear2.weight"].T + p["linear2.bias"]


def ref_layer(p: dict[str, torch.Tensor], query: torch.Tensor, content: torch.Tensor, memory: torch.Tensor,
              query_mask: torch.Tensor | None, content_mask: torch.Tensor | None, pad: torch.Tensor | None,
              update_content: bool, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PARSeq ``DecoderLayer.forward``: both streams read the norm_c'd content."""
    content_norm = ref_norm(p, "norm_c", content)
    new_query = ref_stream(p, query, ref_norm(p, "norm_q", query), content_norm, memory, query_mask, pad, heads)
    if update_content:
        content = ref_stream(p, content, content_norm, content_norm, memory, content_mask, pad, heads)
    return new_query, content


def ref_decoder(state: dict[str, torch.Tensor], name: str, tokens: torch.Tensor, memory: torch.Tensor, heads: int,
                query: torch.Tensor | None, query_mask: torch.Tensor | None, content_mask: torch.Tensor | None,
                pad: torch.Tensor | None) -> torch.Tensor:
    """CLIP4STR ``Decoder.forward`` (logits): sqrt(D)-scaled text_embed, pos_queries, layers, norm, head."""
    p = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
    width = p["pos_queries"].shape[-1]
    embed = p["text_embed.embedding.weight"][tokens] * math.sqrt(width)
    length = tokens.shape[1]
    content = torch.cat([embed[:, :1], p["pos_queries"][:, : length - 1] + embed[:, 1:]], dim=1)
    query = p["pos_queries"][:, :length].expand(len(tokens), -1, -1) if query is None else query
    depth = len({k.split(".")[1] for k in p if k.startswith("layers.")})
    for i in range(depth):
        layer = {k[len(f"layers.{i}."):]: v for k, v in p.items() if k.startswith(f"layers.{i}.")}
        query, content = ref_layer(layer, query, content, memory, query_mask, content_mask, pad, i < depth - 1, heads)
    return ref_norm(p, "norm", query) @ p["head.weight"].T + p["head.bias"]


def ref_blocks(state: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, heads: int,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """OpenAI ``Transformer``: ResidualAttentionBlocks with QuickGELU (x * sigmoid(1.702 x))."""
    i = 0
    while f"{prefix}.resblocks.{i}.ln_1.weight" in state:
        p = {k[len(f"{prefix}.resblocks.{i}."):]: v for k, v in state.items()
             if k.startswith(f"{prefix}.resblocks.{i}.")}
        x = x + ref_attention(p, "attn", ref_norm(p, "ln_1", x), ref_norm(p, "ln_1", x), heads, mask)
        hidden = ref_norm(p, "ln_2", x) @ p["mlp.c_fc.weight"].T + p["mlp.c_fc.bias"]
        hidden = hidden * torch.sigmoid(1.702 * hidden)
        x = x + hidden @ p["mlp.c_proj.weight"].T + p["mlp.c_proj.bias"]
        i += 1
    return x


def ref_image(state: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """CLIP4STR ``VisionTransformer.forward(cls=False, projection=True)``: all tokens."""
    v = {k[len("clip_model.visual."):]: t for k, t in state.items() if k.startswith("clip_model.visual.")}
    conv = v["conv1.weight"]
    x = F.conv2d(images, conv, stride=conv.shape[-2:]).flatten(2).transpose(1, 2)
    x = torch.cat([v["class_embedding"].expand(len(x), 1, -1), x], dim=1) + v["positional_embedding"]
    x = ref_blocks(state, "clip_model.visual.transformer", ref_norm(v, "ln_pre", x), conv.shape[0] // 64)
    return ref_norm(v, "ln_post", x) @ v["proj"]


def ref_text(state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """CLIP4STR ``CLIP.encode_text(eot=False)``: positions [:L], causal mask cut to L, all tokens."""
    length = ids.shape[1]
    x = state["clip_model.token_embedding.weight"][ids] + state["clip_model.positional_embedding"][:length]
    width = x.shape[-1]
    x = ref_blocks(state, "clip_model.transformer", x, width // 64, causal_mask(length))
    final = {k[len("clip_model.ln_final."):]: t for k, t in state.items() if k.startswith("clip_model.ln_final.")}
    x = F.layer_norm(x, (width,), final["weight"], final["bias"])
    return x @ state["clip_model.text_projection"]


@pytest.fixture(scope="module")
def tiny_import(tmp_path_factory: pytest.TempPathFactory) -> tuple[CLIP4STR, dict[str, torch.Tensor]]:
    """A random TINY file with 2 decoder layers (so the content stream is updated), imported."""
    root = tmp_path_factory.mktemp("tiny")
    state = random_state(released_layout(**TINY, dec_layers=2), seed=1)
    src = write_release(root / "tiny.pt", state)  # flat state dict, like a stripped .pt
    ckpt = import_clip4str(src, root / "ckpt", arch=tiny_config(root), log=lambda *_: None)
    return load_checkpoint(ckpt), state


def test_decoder_layer_conversion_matches_the_released_layer(tiny_import: tuple[CLIP4STR, dict]) -> None:
    model, state = tiny_import
    layer = model.visual_decoder.layers[0]
    p = {k[len("visual_decoder.layers.0."):]: v for k, v in state.items() if k.startswith("visual_decoder.layers.0.")}
    gen = torch.Generator().manual_seed(3)
    query, content = torch.randn(2, 6, 64, generator=gen), torch.randn(2, 6, 64, generator=gen)
    memory = torch.randn(2, 17, 64, generator=gen)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    for qmask, cmask in ((causal_mask(6), causal_mask(6)), (cloze_mask(6), causal_mask(6))):
        for update in (True, False):
            with torch.no_grad():
                q, c = layer(query, content, memory, qmask, cmask, padding_bias(pad), update)
            rq, rc = ref_layer(p, query, content, memory, qmask, cmask, pad, update, heads=2)
            torch.testing.assert_close(q, rq, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(c, rc, atol=2e-5, rtol=1e-4)


def test_decoders_match_the_released_decoder(tiny_import: tuple[CLIP4STR, dict]) -> None:
    model, state = tiny_import
    gen = torch.Generator().manual_seed(4)
    memory = torch.randn(2, 1 + 128 + 16, 64, generator=gen)
    tokens = torch.tensor([[95, 3, 7, 0, 96, 96], [95, 40, 12, 9, 1, 0]])
    pad = (tokens == 0).int().cumsum(-1) > 0
    steps = tokens.shape[1]
    for name in ("visual_decoder", "cross_decoder"):
        decoder = getattr(model, name)
        with torch.no_grad():
            ours = decoder(tokens, memory, query_mask=cloze_mask(steps), content_mask=causal_mask(steps),
                           padding_mask=padding_bias(pad))
        ref = ref_decoder(state, name, tokens, memory, 2, None, cloze_mask(steps), causal_mask(steps), pad)
        assert ours.shape == (2, steps, 95)
        torch.testing.assert_close(ours, ref, atol=5e-5, rtol=1e-4)


def test_towers_match_the_released_clip_with_quick_gelu(tiny_import: tuple[CLIP4STR, dict]) -> None:
    model, state = tiny_import
    gen = torch.Generator().manual_seed(5)
    image = torch.randn(2, 3, 32, 128, generator=gen)
    ids = torch.randint(1, 49407, (2, 16), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(image), ref_image(state, image), atol=5e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode_text(ids), ref_text(state, ids), atol=5e-5, rtol=1e-4)
    assert model.cfg.quick_gelu


# -- charset order and safe loading ------------------------------------------------------------


def test_charset_order_follows_the_file(tmp_path: Path) -> None:
    order = CHARSET_94[::-1]
    state = random_state(released_layout(**TINY), seed=2)
    for dec in ("visual_decoder", "cross_decoder"):  # the head always says class 5
        state[f"{dec}.head.weight"].zero_()
        state[f"{dec}.head.bias"].zero_()
        state[f"{dec}.head.bias"][5] = 10.0
    src = write_release(tmp_path / "permuted.ckpt", state, {"charset_train": order})
    model = load_checkpoint(import_clip4str(src, tmp_path / "ckpt", arch=tiny_config(tmp_path), log=lambda *_: None))
    assert model.cfg.charset_train == order
    prediction = model.read(torch.zeros(1, 3, 32, 128))[0]
    assert prediction.text == order[4] * model.cfg.num_steps  # class 5 = the file's 5th character


def _boom(path: str) -> None:
    Path(path).write_text("the file's code ran")


class _Evil:
    """Unpickling this calls :func:`_boom` -- what a hostile file would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (_boom, (self.marker,))


class _Scheduler:
    """Like a PyTorch 1.x OneCycleLR: its state holds a bound method."""

    def anneal(self) -> None:
        pass


def test_training_state_globals_are_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    state = random_state(released_layout(**TINY), seed=6)
    extra = {"lr_schedulers": [{"anneal_func": _Scheduler().anneal}], "callbacks": {"x": _Evil(str(marker))}}
    src = write_release(tmp_path / "with_state.ckpt", state, {"charset_train": RELEASE_CHARSET}, extra)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(src, weights_only=True)
    with pytest.raises(ReleaseError, match="weights_only"):
        load_release(src, stub_globals=False)
    release = load_release(src)
    assert not marker.exists()
    assert any(name.endswith("_boom") for name in release.stubbed)
    assert release.hparams == {"charset_train": RELEASE_CHARSET}
    assert set(release.state) == set(state)
    logs: list[str] = []
    ckpt = import_clip4str(src, tmp_path / "ckpt", arch=tiny_config(tmp_path), log=logs.append)
    assert not marker.exists()
    assert read_config(ckpt)[1]["stubbed_globals"] == release.stubbed
    assert any("inert placeholders" in line for line in logs)
    blocked = write_release(tmp_path / "blocked.ckpt", state, {}, {"x": _Blocked()})
    with pytest.raises(ReleaseError, match="even with"):  # torch blocks os/sys globals outright
        load_release(blocked)


class _Blocked:
    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


def test_unreadable_files_give_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    assert main([str(junk), "-o", str(tmp_path / "out")]) == 2
    assert "junk.ckpt" in capsys.readouterr().err
    assert main([str(tmp_path / "absent.pt"), "-o", str(tmp_path / "out")]) == 2
    assert "no such file" in capsys.readouterr().err
    torch.save({"model": [1, 2, 3]}, tmp_path / "list.pt")
    with pytest.raises(ReleaseError, match="no state dict of tensors"):
        load_release(tmp_path / "list.pt")
    assert not (tmp_path / "out").exists()
