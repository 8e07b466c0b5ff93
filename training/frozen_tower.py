"""Train CLIP4STR's decoders on a frozen pretrained image tower, from cached tower features.

With the image tower frozen (the PP-OCR tower of ``image_tower: ppocrv6-rec-small``), the
tower's output for a training image never changes, so it is computed once and cached;
the rest of CLIP4STR (projection, visual decoder, text encoder, cross-modal decoder)
trains on the cache with the same permuted-sequence loss as :mod:`training.train`, at a
small fraction of the cost of running the tower every step.

    python -m training.frozen_tower cache --config clipllama-ppocr -o CACHE \\
        --real DIR... [--val-fraction 0.05] [--aug-copies 2] [--synth-shards 40]
    python -m training.frozen_tower train --config clipllama-ppocr --cache CACHE -o RUN \\
        [--minutes 30]

``cache`` writes shards (``CACHE/<name>.npz``: float16 tokens, lengths, labels); an
existing shard is kept, so an interrupted run resumes where it stopped. Images go through
:func:`runtime.preprocess.preprocess` and the tower in batches of equal padded width
(:func:`runtime.preprocess.width_groups`, as ``Recognizer.read`` forms them: each image
padded exactly as the runtime pads it alone). ``train`` writes a normal
checkpoint (``RUN/best``, chosen on the validation shard) and resumes from
``RUN/train_state.pt``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Subset

from runtime.charset import WordAccuracy
from runtime.decoding import softmax
from runtime.preprocess import preprocess, width_groups
from training.checkpoint import save_checkpoint
from training.config import ModelConfig, model_config
from training.model.clip4str import CLIP4STR
from training.model.ppocr_tower import feature_graph

VAL_SHARD = "val"
COVER_PREFIX = "cover"  # shards of synthetic words with covered characters


# -- the cache --------------------------------------------------------------------------
class TowerFeatures:
    """The frozen tower over PIL images: ``(T_i, C)`` float16 features each, in order.

    Runs the package's ONNX graph cut at the features with onnxruntime (the PyTorch tower
    gives the same features within 1e-4, tests/test_ppocr_tower.py, at several times the
    cost on a CPU)."""

    def __init__(self, cfg: ModelConfig, workdir: Path, batch_size: int = 64) -> None:
        import onnxruntime as ort

        graph = feature_graph(cfg.image_tower, workdir / "tower.onnx")
        self.session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        self.spec = cfg.image
        self.batch_size = batch_size

    def tower(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"x": images.numpy()})[0])

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(images)
        for chunk in width_groups([image.size for image in images], self.spec, self.batch_size):
            batch = preprocess([images[i] for i in chunk], self.spec)  # padded as each alone
            for i, f in zip(chunk, self.tower(torch.from_numpy(batch)).numpy().astype(np.float16)):
                out[i] = f
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def padding_token(self) -> np.ndarray:
        """The tower's feature for a padded (all-zero) region: batches are filled with it."""
        zeros = torch.zeros(1, 3, self.spec.height, self.spec.width)
        features = self.tower(zeros)[0]
        return features[features.shape[0] // 2].numpy().astype(np.float32)


def write_shard(path: Path, features: list[np.ndarray], labels: list[str]) -> None:
    lengths = np.array([len(f) for f in features], dtype=np.int32)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, tokens=np.concatenate(features), lengths=lengths, labels=np.array(labels))
    tmp.rename(path)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def cache_dataset(tower: TowerFeatures, dataset, path: Path, augment=None, seed: int = 0) -> None:
    """Cache every ``(image, label)`` of ``dataset`` (optionally augmented) into ``path``."""
    if path.exists():
        print(f"{path.name}: kept", flush=True)
        return
    torch.manual_seed(seed)
    start, features, labels = time.time(), [], []
    for chunk in _chunks(range(len(dataset)), 256):
        items = [dataset[i] for i in chunk]
        images = [augment(image) if augment else image for image, _ in items]
        features += tower(images)
        labels += [label for _, label in items]
    write_shard(path, features, labels)
    print(f"{path.name}: {len(labels)} words in {time.time() - start:.0f} s", flush=True)


