"""Static INT8 (QDQ) of the image encoder: calibration, a sensitivity pass, exclusions.

``onnxruntime.quantization.quantize_static`` with per-channel int8 weights and uint8
activations whose ranges come from a :class:`CropBatches` reader: real crops
preprocessed by ``runtime.preprocess`` and batched by ``width_groups``, exactly the
tensors the runtime feeds. The calibration ranges are computed once per method and cached
(``calibration_cache_path``), so every variant of the sensitivity pass reuses them.

The sensitivity pass (:func:`sensitivity`) quantizes one layer group at a time (the rest
FP32), reads the validation sets with the whole pipeline and records the accuracy drop,
the strings that changed and the encoder's output error. :func:`choose_exclusions` then
keeps in FP32 the groups that cost the most, the fewest that bring the fully quantized
encoder within ``tolerance`` points of FP32 on every validation set. What was excluded, and
why, goes into the manifest entry of the int8 graph (``quantization``, docs/bundle.md).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from PIL import Image

from runtime.backends import WEIGHTS_7BIT

#: calibration methods measured (``auto`` picks one of them on the validation sets)
METHODS = ("minmax", "percentile", "entropy")
#: op types given QDQ pairs: the compute and the cheap ops between two convolutions (so
#: activations stay int8 from one to the next); GELU, LayerNorm, softmax and MaxPool stay
#: FP32 (docs/int8.md: MaxPool in int8 was slower, GELU has no int8 kernel)
STATIC_OPS = ("Conv", "MatMul", "Gemm", "Add", "Mul", "Relu", "HardSigmoid", "Sigmoid", "Concat", "AveragePool")
#: onnxruntime fusions left out when the graph is prepared for quantization
PREPARE_DISABLED = ("ConvActivationFusion",)
#: percentile of |activation| kept by the ``percentile`` method
PERCENTILE = 99.999
#: the quantizer's ``extra_options`` (``quantize``'s ``options`` override them)
EXTRA_OPTIONS: dict[str, Any] = {"CalibStridedMinMax": 1, "CalibPercentile": PERCENTILE, "CalibNumBins": 2048,
                                 "WeightSymmetric": True, "ActivationSymmetric": False}
#: calibration batch size (crops of one padded width per batch, as the runtime forms them)
CALIBRATION_BATCH = 16
#: most layer groups kept in FP32 by :func:`choose_exclusions`
MAX_EXCLUDED = 6

log = logging.getLogger("export")


class QuantizeError(RuntimeError):
    """A static quantization that cannot be done; the message says why."""


# -- inputs -------------------------------------------------------------------------------


def load_crops(path: str | Path, limit: int | None = None, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """RGB crops of a set (labelled or a plain folder; at most ``limit``, a seeded sample)
    and their labels ("" where the set has none)."""
    from runtime.inputs import InputError, open_input
    from runtime.preprocess import ImageError, load_image

    try:
        samples = list(open_input(path).samples)
    except (InputError, OSError) as exc:
        raise QuantizeError(f"{path}: {exc}") from None
    if limit is not None and len(samples) > limit:
        order = np.random.default_rng(seed).permutation(len(samples))[:limit]
        samples = [samples[i] for i in sorted(order.tolist())]
    images, labels = [], []
    for sample in samples:
        try:
            images.append(load_image(sample.data))
        except (ImageError, OSError):
            continue  # an unreadable crop is no calibration data
        labels.append(sample.label or "")
    if not images:
        raise QuantizeError(f"{path}: no readable images")
    return images, labels


def crop_batches(images: Sequence[Image.Image], spec: Any, batch: int = CALIBRATION_BATCH) -> list[np.ndarray]:
    """The encoder inputs of ``images``: preprocessed and grouped by padded width."""
    from runtime.preprocess import preprocess, width_groups

    groups = width_groups([im.size for im in images], spec, batch)
    return [preprocess([images[i] for i in group], spec) for group in groups]


class CropBatches:
    """``onnxruntime.quantization.CalibrationDataReader`` over preprocessed crop batches."""

    def __init__(self, batches: Sequence[np.ndarray], input_name: str = "images") -> None:
        self.batches, self.input_name = list(batches), input_name
        self._iter: Iterator[np.ndarray] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._iter = iter(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve only batches ``start_index:end_index`` (the quantizer's strided calibration
        collects one batch at a time: batches of different widths cannot be stacked)."""
        self._iter = iter(self.batches[start_index:end_index])

    def __len__(self) -> int:
        return len(self.batches)


