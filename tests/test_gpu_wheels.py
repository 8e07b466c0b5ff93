"""benchmarks.gpu_wheels: which wheels an interpreter accepts, and the offline install of only
what it lacks (pip, or unpacking where pip is missing)."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_wheels

HERE = f"cp{sys.version_info.major}{sys.version_info.minor}"


def test_accepts_by_tags() -> None:
    assert gpu_wheels.accepts("six-1.17.0-py2.py3-none-any.whl")
    assert gpu_wheels.accepts(f"x-1.0-{HERE}-{HERE}-manylinux_2_28_x86_64.whl") == sys.platform.startswith("linux")
    assert not gpu_wheels.accepts("x-1.0-cp39-cp39-manylinux_2_28_x86_64.whl")
    assert not gpu_wheels.accepts(f"x-1.0-{HERE}-{HERE}-win_amd64.whl")
    assert not gpu_wheels.accepts("broken.whl")


def _wheel(folder: Path, name: str, python: str = "py3", abi: str = "none", platform: str = "any") -> Path:
    """A minimal wheel holding module ``name`` (``VALUE = 42``)."""
    files = {f"{name}/__init__.py": b"VALUE = 42\n",
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                          f"Tag: {python}-{abi}-{platform}\n".encode()}
    record = "".join(f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for path, data in files.items()) + f"{name}-1.0.dist-info/RECORD,,\n"
    path = folder / f"{name}-1.0-{python}-{abi}-{platform}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
        archive.writestr(f"{name}-1.0.dist-info/RECORD", record)
    return path


@pytest.mark.parametrize("with_pip", [True, False])
def test_install_only_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_pip: bool) -> None:
    folder = tmp_path / "wheels"
    folder.mkdir()
    rows = [{"file": _wheel(folder, "clipllama_probe_mod").name, "module": "clipllama_probe_mod"},
            {"file": _wheel(folder, "json_again").name, "module": "json"},  # present: skipped
            {"file": _wheel(folder, "other_abi", "cp39", "cp39", "manylinux_2_28_x86_64").name, "module": "other_abi"}]
    (folder / gpu_wheels.INDEX).write_text(json.dumps({"wheels": rows}))
    if not with_pip:
        real = gpu_wheels.importlib.util.find_spec
        monkeypatch.setattr(gpu_wheels.importlib.util, "find_spec", lambda n: None if n == "pip" else real(n))
    monkeypatch.setattr(sys, "path", list(sys.path))
    report = gpu_wheels.install(folder, tmp_path / "site")
    assert report["installed"] == ["clipllama_probe_mod"] and report["present"] == ["json"]
    assert len(report["unusable"]) == 1 and "other_abi" in report["unusable"][0]
    done = subprocess.run([sys.executable, "-c", "import clipllama_probe_mod as m; print(m.VALUE)"],
                          env={"PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True)
    assert done.stdout.strip() == "42", done.stderr
    again = gpu_wheels.install(folder, tmp_path / "site")  # a second run finds it there
    assert again["installed"] == [] and "clipllama_probe_mod" in again["present"]


def test_install_without_an_index_says_how_to_prepare(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert gpu_wheels.main(["install", str(tmp_path)]) == 2
    assert "gpu_check.sh --prepare" in capsys.readouterr().err


def test_every_check_module_is_listed() -> None:
    """What the check imports beyond the GPU machine's packages has a wheel in the list."""
    modules = {m for _, m in gpu_wheels.WHEELS}
    assert {"PIL", "ftfy", "tqdm", "open_clip", "torchvision", "rapidocr", "omegaconf", "yaml"} <= modules