def build_cache(args: argparse.Namespace) -> None:
    from training.data.readers import ConcatSets, open_set
    from training.data.synth import SynthWords
    from training.data.transforms import augmentation

    cfg = model_config(args.config)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tower = TowerFeatures(cfg, out)
    np.save(out / "padding.npy", tower.padding_token())
    if args.real:
        real = ConcatSets([open_set(p, cfg.charset_train, cfg.max_label_length, train=True) for p in args.real])
        order = np.random.default_rng(args.seed).permutation(len(real))
        n_val = int(round(len(real) * args.val_fraction))
        val_keys = set(order[:n_val].tolist())
        # the validation split: real scene-text crops only (never the born-digital set)
        val = Subset(real, [i for i in order[:n_val] if "borndigital" not in _set_name(real, i)])
        train_index = [i for i in range(len(real)) if i not in val_keys]
        cache_dataset(tower, val, out / f"{VAL_SHARD}.npz")
        cache_dataset(tower, Subset(real, train_index), out / "real.npz")
        for k in range(args.aug_copies):
            cache_dataset(tower, Subset(real, train_index), out / f"real-aug{k}.npz", augmentation(),
                          seed=args.seed + k)
    else:  # synthetic words only: validate on words of another seed
        val = SynthWords(args.synth_shard_size, args.seed + 999, cfg.charset_train, cfg.max_label_length,
                         difficulty=args.synth_difficulty)
        cache_dataset(tower, val, out / f"{VAL_SHARD}.npz")
    for k in range(args.synth_shards):
        synth = SynthWords(args.synth_shard_size, args.seed + 1000 + k, cfg.charset_train, cfg.max_label_length,
                           difficulty=args.synth_difficulty)
        cache_dataset(tower, synth, out / f"synth{k:03d}.npz")
    for k in range(args.cover_shards):  # synthetic words with inner characters covered
        synth = SynthWords(args.synth_shard_size, args.seed + 2000 + k, cfg.charset_train, cfg.max_label_length,
                           difficulty=args.synth_difficulty, cover_counts=tuple(args.cover_counts))
        cache_dataset(tower, synth, out / f"{COVER_PREFIX}{k:03d}.npz")
    for path in args.extra_val:  # more validation sets (e.g. occluded crops), reported beside the split
        dataset = open_set(path, cfg.charset_train, cfg.max_label_length)
        cache_dataset(tower, dataset, out / f"{VAL_SHARD}-{Path(path).name}.npz")
    (out / "cache.json").write_text(json.dumps({"config": args.config, "real": args.real, "seed": args.seed,
                                                "val_fraction": args.val_fraction, "val_words": len(val)}))


def _set_name(sets, index: int) -> str:
    import bisect

    d = bisect.bisect_right(sets.cumulative_sizes, index)
    return str(getattr(sets.datasets[d], "name", ""))



# -- training on the cache --------------------------------------------------------------
class FeatureSet:
    """Cached shards in memory: ragged float16 tokens with their labels."""

    def __init__(self, paths: list[Path]) -> None:
        tokens, lengths, labels = [], [], []
        for path in paths:
            with np.load(path) as shard:
                tokens.append(shard["tokens"])
                lengths.append(shard["lengths"])
                labels += shard["labels"].tolist()
        self.shard_sizes = [len(n) for n in lengths]
        self.tokens = np.concatenate(tokens)
        self.lengths = np.concatenate(lengths)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: np.ndarray, padding: np.ndarray) -> tuple[torch.Tensor, list[str]]:
        """Features ``(B, T, C)`` (T: the longest; shorter rows filled with ``padding``)."""
        longest = int(self.lengths[index].max())
        out = np.broadcast_to(padding, (len(index), longest, padding.shape[-1])).copy()
        for row, i in enumerate(index):
            start, n = self.offsets[i], self.lengths[i]
            out[row, :n] = self.tokens[start : start + n]
        return torch.from_numpy(out), [self.labels[i] for i in index]


@torch.inference_mode()
def evaluate(model: CLIP4STR, data: FeatureSet, padding: np.ndarray, batch_size: int = 256,
             fill_gaps: bool = False) -> dict:
    """Word accuracy (evaluation protocol) of the final and the visual prediction, each
    word read without padding (batches of equal length), as the runtime reads one crop
    (``fill_gaps``: CTC gaps filled with the decoders' characters, ``correction.joint.fill_gaps``)."""
    model.eval()
    final, visual = WordAccuracy(), WordAccuracy()
    for length in np.unique(data.lengths):
        group = np.flatnonzero(data.lengths == length)
        for start in range(0, len(group), batch_size):
            features, labels = data.batch(group[start : start + batch_size], padding)
            features = features.float()
            out = model.decode(model.image_encoder.project(features))
            if model.cfg.ctc_rescoring:
                out["ctc_log_probs"] = model.image_encoder.ctc_log_probs(features)
            final.update([p.text for p in model.predictions(out, fill_gaps=fill_gaps)], labels)
            visual.update([p.text for p in model.codec.decode(softmax(out["visual_ar"].numpy()))], labels)
    model.train()
    return {"accuracy": final.accuracy, "visual_accuracy": visual.accuracy, "one_minus_ned": final.one_minus_ned}