# -- the graph ------------------------------------------------------------------------------


def unpack_half(model: onnx.ModelProto) -> int:
    """Undo ``export.precision.store_exact_half``: float16 weights read through a Cast to
    float32 become float32 weights again (the quantizer wants constant float weights).
    Returns how many were restored."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    restored: dict[str, str] = {}
    keep = []
    for node in graph.node:
        source = node.input[0] if node.op_type == "Cast" and node.input else ""
        init = inits.get(source)
        if init is not None and init.data_type == onnx.TensorProto.FLOAT16 and \
                any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in node.attribute):
            restored[node.output[0]] = source
            continue
        keep.append(node)
    if not restored:
        return 0
    for name in set(restored.values()):
        init = inits[name]
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), name))
    from export.precision import rename_inputs

    del graph.node[:]
    graph.node.extend(keep)
    rename_inputs(graph, restored)
    return len(restored)


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes static quantization gives int8 compute (:data:`STATIC_OPS`)."""
    return [n.name for n in model.graph.node if n.op_type in STATIC_OPS]


def group_of(name: str, depth: int = 4) -> str:
    """A node's layer group: the first ``depth`` parts of its scope
    (``/features/backbone/blocks4/blocks4.1/token_mixer/...`` -> ``features/backbone/blocks4/blocks4.1``)."""
    parts = [p for p in name.split("/") if p][:-1]
    return "/".join(parts[:depth]) or "other"


def layer_groups(model: onnx.ModelProto) -> dict[str, list[str]]:
    """The quantizable nodes by layer group, in graph order."""
    groups: dict[str, list[str]] = {}
    for name in quantizable_nodes(model):
        groups.setdefault(group_of(name), []).append(name)
    return groups


def prepare(src: Path, dst: Path) -> onnx.ModelProto:
    """The quantizer's input, saved at ``dst``: ``src`` with FP32 weights, shapes inferred
    and onnxruntime's hardware-independent fusions applied (level EXTENDED: GELU becomes one
    ``Gelu`` node, which the QDQ pairs around it would otherwise keep apart), except
    Conv+activation fusion (a fused conv is not quantized; QDQ fuses Relu itself)."""
    import onnxruntime as ort

    model = onnx.load(str(src))
    unpack_half(model)
    plain = dst.with_name(dst.stem + ".plain.onnx")
    onnx.save(onnx.shape_inference.infer_shapes(model), str(plain))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3
    ort.InferenceSession(str(plain), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(PREPARE_DISABLED))
    plain.unlink()
    model = onnx.shape_inference.infer_shapes(onnx.load(str(dst)))
    onnx.save(model, str(dst))
    return model


