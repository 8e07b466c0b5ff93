"""Bundle checks: the runtime refuses a bundle that breaks docs/bundle.md, naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAKE_CHARSET, write_manifest

from runtime.bundle import GRAPH_NAMES, BundleError, inside, load_bundle, sha256_file


def _edit(root: Path, change) -> None:
    """Apply ``change`` to the manifest and rewrite it (file hashes recomputed)."""
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    files = list(manifest["files"])
    write_manifest(root, manifest, [f for f in files if (root / f).is_file()])


def test_good_bundle_loads(fake_bundle: Path) -> None:
    bundle = load_bundle(fake_bundle)
    assert bundle.charset == FAKE_CHARSET
    assert bundle.precisions == ["fp32"]
    assert bundle.threshold == 0.8
    assert bundle.decode.num_steps == 26 and bundle.decode.topk == 3
    assert bundle.preprocessing.height == 8
    assert set(bundle.graphs["fp32"]) == set(GRAPH_NAMES)
    assert bundle.graph("fp32", "text_encoder").inputs[0].dtype == "int64"
    assert bundle.tokenizer_path.is_file()
    assert load_bundle(fake_bundle / "manifest.json").root == fake_bundle


def test_missing_directory_and_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such bundle"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        load_bundle(tmp_path)


def test_missing_file_is_named(fake_bundle: Path) -> None:
    (fake_bundle / "fp32" / "text_encoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"missing file fp32/text_encoder\.onnx"):
        load_bundle(fake_bundle)


def test_wrong_sha256_is_named(fake_bundle: Path) -> None:
    with open(fake_bundle / "fp32" / "cross_decoder.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(BundleError, match=r"fp32/cross_decoder\.onnx has sha256 .* manifest says"):
        load_bundle(fake_bundle)
    load_bundle(fake_bundle, verify=False)  # the hash check is what refused it


@pytest.mark.parametrize("version", [0, 3, "1", None])
def test_unknown_schema_version(fake_bundle: Path, version) -> None:
    _edit(fake_bundle, lambda m: m.update(schema_version=version))
    with pytest.raises(BundleError, match="unknown schema version"):
        load_bundle(fake_bundle)


@pytest.mark.parametrize("key", ["charset", "graphs", "files", "tokenizer", "decode", "threshold"])
def test_missing_manifest_key(fake_bundle: Path, key: str) -> None:
    manifest = json.loads((fake_bundle / "manifest.json").read_text())
    del manifest[key]
    (fake_bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"lacks key.*{key}"):
        load_bundle(fake_bundle)


def test_missing_nested_keys(fake_bundle: Path) -> None:
    _edit(fake_bundle, lambda m: m["decode"].pop("bos_id"))
    with pytest.raises(BundleError, match="decode.*bos_id"):
        load_bundle(fake_bundle)


def test_missing_graph(fake_bundle: Path) -> None:
    _edit(fake_bundle, lambda m: m["graphs"]["fp32"].pop("visual_decoder"))
    with pytest.raises(BundleError, match="no precision has all four graphs"):
        load_bundle(fake_bundle)


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.onnx", "fp32/../../outside.onnx", "C:/x.onnx"])
def test_paths_leading_outside_are_refused(fake_bundle: Path, bad: str) -> None:
    (fake_bundle.parent / "outside.onnx").write_bytes(b"stand-in")

    def point_outside(m: dict) -> None:
        m["graphs"]["fp32"]["image_encoder"]["file"] = bad
        m["files"][bad] = "0" * 64

    manifest = json.loads((fake_bundle / "manifest.json").read_text())
    point_outside(manifest)
    (fake_bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the bundle|absolute path"):
        load_bundle(fake_bundle)


def test_symlink_leading_outside_is_refused(fake_bundle: Path) -> None:
    outside = fake_bundle.parent / "secret.onnx"
    outside.write_bytes(b"stand-in for image_encoder")
    target = fake_bundle / "fp32" / "image_encoder.onnx"
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(fake_bundle)


def test_file_used_but_not_listed(fake_bundle: Path) -> None:
    manifest = json.loads((fake_bundle / "manifest.json").read_text())
    del manifest["files"]["fp32/image_encoder.onnx"]
    (fake_bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="image_encoder.onnx is used by the manifest but not listed"):
        load_bundle(fake_bundle)


def test_decode_ids_must_match_charset(fake_bundle: Path) -> None:
    _edit(fake_bundle, lambda m: m["decode"].update(bos_id=5))
    with pytest.raises(BundleError, match="decode ids"):
        load_bundle(fake_bundle)


def test_engine_entries_are_checked(fake_bundle: Path) -> None:
    _edit(fake_bundle, lambda m: m.update(engines=[{"graph": "image_encoder", "precision": "fp16"}]))
    with pytest.raises(BundleError, match=r"engines\[0\] lacks key"):
        load_bundle(fake_bundle)


def test_inside_helper(tmp_path: Path) -> None:
    assert inside(tmp_path, "a/b.onnx") == tmp_path / "a" / "b.onnx"
    for bad in ("", "/abs", "../x", "a/../../x"):
        with pytest.raises(BundleError):
            inside(tmp_path, bad)


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_default_bundle(monkeypatch: pytest.MonkeyPatch, fake_bundle: Path, tmp_path: Path) -> None:
    from runtime import bundle as module

    monkeypatch.setattr(module, "DEFAULT_BUNDLE", tmp_path / "absent")
    with pytest.raises(BundleError, match="no default bundle is installed"):
        load_bundle(None)
    monkeypatch.setattr(module, "DEFAULT_BUNDLE", fake_bundle)
    assert load_bundle(None).root == fake_bundle
