"""training.qat_ranges: onnxruntime's int8 activation grids found in a PyTorch model by value,
hooked in as fake quantization (closer to the int8 graph than FP32 is), and carried to another
quantization of the same export (``export.static_int8.scale_overrides``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from export import static_int8 as q  # noqa: E402
from training import qat  # noqa: E402
from training import qat_ranges as r  # noqa: E402


class Small(nn.Module):
    """Convolutions, a residual add in forward (no module returns it) and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        y = y + self.conv2(y)
        return self.head(y.flatten(2).transpose(1, 2))  # (B, HW, 5): MatMul and Add in ONNX


def _quantized(tmp_path: Path) -> tuple[Small, Path, Path, list[np.ndarray]]:
    torch.manual_seed(0)
    model = Small().eval()
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(2, 3, 8, 8)).astype(np.float32) for _ in range(8)]
    prepared, qdq = tmp_path / "prepared.onnx", tmp_path / "int8.onnx"
    torch.onnx.export(model, torch.from_numpy(batches[0]), str(prepared), input_names=["images"],
                      output_names=["out"], dynamo=False)
    q.quantize(prepared, qdq, "minmax", tmp_path / "cache.json", q.CropBatches(batches))
    return model, prepared, qdq, batches


def test_grids_are_matched_and_bring_torch_to_the_int8_graph(tmp_path: Path) -> None:
    model, prepared, qdq, batches = _quantized(tmp_path)
    grids = q.graph_grids(qdq)
    assert grids and all(g.low == 0 and g.high == 255 and g.scale > 0 for g in grids.values())
    x = batches[0]
    fp32 = model(torch.from_numpy(x)).detach().numpy()
    handles, report = r.graph_fake_quant(model, qdq, prepared, x)
    assert report["matched"] >= report["quantized_tensors"] - 2  # the input, ReLU, the add, the mean ...
    assert any(p.side == "prebias" for p in report["points"].values())  # the linear layer before its bias
    _, weight_handles = qat.add_fake_quant(model, activations=False)  # int8 weights too, as training.qat does
    # the QDQ graph run unfused: its arithmetic as written, which the simulation models (fused
    # integer kernels round otherwise, and saturate on x86 CPUs without VNNI: docs/int8.md)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(qdq), options, providers=["CPUExecutionProvider"])
    int8 = session.run(None, {"images": x})[0]
    simulated = model(torch.from_numpy(x)).detach().numpy()
    assert np.abs(simulated - int8).mean() < 0.25 * np.abs(fp32 - int8).mean()
    qat.strip_fake_quant(model, [*handles, *weight_handles])
    assert np.allclose(model(torch.from_numpy(x)).detach().numpy(), fp32)  # removing the hooks restores FP32


def test_a_graph_of_other_weights_does_not_match(tmp_path: Path) -> None:
    model, prepared, qdq, batches = _quantized(tmp_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3)
    _, report = r.graph_fake_quant(model, qdq, prepared, batches[0])
    assert report["matched"] <= 1  # only the input itself


def test_scale_overrides_carry_the_grids_to_another_quantization(tmp_path: Path) -> None:
    _, prepared, qdq, batches = _quantized(tmp_path)
    other = tmp_path / "other.onnx"
    shifted = [b * 3.0 for b in batches]  # other calibration data: other ranges
    q.quantize(prepared, other, "minmax", tmp_path / "cache2.json", q.CropBatches(shifted))
    assert q.graph_grids(other) != q.graph_grids(qdq)
    fixed = tmp_path / "fixed.onnx"
    q.quantize(prepared, fixed, "minmax", tmp_path / "cache2.json", q.CropBatches(shifted),
               options={"TensorQuantOverrides": q.scale_overrides(qdq)})
    got, want = q.graph_grids(fixed), q.graph_grids(qdq)
    assert set(got) == set(want)
    for name, grid in want.items():
        assert got[name].zero_point == grid.zero_point and got[name].scale == pytest.approx(grid.scale, rel=1e-6)
