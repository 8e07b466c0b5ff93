"""training.qat: int8 fake quantization on onnxruntime's grid, stripped back to float weights,
and a few steps from the embedded default that resume and write a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from training import qat  # noqa: E402


def test_fake_int8_weights_sit_on_a_symmetric_per_channel_grid() -> None:
    weight = torch.randn(6, 4, 3, 3) * torch.tensor([0.01, 0.1, 1.0, 3.0, 0.5, 2.0]).view(6, 1, 1, 1)
    fake = qat.WeightFakeQuant()(weight)
    scale = weight.abs().amax(dim=(1, 2, 3)) / 127
    steps = fake / scale.view(6, 1, 1, 1)
    assert torch.allclose(steps, steps.round(), atol=1e-3)  # integers of each channel's own step
    assert torch.equal(steps.abs().amax(dim=(1, 2, 3)).round(), torch.full((6,), 127.0))
    assert float((fake - weight).abs().max()) <= float(scale.max()) / 2 + 1e-6
    assert not torch.equal(fake, weight)


def test_gradients_pass_through_the_fake_quantization() -> None:
    weight = torch.randn(3, 5, requires_grad=True)
    (qat.WeightFakeQuant()(weight) * torch.arange(5.0)).sum().backward()
    assert torch.allclose(weight.grad, torch.arange(5.0).expand(3, 5))


def test_activation_ranges_are_recorded_then_applied() -> None:
    hook = qat.ActivationFakeQuant()
    layer = nn.Linear(4, 2)
    layer.register_forward_pre_hook(hook)
    layer(torch.tensor([[0.5, 1.0, 2.0, 3.0]]))
    layer(torch.tensor([[-1.0, 0.0, 1.0, 1.0]]))
    hook.fix()
    assert hook.scale == pytest.approx((2.0 + 0.25) / 255)  # mean min -0.25, mean max 2.0
    x = torch.tensor([[0.1234, -0.2, 1.7, 5.0]])
    quantized = hook(layer, (x,))[0]
    assert float(quantized.max()) == pytest.approx(2.0, abs=hook.scale)  # clipped to the range
    assert float((quantized[0, :3] - x[0, :3]).abs().max()) <= hook.scale / 2 + 1e-6


def test_fake_quant_is_stripped_back_to_the_float_weights() -> None:
    tower = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    hooks, handles = qat.add_fake_quant(tower, activations=True)
    assert len(hooks) == 2 and set(qat.float_state(tower)) == set(before)
    x = torch.randn(2, 3, 8, 8)
    tower(x)
    for hook in hooks:
        hook.fix()
    assert not torch.allclose(tower(x), _plain_copy(tower, before)(x))
    qat.load_float_state(tower, before)
    qat.strip_fake_quant(tower, handles)
    assert set(tower.state_dict()) == set(before)
    assert all(torch.equal(tower.state_dict()[k], v) for k, v in before.items())
    assert torch.allclose(tower(x), _plain_copy(tower, before)(x))


def _plain_copy(tower: nn.Module, state: dict) -> nn.Module:
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    plain.load_state_dict(state)
    return plain


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_short_qat_run_resumes_and_writes_a_checkpoint(tmp_path: Path, capsys) -> None:
    pytest.importorskip("rapidocr", reason="the PP-OCR tower needs the rapidocr package (train extra)")
    from tests.test_finetune import _set
    from training.checkpoint import load_checkpoint

    train = _set(tmp_path / "train", ["coffee", "Station", "OPEN", "hello", "pizza", "EXIT"])
    val = _set(tmp_path / "val", ["coffee", "OPEN", "2026"])
    out = tmp_path / "out"
    args = [str(train), "--val", str(val), "-o", str(out), "--minutes", "0.05", "--batch", "3",
            "--eval-every", "1", "--no-progress", "--threads", "1"]
    assert qat.main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] >= 1 and set(summary["fake_int8_after"]) == {str(val)}
    assert summary["fp32"][str(val)]["changed"] == 0
    meta = json.loads((out / "checkpoint" / "model.json").read_text())["meta"]["qat"]
    assert meta["steps"] == summary["steps"] and len(meta["activation_ranges"]) > 50
    model = load_checkpoint(out / "checkpoint")  # plain float weights under the usual names
    saved = qat.load_tower_state(out / qat.STATE_FILE)
    tower = qat.Tower(model).state_dict()
    assert set(saved) == set(tower) and all(torch.equal(saved[k], tower[k]) for k in tower)
    assert qat.main(args) == 0  # the time budget is spent: resumes, trains no more
    captured = capsys.readouterr()
    assert "resuming" in captured.err and json.loads(captured.out.strip().splitlines()[-1])["steps"] == 0


def test_bad_arguments_are_one_line(capsys) -> None:
    assert qat.main(["x", "--val", "y", "-o", "z", "--minutes", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --minutes")