def sample_batch(lengths: np.ndarray, order: np.ndarray, size: int, rng: np.random.Generator,
                 weights: np.ndarray | None = None) -> np.ndarray:
    """Half the batches are random (padded to their longest word, as a runtime batch of
    mixed crops is; drawn with ``weights`` when given), half are words of about the same
    length (``order`` sorts by length), as a crop read alone is, with no padding: the
    decoders must find the end of a word from the word itself, not from the padding after it."""
    if rng.random() < 0.5:
        return rng.choice(len(lengths), size, p=weights) if weights is not None else rng.integers(0, len(lengths), size)
    start = int(rng.integers(0, max(1, len(order) - size)))
    return order[start : start + size]


def share_weights(shards: list[Path], sizes: list[int], shares: dict[str, float | None]) -> np.ndarray | None:
    """Sampling weights per word: the shards whose names start with a prefix of ``shares``
    get that share of the random batches together (``None``: no share set); the other
    shards share the rest. ``None`` when no share is set (draw every word alike)."""
    shares = {prefix: share for prefix, share in shares.items() if share is not None}
    if not shares:
        return None
    if sum(shares.values()) > 1:
        raise ValueError(f"shares {shares} add up to more than 1")
    groups = np.concatenate([np.full(n, next((k for k in shares if p.stem.startswith(k)), ""))
                             for p, n in zip(shards, sizes)])
    weights = np.zeros(len(groups))
    rest = 1.0 - sum(shares.values())
    for group in np.unique(groups):
        members = groups == group
        weights[members] = (shares[group] if group else rest) / members.sum()
    return weights / weights.sum()


def ctc_loss(logits: torch.Tensor, lengths: torch.Tensor, labels: list[str], model: CLIP4STR) -> torch.Tensor:
    """CTC over the image tokens (class 0, the decoders' EOS, is the blank); a word with
    more characters than its image has tokens contributes nothing."""
    targets = [torch.tensor(model.codec.encode([label])[0, 1 : len(label) + 1], dtype=torch.long)
               for label in labels]
    log_probs = logits.log_softmax(-1).transpose(0, 1)  # (T, B, C)
    return torch.nn.functional.ctc_loss(log_probs, torch.cat(targets), lengths,
                                        torch.tensor([len(t) for t in targets]), blank=0,
                                        reduction="mean", zero_infinity=True)


