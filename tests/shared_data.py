"""Where the tests find the real, human-labelled crops (``../shared/data`` beside the
repository, see its README), and the one way a test that needs them skips.

``CLIPLLAMA_DATA`` points the tests at another copy of that folder. Without it, and with no
``../shared/data``, every test that needs real data skips and says so: the suite passes on
any fresh clone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: the environment variable that names the data folder (the one holding ``eval/`` and ``train/``)
ENV = "CLIPLLAMA_DATA"


def data_root() -> Path:
    """``$CLIPLLAMA_DATA``, else ``../shared/data`` beside the repository."""
    value = os.environ.get(ENV, "").strip()
    return Path(value).expanduser() if value else REPO.parent / "shared" / "data"


def data_path(*parts: str) -> Path:
    """A path inside the data folder (it may not exist: see :func:`require`)."""
    return data_root().joinpath(*parts)


def require(*parts: str) -> Path:
    """The path inside the data folder, or a skip that says what is missing and how to point at it."""
    path = data_path(*parts)
    if not path.exists():
        pytest.skip(f"needs the real data: {path} is not there (put ../shared/data beside the repository "
                    f"or set {ENV}=DIR)")
    return path