def quantize(src: Path, dst: Path, method: str, cache: Path, reader: CropBatches | None = None,
             exclude: Sequence[str] = (), only: Sequence[str] | None = None,
             options: Mapping[str, Any] | None = None) -> None:
    """Static QDQ quantization of the prepared graph ``src`` into ``dst``: int8 weights per
    channel, uint8 activations, ranges by ``method`` from ``reader`` (or from ``cache``
    when it exists); ``exclude`` nodes stay FP32; ``only`` quantizes just those nodes.
    ``options`` override the quantizer's ``extra_options`` (:data:`EXTRA_OPTIONS`), and its
    keys ``activations`` and ``weights`` (``uint8``/``int8``), ``per_channel`` and
    ``reduce_range`` (7-bit weights: no overflow in the u8 x s8 dot products of x86 CPUs
    without VNNI) the arguments; ``weights_7bit`` and ``weights_uint8`` name weight
    initializers quantized that way while the rest follow ``weights``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise QuantizeError(f"unknown calibration method {method!r} (choose from {', '.join(METHODS)})")
    if reader is None and not cache.is_file():
        raise QuantizeError("no calibration data and no calibration cache")
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
    extra: dict[str, Any] = {**EXTRA_OPTIONS, **(options or {})}
    activations = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[extra.pop("activations", "uint8")]
    per_channel = bool(extra.pop("per_channel", True))
    reduce_range = bool(extra.pop("reduce_range", False))
    weights = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[extra.pop("weights", "int8")]
    overrides = dict(extra.pop("TensorQuantOverrides", {}))
    named = {"reduce_range": extra.pop("weights_7bit", ()),  # these weights in 7 bits, the others as ``weights``
             "quant_type": extra.pop("weights_uint8", ())}  # these uint8 (the u8 x u8 kernels never saturate)
    if any(named.values()):
        axes = weight_axes(onnx.load(str(src), load_external_data=False)) if per_channel else {}
        for key, names in named.items():
            for name in names:
                entry = {**overrides.get(name, [{}])[0], key: True if key == "reduce_range" else QuantType.QUInt8}
                if name in axes:  # an override without an axis makes onnxruntime quantize the tensor per tensor
                    entry.setdefault("axis", axes[name])
                overrides[name] = [entry]
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    if reader is not None:
        reader.rewind()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice on the root logger
    try:
        quantize_static(
            str(src), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(STATIC_OPS),
            per_channel=per_channel, reduce_range=reduce_range, activation_type=activations,
            weight_type=weights, nodes_to_quantize=list(only) if only is not None else None,
            nodes_to_exclude=list(exclude), calibrate_method=calibrate, extra_options=extra,
            calibration_cache_path=str(cache),
        )
    finally:
        root.setLevel(level)


def weight_axes(model: Any) -> dict[str, int]:
    """The output-channel axis of every Conv, MatMul and Gemm weight initializer of ``model``
    (where onnxruntime's quantizer puts per-channel scales: 0 for a Conv's weight, the last
    axis for a MatMul's, by ``transB`` for a Gemm's)."""
    initializers = {i.name: len(i.dims) for i in model.graph.initializer}
    axes: dict[str, int] = {}
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in initializers:
            continue
        weight = node.input[1]
        if node.op_type == "Conv":
            axes[weight] = 0
        elif node.op_type == "MatMul":
            axes[weight] = initializers[weight] - 1
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axes[weight] = 0 if trans_b else 1
    return axes


#: integer range of each zero-point type onnxruntime's quantizer writes for activations
ZERO_POINT_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


#: the suffix onnxruntime's quantizer gives a graph output's float tensor
RENAMED_OUTPUT = "_QuantizeLinear_Input"


@dataclass(frozen=True)
class TensorGrid:
    """One quantized activation: its scale, zero point and integer range."""

    scale: float
    zero_point: int
    low: int
    high: int


def graph_grids(qdq_path: str | Path) -> dict[str, TensorGrid]:
    """The activations a QDQ graph quantizes to 8 bits (tensor name -> grid); weights and
    16-bit activations are left out."""
    graph = onnx.load(str(qdq_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    grids = {}
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or len(node.input) < 3:
            continue
        scale, zero = inits.get(node.input[1]), inits.get(node.input[2])
        if scale is None or zero is None or scale.size != 1 or zero.dtype not in ZERO_POINT_RANGES:
            continue
        low, high = ZERO_POINT_RANGES[zero.dtype]
        grids[node.input[0]] = TensorGrid(float(scale.reshape(())), int(zero.reshape(())), low, high)
    return grids


def scale_overrides(qdq_path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """``TensorQuantOverrides`` that give another graph's activations the scales and zero
    points of ``qdq_path`` (by tensor name: the same export of other weights)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, grid in graph_grids(qdq_path).items():
        dtype = np.uint8 if grid.low == 0 else np.int8
        out[name.removesuffix(RENAMED_OUTPUT)] = [{"scale": np.array(grid.scale, dtype=np.float32),
                      "zero_point": np.array(grid.zero_point, dtype=dtype)}]
    return out


