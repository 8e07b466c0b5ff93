"""Detection behind clipllama-serve (POST /read?detect=1) and clipllama-batch --detect: the
replica's and the actor's photo paths, called in process (no Ray cluster is started)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from test_detect import DETECT, compose

pytest.importorskip("ray", reason="the serve extra is not installed (pip install 'clipllama[serve]')")
pytest.importorskip("pyarrow", reason="the serve extra is not installed (pip install 'clipllama[serve]')")
pytestmark = pytest.mark.skipif(DETECT is not None, reason=f"the detect extra is not installed ({DETECT})")


@pytest.fixture(scope="module")
def recognizer():
    from runtime.recognizer import Recognizer

    with Recognizer.from_bundle(llm="none") as r:
        yield r


def test_serve_detect_records(recognizer) -> None:
    from runtime.inputs import Sample
    from runtime.preprocess import load_image
    from serving.app import Reader

    photo, truth = compose()
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    reader = Reader.__new__(Reader)  # the replica without Ray: its recognizer and flag
    reader.recognizer, reader.detect = recognizer, True
    decoded = [Sample("shop.png", load_image(buffer.getvalue())), {"source": "junk", "error": "junk: not an image"}]
    answer = reader._photos(decoded)
    assert answer.status_code == 200
    records = json.loads(answer.body)["results"]
    assert [r["source"] for r in records] == ["shop.png", "junk"]
    assert {w["text"].lower() for w in records[0]["words"]} == {t.lower() for _, t in truth}
    assert records[1] == {"source": "junk", "words": [], "error": "junk: not an image"}
    assert reader._photos(decoded[1:]).status_code == 400


def test_batch_detect_records(recognizer, tmp_path: Path) -> None:
    import pyarrow as pa

    from serving.batch import ChunkReader

    photo, truth = compose()
    good, blank = tmp_path / "shop.png", tmp_path / "missing.png"
    photo.save(good)
    actor = ChunkReader.__new__(ChunkReader)
    actor.recognizer, actor.batch, actor.detect = recognizer, 32, True
    row = {"set": "", "named": False, "source": [str(good), str(blank)], "label": [None, None],
           "path": [str(good), str(blank)], "lmdb_index": [-1, -1]}
    records = [json.loads(r) for r in actor(pa.Table.from_pylist([row])).column("record").to_pylist()]
    assert [r["source"] for r in records] == [str(good), str(blank)]
    assert {w["text"].lower() for w in records[0]["words"]} == {t.lower() for _, t in truth}
    assert records[1]["words"] == [] and records[1]["error"]
