"""Fonts for the synthetic word generator, found at run time in installed packages.

Sources (no network): matplotlib's bundled TTFs (DejaVu, STIX, Computer Modern) and the
PyPI font packages in :data:`FONT_PACKAGES` that happen to be installed (each ships its
TTF/OTF files in ``<module>/files``). Every font's character coverage comes from its cmap
(fontTools, a matplotlib dependency), corrected where a font maps ASCII code points to
other glyphs (TeX's OT1-encoded Computer Modern) or draws lower case as small capitals.
"""

from __future__ import annotations

import importlib.util
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

#: PyPI packages that ship fonts as ``<module>/files/*.ttf|otf``; any installed subset is used.
FONT_PACKAGES = (
    "font_roboto",
    "font_source_sans_pro",
    "font_source_serif_pro",
    "font_lato",
    "font_caladea",
    "font_fredoka_one",
    "font_amatic_sc",
    "font_hanken_grotesk",
    "font_intuitive",
    "font_manrope",
    "font_fjallaone",
    "font_rhd",
)

#: matplotlib files that are symbol/fallback fonts or small subsets, never used.
_EXCLUDED_PREFIXES = ("LastResort", "STIXNonUni", "STIXSiz", "cmex", "cmmi", "cmsy", "DejaVuSansDisplay",
                      "DejaVuSerifDisplay")
#: Computer Modern text fonts in OT1 encoding draw these ASCII code points as other glyphs.
_OT1_WRONG = set('"<>\\_`{|}~')
_PRINTABLE = set(string.digits + string.ascii_letters + string.punctuation)


@dataclass(frozen=True)
class FontInfo:
    """One usable font file: its family (for balanced sampling) and the characters it draws."""

    path: str
    family: str
    chars: frozenset[str]

    def covers(self, text: str) -> bool:
        return all(c in self.chars for c in text)


def _family(path: Path) -> str:
    stem = path.stem
    if stem.startswith("cm"):
        return "ComputerModern"
    for prefix in ("DejaVuSansMono", "DejaVuSans", "DejaVuSerif", "STIXGeneral"):
        if stem.startswith(prefix):
            return prefix
    return stem.split("-")[0] if "-" in stem else stem


def _coverage(path: Path) -> frozenset[str]:
    from fontTools.ttLib import TTFont

    cmap = TTFont(str(path), lazy=True, fontNumber=0)["cmap"].getBestCmap() or {}
    chars = {chr(code) for code in cmap if chr(code) in _PRINTABLE}
    stem = path.stem
    if stem.startswith("cm") and stem != "cmtt10":
        chars -= _OT1_WRONG
        if stem == "cmti10":
            chars.discard("$")  # drawn as a pound sign
    if "AmaticSC" in stem:  # small caps: lower case would be drawn as capitals
        chars -= set(string.ascii_lowercase)
    return frozenset(chars)


def font_files() -> list[Path]:
    """Every candidate font file, sorted (the order makes generation deterministic)."""
    files: list[Path] = []
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.origin:
        files += sorted((Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf").glob("*.ttf"))
    for module in FONT_PACKAGES:
        spec = importlib.util.find_spec(module)
        if not (spec and spec.origin):
            continue
        folder = Path(spec.origin).parent / "files"
        found = {p.stem: p for p in sorted(folder.glob("*.otf"))}
        found.update({p.stem: p for p in sorted(folder.glob("*.ttf"))})  # prefer TTF over OTF
        files += sorted(found.values())
    return [p for p in files if not p.stem.startswith(_EXCLUDED_PREFIXES) and "VariableFont" not in p.stem]


@lru_cache(maxsize=1)
def discover_fonts(min_chars: int = 62) -> tuple[FontInfo, ...]:
    """All usable fonts (covering at least ``min_chars`` printable ASCII characters).

    Raises ``RuntimeError`` when none is installed.
    """
    fonts = []
    for path in font_files():
        try:
            chars = _coverage(path)
        except Exception:  # a damaged font file is skipped, not fatal
            continue
        if len(chars) >= min_chars or ("AmaticSC" in path.stem and len(chars) >= 36):
            fonts.append(FontInfo(str(path), _family(path), chars))
    if not fonts:
        raise RuntimeError(
            "no fonts found for the synthetic generator: install matplotlib or one of "
            + ", ".join(m.replace("_", "-") for m in FONT_PACKAGES)
        )
    return tuple(fonts)