# -- measuring a candidate --------------------------------------------------------------------


@dataclass
class DevSet:
    """A labelled validation set, loaded once."""

    name: str
    images: list[Image.Image]
    labels: list[str]


@dataclass
class Score:
    """A candidate encoder on the validation sets: accuracy per set, strings changed
    against FP32, relative error of the encoder's outputs."""

    accuracy: dict[str, float]
    changed: int
    feature_error: float
    texts: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def drop(self, reference: Score) -> dict[str, float]:
        """Accuracy points lost per set against ``reference`` (negative: gained)."""
        return {k: round(reference.accuracy[k] - v, 3) for k, v in self.accuracy.items()}

    def as_dict(self, reference: Score | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"accuracy": {k: round(v, 3) for k, v in self.accuracy.items()},
                               "changed_strings": self.changed, "feature_error": round(self.feature_error, 5)}
        if reference is not None:
            out["accuracy_drop"] = self.drop(reference)
        return out


class _Recording:
    """A session stand-in that keeps every output of the session it wraps."""

    def __init__(self, session: Any) -> None:
        self.session, self.outputs = session, []

    def run(self, names: Any, feeds: Any) -> Any:
        values = self.session.run(names, feeds)
        self.outputs.append(np.concatenate([v.reshape(len(v), -1) for v in values], axis=1))
        return values

    def get_providers(self) -> list[str]:
        return list(self.session.get_providers())


class Evaluator:
    """Reads the validation sets with a bundle's FP32 pipeline in which one graph (the
    image encoder) is swapped for a candidate; the encoder's outputs are recorded on the
    way, so its error against FP32 costs no second run."""

    def __init__(self, bundle_dir: Path, sets: Sequence[DevSet], threads: int | None = None,
                 batch: int = 32) -> None:
        from runtime.backends import OrtBackend
        from runtime.bundle import load_bundle
        from runtime.recognizer import Recognizer

        self.bundle = load_bundle(bundle_dir, verify=False)
        self.backend = OrtBackend(self.bundle, "fp32", threads=threads)
        self.recognizer = Recognizer(self.bundle, self.backend, views="off")  # the graph, not the views
        self.sets, self.threads, self.batch = list(sets), threads, batch
        self._reference_outputs: list[np.ndarray] = []
        self.reference = self._score(None)

    def _score(self, session: Any | None, graph: str = "image_encoder") -> Score:
        from runtime.charset import WordAccuracy

        original = self.backend.sessions[graph]
        recording = _Recording(session if session is not None else original)
        self.backend.sessions[graph] = recording
        try:
            accuracy, texts = {}, {}
            for dev in self.sets:
                results = self.recognizer.read(dev.images, batch_size=self.batch)
                texts[dev.name] = [r.text or "" for r in results]
                meter = WordAccuracy()
                meter.update(texts[dev.name], dev.labels)
                accuracy[dev.name] = meter.accuracy
        finally:
            self.backend.sessions[graph] = original
        error = 0.0
        if session is None:
            self._reference_outputs = recording.outputs
        elif graph == "image_encoder":
            ref, got = self._reference_outputs, recording.outputs
            num = sum(float(np.square(a - b).sum()) for a, b in zip(ref, got, strict=True))
            error = float(np.sqrt(num / sum(float(np.square(a).sum()) for a in ref)))
        changed = 0
        if session is not None:
            changed = sum(a != b for k in texts for a, b in zip(texts[k], self.reference.texts[k]))
        return Score(accuracy, changed, error, texts)

    def score(self, path: Path, graph: str = "image_encoder") -> Score:
        """The candidate at ``path`` in place of the FP32 ``graph`` (the image encoder)."""
        import onnxruntime as ort

        from runtime.backends import session_options

        session = ort.InferenceSession(str(path), sess_options=session_options(self.threads),
                                       providers=["CPUExecutionProvider"])
        return self._score(session, graph)

    def close(self) -> None:
        self.backend.close()


