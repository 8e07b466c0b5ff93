"""Put a fine-tuned tower into a bundle as its specialist (:mod:`runtime.specialist`).

``training.finetune`` calls :func:`add_specialist` when its validation and keep sets say the
trained tower, consulted on the crops the general one doubts, reads better than any weight
mix alone: the graph ``fp32/specialist_encoder.onnx`` (the tower and its CTC head) is
exported from ``model`` and listed in the manifest with the settings and their figures
(``defaults.specialist``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from export.graphs import count_layernorms, ctc_tower_graph
from export.manifest import graph_entry, read_manifest, write_manifest
from export.onnx import export_graph, lint_or_raise
from runtime.specialist import GRAPH_NAME, MANIFEST_KEY, SpecialistSettings
from training.model.clip4str import CLIP4STR


def add_specialist(bundle_dir: str | Path, model: CLIP4STR, settings: SpecialistSettings,
                   figures: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export ``model``'s tower and CTC head as the bundle's ``specialist_encoder`` (fp32) and
    write ``settings`` (with ``figures``, e.g. the validation accuracy they were chosen with)
    to ``defaults.specialist``; the manifest section written."""
    bundle_dir = Path(bundle_dir)
    relative = f"fp32/{GRAPH_NAME}.onnx"
    graph = ctc_tower_graph(model, GRAPH_NAME)
    export_graph(graph, bundle_dir / relative)
    # the wrapper holds the whole image encoder, whose projection (and its LayerNorm) this graph leaves out
    lint_or_raise(bundle_dir / relative, count_layernorms(model.image_encoder.features))
    manifest = read_manifest(bundle_dir)
    manifest["graphs"].setdefault("fp32", {})[GRAPH_NAME] = graph_entry(bundle_dir, relative)
    section = {**settings.to_dict(), **(figures or {})}
    manifest.setdefault("defaults", {})[MANIFEST_KEY] = section
    write_manifest(bundle_dir, manifest)
    return section

