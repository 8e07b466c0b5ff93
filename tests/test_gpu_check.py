"""benchmarks.gpu_check without a GPU: every GPU part skips and says why (issue 13); the
report machinery records skips and failures instead of stopping."""

from __future__ import annotations

import pytest

from benchmarks import gpu_check


def test_run_part_records_ok_skip_and_failure() -> None:
    far = float("inf")
    assert gpu_check.run_part("a", lambda: {"x": 1}, far)["status"] == "ok"

    def skip():
        raise gpu_check.Skip("no GPU here")

    def broken():
        raise ValueError("boom")

    assert gpu_check.run_part("b", skip, far) == {"status": "skipped", "reason": "no GPU here",
                                                  "seconds": pytest.approx(0, abs=1)}
    failed = gpu_check.run_part("c", broken, far)
    assert failed["status"] == "failed" and "ValueError: boom" in failed["reason"]
    assert gpu_check.run_part("d", lambda: {}, 0.0)["reason"] == "time budget spent"


def test_gpu_parts_skip_with_a_reason_on_this_machine() -> None:
    from runtime.backends import gpu_status

    if gpu_status().compute_capability is not None:
        pytest.skip("this machine has a GPU: the parts run instead of skipping")
    for name, part in (("torch_clip4str_b16", lambda: gpu_check.torch_b16(1, float("inf"))),
                       ("trt_engines", lambda: gpu_check.trt_engines(1, float("inf"))),
                       ("ort_gpu", lambda: gpu_check.ort_gpu(1, float("inf")))):
        result = gpu_check.run_part(name, part, float("inf"))
        assert result["status"] == "skipped" and result["reason"], (name, result)


def test_data_is_inside_the_checkout() -> None:
    assert gpu_check.SAMPLES.is_relative_to(gpu_check.REPO) and len(list(gpu_check.SAMPLES.glob("*.png"))) >= 8
    labels = gpu_check._labelled_samples(gpu_check.SAMPLES)
    rows = labels.read_text().splitlines()
    assert len(rows) >= 8 and all("\t" in r for r in rows) and labels.parent.name == "samples"