class EncoderProbe:
    """The image encoder alone on one validation set: the tower's own CTC reading (best
    path; ``runtime.decoding.ctc_greedy``) and its outputs, FP32 against a candidate. A
    few seconds per candidate where the whole pipeline takes minutes: the per-group pass
    runs on it, the exclusion steps on the pipeline (:class:`Evaluator`). ``exact``: run
    the candidate's QDQ graph unfused (float math on the int8 grids: no saturation, which x86
    CPUs without VNNI suffer, ``runtime.backends.int8_dot_saturates``; but rounded otherwise
    than any fused integer kernel, so about a tenth of near-tie readings differ either way)."""

    def __init__(self, fp32_path: Path, dev: DevSet, spec: Any, charset: str, threads: int | None = None,
                 batch: int = 32, exact: bool = False) -> None:
        from runtime.preprocess import preprocess, width_groups

        self.name, self.threads, self.charset, self.exact = dev.name, threads, charset, exact
        groups = width_groups([im.size for im in dev.images], spec, batch)
        self.inputs = [preprocess([dev.images[i] for i in g], spec) for g in groups]
        self.labels = [dev.labels[i] for g in groups for i in g]
        self.reference_outputs, self.reference_texts = self._run(fp32_path)
        self.reference_accuracy = self._accuracy(self.reference_texts)

    def _session(self, path: Path) -> Any:
        import onnxruntime as ort

        from runtime.backends import session_options

        options = session_options(self.threads)
        if self.exact:  # QDQ pairs left unfused: float math on the int8 grids, nothing saturates
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    def _run(self, path: Path) -> tuple[list[np.ndarray], list[str]]:
        from runtime.decoding import ctc_greedy

        session = self._session(path)
        names = [o.name for o in session.get_outputs()]
        ctc = names.index("ctc_log_probs") if "ctc_log_probs" in names else None
        outputs, texts = [], []
        for x in self.inputs:
            values = session.run(None, {session.get_inputs()[0].name: x})
            outputs.append(np.concatenate([v.reshape(len(x), -1) for v in values], axis=1))
            if ctc is not None:
                texts += ["".join(self.charset[i - 1] for i in ctc_greedy(row) if 0 < i <= len(self.charset))
                          for row in values[ctc]]
        return outputs, texts

    def _accuracy(self, texts: list[str]) -> float:
        from runtime.charset import WordAccuracy

        if not texts:
            return float("nan")
        meter = WordAccuracy()
        meter.update(texts, self.labels)
        return meter.accuracy

    def score(self, path: Path) -> dict[str, Any]:
        outputs, texts = self._run(path)
        num = sum(float(np.square(a - b).sum()) for a, b in zip(self.reference_outputs, outputs, strict=True))
        error = float(np.sqrt(num / sum(float(np.square(a).sum()) for a in self.reference_outputs)))
        accuracy = self._accuracy(texts)
        read = accuracy == accuracy  # NaN: the encoder has no CTC head to read with
        return {"ctc_accuracy": {self.name: round(accuracy, 3)} if read else {},
                "ctc_accuracy_drop": {self.name: round(self.reference_accuracy - accuracy, 3)} if read else {},
                "changed_strings": sum(a != b for a, b in zip(texts, self.reference_texts, strict=True)),
                "feature_error": round(error, 5)}


