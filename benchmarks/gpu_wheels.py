"""The wheels the GPU check needs on a borrowed GPU machine that cannot install from a network.

That machine has Python 3.12, PyTorch (CUDA), onnx, onnxruntime (CPU), numpy, safetensors,
regex and opencv, and nothing else. ``prepare`` runs here (a package registry reachable) and
downloads the CPython 3.12 manylinux wheels of what the check lacks there, without their
dependencies (:data:`WHEELS` lists them all), into one folder that travels with the checkout;
``install`` runs there and installs from that folder, offline, only the wheels whose module
the interpreter lacks and whose tags it accepts (``pip install --no-index --no-deps --target``,
or unpacking the wheel where pip is missing). Standard library only.

    python -m benchmarks.gpu_wheels prepare DIR      # here: download (at most 60 MiB)
    python -m benchmarks.gpu_wheels install DIR      # there: into DIR/site-<python>; prints that path
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

#: (requirement, the module it provides): what the check imports that the GPU machine lacks.
#: torchvision matches that machine's PyTorch 2.11 (open_clip imports its transforms).
WHEELS: tuple[tuple[str, str], ...] = (
    ("pillow==13.0.0", "PIL"),
    ("tqdm==4.70.1", "tqdm"),
    ("ftfy==6.3.1", "ftfy"),
    ("wcwidth==0.9.4", "wcwidth"),
    ("open_clip_torch==3.3.0", "open_clip"),
    ("torchvision==0.26.0", "torchvision"),
    ("rapidocr==3.10.0", "rapidocr"),
    ("omegaconf==2.4.0", "omegaconf"),
    ("PyYAML==6.0.4", "yaml"),
    ("pyclipper==1.4.0", "pyclipper"),
    ("shapely==2.2.0", "shapely"),
    ("six==1.17.0", "six"),
    ("colorlog==6.12.0", "colorlog"),
    ("requests==2.34.2", "requests"),
    ("urllib3==2.8.0", "urllib3"),
    ("idna==3.20", "idna"),
    ("certifi==2026.10.19.post1", "certifi"),
    ("charset_normalizer==3.5.3", "charset_normalizer"),
)
#: the target interpreter of ``prepare``
PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MAX_BYTES = 60 * 1024 * 1024
INDEX = "wheels.json"


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~\[ ]", requirement, maxsplit=1)[0]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def prepare(folder: Path, python: str = PYTHON) -> dict:
    """Download :data:`WHEELS` for CPython ``python`` on x86-64 Linux into ``folder``; the index
    it writes there (``wheels.json``: file, module, bytes, sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = python.replace(".", "")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python, "--implementation", "cp", "--abi", f"cp{tag}", "--abi", "abi3",
               "--abi", "none", *[x for p in PLATFORMS for x in ("--platform", p)], "--platform", "any",
               "-d", str(folder), *[r for r, _ in WHEELS]]
    subprocess.run(command, check=True)
    rows = []
    for requirement, module in WHEELS:
        found = sorted(folder.glob(f"{_normal(_name(requirement))}-*.whl"), key=lambda p: p.name.lower())
        found += [p for p in folder.glob("*.whl") if _normal(p.name.split("-")[0]) == _normal(_name(requirement))
                  and p not in found]
        if not found:
            raise SystemExit(f"error: pip downloaded no wheel for {requirement}")
        wheel = found[0]
        rows.append({"file": wheel.name, "requirement": requirement, "module": module,
                     "bytes": wheel.stat().st_size, "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()})
    total = sum(r["bytes"] for r in rows)
    if total > MAX_BYTES:
        raise SystemExit(f"error: the wheels take {total / 2**20:.1f} MiB, over {MAX_BYTES / 2**20:.0f} MiB")
    index = {"python": python, "platforms": list(PLATFORMS), "bytes": total, "wheels": rows}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def accepts(wheel_name: str) -> bool:
    """Whether this interpreter can use the wheel (by its file name's Python and ABI tags and
    the machine's platform)."""
    parts = wheel_name[:-4].split("-")
    if len(parts) < 5:
        return False
    pythons, abis, platforms = parts[-3].split("."), parts[-2].split("."), parts[-1].split(".")
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if not any(p in (here, f"py{sys.version_info.major}", "py2.py3") or
               (p.startswith("cp3") and "abi3" in abis and int(p[3:] or 0) <= sys.version_info.minor)
               for p in pythons):
        return False
    if not any(a in (here, "abi3", "none") for a in abis):
        return False
    machine = sysconfig.get_platform().replace("-", "_").split("_")[-1]  # x86_64, aarch64, ...
    return any(p == "any" or (p.startswith(("manylinux", "linux")) and p.endswith(machine)
                              and sys.platform.startswith("linux")) for p in platforms)


def install(folder: Path, target: Path | None = None) -> dict:
    """Install into ``target`` (default ``folder/site-<python>``) each indexed wheel whose
    module this interpreter lacks and whose tags it accepts; what was done with each."""
    index = json.loads((folder / INDEX).read_text())
    target = target or folder / f"site-{sys.version_info.major}.{sys.version_info.minor}"
    target.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(target))  # what an earlier install put there counts as present
    has_pip = importlib.util.find_spec("pip") is not None
    report = {"target": str(target), "installed": [], "present": [], "unusable": []}
    for row in index["wheels"]:
        wheel = folder / row["file"]
        if importlib.util.find_spec(row["module"]) is not None:
            report["present"].append(row["module"])
        elif not accepts(wheel.name):
            report["unusable"].append(f"{wheel.name} (not for Python {sys.version_info.major}."
                                      f"{sys.version_info.minor} on this platform)")
        else:
            if has_pip:
                subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                                "--root-user-action=ignore", "--target", str(target), "--upgrade", str(wheel)],
                               check=True)
            else:
                with zipfile.ZipFile(wheel) as archive:
                    archive.extractall(target)
            report["installed"].append(row["module"])
    importlib.invalidate_caches()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_wheels",
                                     description="Wheels for the GPU check on a machine without a network.")
    parser.add_argument("action", choices=("prepare", "install"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--python", default=PYTHON, help=f"prepare: the target Python (default: {PYTHON})")
    args = parser.parse_args(argv)
    if args.action == "prepare":
        index = prepare(args.folder, args.python)
        print(f"gpu_wheels: {len(index['wheels'])} wheels, {index['bytes'] / 2**20:.1f} MiB in {args.folder}",
              file=sys.stderr)
        return 0
    if not (args.folder / INDEX).is_file():
        print(f"error: {args.folder / INDEX} is missing: run 'bash benchmarks/gpu_check.sh --prepare "
              f"{args.folder}' where a package registry is reachable", file=sys.stderr)
        return 2
    report = install(args.folder)
    print(f"gpu_wheels: installed {', '.join(report['installed']) or 'nothing'}; present "
          f"{len(report['present'])}; unusable here {len(report['unusable'])}", file=sys.stderr)
    print(report["target"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