def train(args: argparse.Namespace) -> None:
    cache, run = Path(args.cache), Path(args.output)
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = model_config(args.config)
    model = CLIP4STR(cfg)
    model.image_encoder.features.requires_grad_(False)
    shards = sorted(p for p in cache.glob("*.npz")
                    if not p.stem.startswith(VAL_SHARD) and not p.name.endswith(".tmp.npz"))
    if not args.cover_share:  # the recipe's stages 1-3: no covered words
        shards = [p for p in shards if not p.stem.startswith(COVER_PREFIX)]
    data, val = FeatureSet(shards), FeatureSet([cache / f"{VAL_SHARD}.npz"])
    extra_val = {p.stem[len(VAL_SHARD) + 1:]: FeatureSet([p]) for p in sorted(cache.glob(f"{VAL_SHARD}-*.npz"))}
    weights = share_weights(shards, data.shard_sizes, {"real": args.real_share, COVER_PREFIX: args.cover_share})
    if args.init:
        from safetensors.torch import load_file

        model.load_state_dict({k: v.float() for k, v in load_file(str(Path(args.init) / "model.safetensors")).items()})
        print(f"weights from {args.init}", flush=True)
    padding = np.load(cache / "padding.npy").astype(np.float16)
    print(f"train {len(data)} words from {len(shards)} shards, validation {len(val)}", flush=True)
    by_length = np.argsort(data.lengths, kind="stable")
    # an auxiliary CTC head on F_i (training only, not part of the checkpoint): it makes each
    # image token say which character it shows, which the decoders' cross-attention then
    # finds sooner; the features were trained for a CTC head, so this costs almost nothing
    aux = torch.nn.Linear(cfg.embed_dim, model.codec.num_classes) if args.ctc_weight > 0 else None
    params = [p for p in model.parameters() if p.requires_grad] + (list(aux.parameters()) if aux else [])
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    state_path, step, best, elapsed = run / "train_state.pt", 0, -1.0, 0.0
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        if aux is not None and state.get("aux"):
            aux.load_state_dict(state["aux"])
        optimizer.load_state_dict(state["optimizer"])
        step, best, elapsed = state["step"], state["best"], state["elapsed"]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min, best {best:.4f})", flush=True)
    budget = args.minutes * 60
    log = (run / "log.csv").open("a")
    model.train()
    started = time.time() - elapsed
    while True:
        elapsed = time.time() - started
        progress = min(1.0, elapsed / budget)
        warm = min(1.0, step / max(1, args.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
        index = sample_batch(data.lengths, by_length, args.batch_size, rng, weights)
        features, labels = data.batch(index, padding)
        image_features = model.image_encoder.project(features.float())
        loss, stats = model.loss_from_features(image_features, labels, rng, args.num_perms)
        if aux is not None:
            ctc = ctc_loss(aux(image_features), torch.from_numpy(data.lengths[index]).long(), labels, model)
            loss = loss + args.ctc_weight * ctc
            stats["ctc_loss"] = ctc.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        step += 1
        done = elapsed >= budget or (args.max_steps is not None and step >= args.max_steps)
        if step % args.val_every == 0 or done:
            result = evaluate(model, val, padding, fill_gaps=args.fill_gaps)
            for name, extra in extra_val.items():
                result[f"{name}_accuracy"] = evaluate(model, extra, padding, fill_gaps=args.fill_gaps)["accuracy"]
            # the selection score: the split's accuracy, plus the extra sets' at --extra-val-weight
            result["score"] = result["accuracy"] + args.extra_val_weight * sum(
                result[f"{name}_accuracy"] for name in extra_val)
            line = {"step": step, "minutes": round(elapsed / 60, 2), **stats, **result}
            print(json.dumps(line), flush=True)
            log.write(json.dumps(line) + "\n")
            log.flush()
            if result["score"] > best:
                best = result["score"]
                save_checkpoint(model, run / "best", meta={"step": step, "val": result, "recipe": vars(args)})
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "best": best, "elapsed": elapsed, "aux": aux.state_dict() if aux else None}, state_path)
        if done:
            break
    save_checkpoint(model, run / "last", meta={"step": step, "recipe": vars(args)})
    print(f"done: {step} steps, best validation score {best:.4f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.frozen_tower", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cache", help="cache the frozen tower's features of training data")
    c.add_argument("--config", required=True)
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--real", nargs="+", default=[], help="labelled training sets (folders, .tsv, LMDB)")
    c.add_argument("--val-fraction", type=float, default=0.05)
    c.add_argument("--aug-copies", type=int, default=2, help="augmented copies of the real crops")
    c.add_argument("--synth-shards", type=int, default=20)
    c.add_argument("--synth-shard-size", type=int, default=5000)
    c.add_argument("--synth-difficulty", type=float, default=1.0)
    c.add_argument("--cover-shards", type=int, default=0,
                   help="shards of synthetic words with inner characters covered (named cover*)")
    c.add_argument("--cover-counts", type=int, nargs="+", default=[1, 2], help="characters covered per word")
    c.add_argument("--extra-val", nargs="+", default=[],
                   help="more validation sets (cached as val-<name>), reported beside the split")
    c.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train", help="train the decoders on cached features")
    t.add_argument("--config", required=True)
    t.add_argument("--cache", required=True)
    t.add_argument("-o", "--output", required=True)
    t.add_argument("--minutes", type=float, default=30)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--warmup-steps", type=int, default=300)
    t.add_argument("--grad-clip", type=float, default=5.0)
    t.add_argument("--num-perms", type=int, default=6)
    t.add_argument("--ctc-weight", type=float, default=0.0, help="auxiliary CTC loss on F_i (0: off)")
    t.add_argument("--val-every", type=int, default=500)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--init", help="start from this checkpoint's weights (a new schedule)")
    t.add_argument("--fill-gaps", action="store_true",
                   help="validate with CTC gaps filled by the decoders' characters (the bundle's "
                        "correction.joint.fill_gaps)")
    t.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps (the schedule still follows --minutes)")
    t.add_argument("--real-share", type=float, default=None,
                   help="share of real crops (shards real*) in the random batches (default: as cached)")
    t.add_argument("--cover-share", type=float, default=None,
                   help="share of covered synthetic words (shards cover*) in the random batches "
                        "(default: none are used)")
    t.add_argument("--extra-val-weight", type=float, default=0.0,
                   help="checkpoints are chosen on the split's accuracy plus this times each extra "
                        "validation set's (cache --extra-val)")
    args = parser.parse_args(argv)
    build_cache(args) if args.command == "cache" else train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