def within(score: Score, reference: Score, tolerance: float) -> bool:
    """Whether ``score`` reads within ``tolerance`` points of ``reference`` on every set."""
    return all(drop <= tolerance + 1e-9 for drop in score.drop(reference).values())


def cost(score: Score, reference: Score) -> tuple[float, int, float]:
    """How much a quantized group costs: total accuracy drop, then changed strings, then
    output error (the validation sets are small: ties are common)."""
    return (sum(score.drop(reference).values()), score.changed, score.feature_error)


# -- the passes --------------------------------------------------------------------------------


def sensitivity(prepared: Path, work: Path, method: str, cache: Path, groups: dict[str, list[str]],
                probe: EncoderProbe, options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Each group quantized alone (the rest FP32), scored by ``probe``: most costly first
    (CTC accuracy drop, then strings changed, then output error)."""
    rows = []
    for i, (group, nodes) in enumerate(groups.items()):
        out = work / f"group{i}.onnx"
        quantize(prepared, out, method, cache, only=nodes, options=options)
        row = {"group": group, "nodes": nodes, **probe.score(out)}
        out.unlink()
        rows.append(row)
        log.info("  %-48s ctc drop %s changed %d error %.4f", group, row["ctc_accuracy_drop"],
                 row["changed_strings"], row["feature_error"])
    rows.sort(key=group_cost, reverse=True)
    return rows


def group_cost(row: dict[str, Any]) -> tuple[float, int, float]:
    """The ranking key of a sensitivity row."""
    return (sum(row["ctc_accuracy_drop"].values()), row["changed_strings"], row["feature_error"])


def choose_exclusions(prepared: Path, work: Path, method: str, cache: Path, ranked: list[dict[str, Any]],
                      evaluator: Evaluator, tolerance: float, max_excluded: int = MAX_EXCLUDED,
                      always: Sequence[str] = (),
                      options: Mapping[str, Any] | None = None) -> tuple[int, list[dict[str, Any]]]:
    """Keep the ``k`` costliest groups in FP32 for k = 0, 1, ... until every set is within
    ``tolerance`` (the nodes ``always`` in FP32 at every step); returns ``k`` and each step's
    score (the first that holds, else the best)."""
    steps = []
    reference = evaluator.reference
    for k in range(0, min(max_excluded, len(ranked)) + 1):
        if k and ranked[k - 1]["changed_strings"] == 0:
            break  # the next group changes nothing alone: excluding it cannot help
        out = work / f"exclude{k}.onnx"
        excluded = [*always, *(n for row in ranked[:k] for n in row["nodes"])]
        quantize(prepared, out, method, cache, exclude=excluded, options=options)
        score = evaluator.score(out)
        out.unlink()
        steps.append({"excluded_groups": k, **score.as_dict(reference), "_ok": within(score, reference, tolerance),
                      "_cost": cost(score, reference)})
        log.info("  %d group(s) in FP32: drop %s changed %d", k, score.drop(reference), score.changed)
        if steps[-1]["_ok"]:
            break
    chosen = next((s for s in steps if s["_ok"]), min(steps, key=lambda s: s["_cost"]))
    for step in steps:
        step.pop("_ok"), step.pop("_cost")
    return int(chosen["excluded_groups"]), steps


def choose_method(prepared: Path, work: Path, reader: CropBatches, evaluator: Evaluator,
                  methods: Sequence[str] = METHODS,
                  options: Mapping[str, Any] | None = None) -> tuple[str, dict[str, dict[str, Any]]]:
    """Each calibration method on the whole encoder: the one that loses least."""
    scores: dict[str, Score] = {}
    for method in methods:
        out = work / f"all.{method}.onnx"
        quantize(prepared, out, method, work / f"calibration.{method}.json", reader, options=options)
        scores[method] = evaluator.score(out)
        out.unlink()
        log.info("  calibration %-10s drop %s changed %d error %.4f", method,
                 scores[method].drop(evaluator.reference), scores[method].changed, scores[method].feature_error)
    best = min(scores, key=lambda m: cost(scores[m], evaluator.reference))
    return best, {m: s.as_dict(evaluator.reference) for m, s in scores.items()}


#: ``--weights-7bit`` name of the graph's first convolution's weight, whatever it is called
#: (where 8-bit products saturate first: it sees the whole uint8 range of the image)
FIRST_CONV = "first-conv"


def named_weights(model: Any, names: Sequence[str]) -> list[str]:
    """``names`` as weight initializers of ``model`` (:data:`FIRST_CONV` resolved);
    ``QuantizeError`` for a name the graph does not have (a typo would change nothing)."""
    initializers = {i.name for i in model.graph.initializer}
    convs = [n.input[1] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in initializers]
    out = []
    for name in names:
        if name == FIRST_CONV:
            if not convs:
                raise QuantizeError(f"{FIRST_CONV}: the graph has no convolution with a weight initializer")
            name = convs[0]
        elif name not in initializers:
            raise QuantizeError(f"no weight initializer {name!r} in the graph (e.g. {convs[0] if convs else '...'}; "
                                f"or {FIRST_CONV})")
        out.append(name)
    return out


def saturation_record() -> dict[str, Any]:
    """The manifest's ``saturation`` record of an int8 graph validated on this CPU: whether
    its uint8 x int8 kernels saturate (``runtime.backends.int8_dot_saturates``). Figures
    measured where they saturate hold on any CPU (saturation only loses); figures measured
    where they do not say nothing of CPUs that saturate, so the runtime reads fp32 there."""
    from runtime.backends import int8_dot_saturates

    return {"cpu_saturates": int8_dot_saturates()}


def static_int8_encoder(bundle_dir: Path, fp32_file: str, out_file: str, calibration: str | Path,
                        dev_sets: Sequence[DevSet], method: str = "auto", limit: int = 320,
                        tolerance: float = 0.2, threads: int | None = None,
                        sensitivity_pass: bool = True, keep_fp32: Sequence[str] = (),
                        reduce_range: bool = False, weights_7bit: Sequence[str] = ()) -> dict[str, Any]:
    """Write the static INT8 image encoder of the bundle at ``bundle_dir`` (its fp32 graph
    ``fp32_file``) to ``out_file``; returns the ``quantization`` record of the manifest.
    ``keep_fp32``: layer groups (scope prefixes) kept in FP32 whatever the sensitivity pass
    says; the pass ranks the others. ``reduce_range``: 7-bit weights (``runtime.backends.WEIGHTS_7BIT``);
    ``weights_7bit``: only these weight initializers in 7 bits (the layers whose 8-bit
    products saturate on x86 CPUs without VNNI; :data:`FIRST_CONV`: the first convolution's).
    With validation sets the record says whether they were read with saturating kernels
    (:func:`saturation_record`)."""
    from runtime.bundle import load_bundle

    bundle = load_bundle(bundle_dir, verify=False)
    images, _ = load_crops(calibration, limit)
    batches = crop_batches(images, bundle.preprocessing)
    reader = CropBatches(batches, bundle.graph("fp32", "image_encoder").inputs[0].name)
    widths = sorted({int(b.shape[-1]) for b in batches})
    with tempfile.TemporaryDirectory(prefix="int8.", dir=bundle_dir) as tmp:
        work = Path(tmp)
        prepared = work / "prepared.onnx"
        model = prepare(bundle.path(fp32_file), prepared)
        weights_7bit = named_weights(model, weights_7bit)
        options: dict[str, Any] = {"reduce_range": reduce_range, "weights_7bit": weights_7bit}
        all_groups = layer_groups(model)
        kept = {g: nodes for g, nodes in all_groups.items() if any(g.startswith(p) for p in keep_fp32)}
        unknown = [p for p in keep_fp32 if not any(g.startswith(p) for g in all_groups)]
        if unknown:
            raise QuantizeError(f"--keep-fp32 {unknown[0]}: no layer group starts with it "
                                f"(groups look like {next(iter(all_groups), 'features/backbone/...')})")
        groups = {g: nodes for g, nodes in all_groups.items() if g not in kept}
        always = [n for nodes in kept.values() for n in nodes]
        record: dict[str, Any] = {
            "mode": "static", "format": "QDQ", "activations": "uint8",
            "weights": WEIGHTS_7BIT if reduce_range else "int8 per channel",
            "op_types": list(STATIC_OPS),
            "calibration": {"set": str(calibration), "crops": len(images), "batches": len(batches),
                            "widths": widths},
            "tolerance_points": tolerance,
        }
        evaluator = Evaluator(bundle_dir, dev_sets, threads) if dev_sets else None
        try:
            if evaluator is not None:
                record["validation"] = {"sets": {s.name: len(s.images) for s in dev_sets},
                                        "fp32": evaluator.reference.as_dict()}
            if method == "auto":
                if evaluator is None:
                    raise QuantizeError("--calibration-method auto needs validation sets")
                method, by_method = choose_method(prepared, work, reader, evaluator, options=options)
                record["methods"] = by_method
            cache = work / f"calibration.{method}.json"
            if not cache.is_file():
                quantize(prepared, work / "all.onnx", method, cache, reader, options=options)
            record["calibration"]["method"] = method
            excluded: list[dict[str, Any]] = []
            if evaluator is not None and sensitivity_pass:
                log.info("sensitivity pass: %d layer groups, one at a time, on %s", len(groups), dev_sets[0].name)
                probe = EncoderProbe(prepared, dev_sets[0], bundle.preprocessing, bundle.charset, threads)
                ranked = sensitivity(prepared, work, method, cache, groups, probe, options)
                k, steps = choose_exclusions(prepared, work, method, cache, ranked, evaluator, tolerance,
                                             always=always, options=options)
                excluded = ranked[:k]
                record["sensitivity"] = [{k2: v for k2, v in r.items() if k2 != "nodes"} for r in ranked]
                record["exclusion_steps"] = steps
            record["excluded"] = [{"group": g, "nodes": nodes, "reason": "--keep-fp32"} for g, nodes in kept.items()]
            record["excluded"] += [{"group": r["group"], "nodes": r["nodes"],
                                    **{k2: r[k2] for k2 in ("ctc_accuracy_drop", "changed_strings", "feature_error")
                                       if k2 in r}} for r in excluded]
            nodes = [*always, *(n for r in excluded for n in r["nodes"])]
            target = Path(bundle_dir) / out_file
            target.parent.mkdir(parents=True, exist_ok=True)
            quantize(prepared, target, method, cache, exclude=nodes, options=options)
            if weights_7bit:
                record["weights_7bit"] = weights_7bit
            if evaluator is not None:
                record["validation"]["int8"] = evaluator.score(target).as_dict(evaluator.reference)
                record["saturation"] = saturation_record()
        finally:
            if evaluator is not None:
                evaluator.close()
    record["quantized_nodes"] = len(quantizable_nodes(model)) - len(nodes)
    return record


def dev_sets_from(paths: Sequence[str | Path]) -> list[DevSet]:
    """Labelled validation sets (names made unique)."""
    out: list[DevSet] = []
    seen: set[str] = set()
    for path in paths:
        images, labels = load_crops(path)
        if not any(labels):
            raise QuantizeError(f"{path}: a validation set needs labels")
        name = Path(path).stem if Path(path).suffix == ".tsv" else Path(path).name
        while name in seen:
            name += "+"
        seen.add(name)
        out.append(DevSet(name, images, labels))
    return out
