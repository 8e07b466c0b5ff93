"""Render one synthetic word crop: font, colours, background, warps, degradations.

:class:`WordRenderer` draws ``text`` with a random installed font (see :mod:`.fonts`) on
a flat, gradient, noise-texture or patchy background, bends it (arc or wave), tilts,
shears and puts it in perspective, may outline it, shadow it or partly occlude it, then
blurs, downsamples, adds noise and JPEG artefacts. All randomness comes from the two
generators passed in, so a (text, seed) pair always gives the same image. The crop is
tight around the ink with small random margins, like a real word crop, and small
(font sizes 24-48 px) so rendering is cheap.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .fonts import FontInfo, discover_fonts

FONT_SIZES = (24, 28, 32, 36, 42, 48)
_MESH_STRIPS = 12


def _luma(rgb: tuple[int, int, int] | np.ndarray) -> float:
    r, g, b = (float(v) for v in rgb)
    return 0.299 * r + 0.587 * g + 0.114 * b


def _random_colour(rng: random.Random) -> tuple[int, int, int]:
    r = rng.random()
    if r < 0.35:  # greys, black and white are the commonest on signs
        v = rng.choice((rng.randint(0, 50), rng.randint(200, 255), rng.randint(0, 255)))
        return (v, v, v)
    colour = [rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)]
    if r < 0.6:  # saturated sign colours
        colour = [rng.randint(0, 60), rng.randint(0, 255), rng.randint(170, 255)]
        rng.shuffle(colour)
    elif r < 0.9:  # muted: pulled towards its grey
        grey, k = sum(colour) / 3, rng.uniform(0.3, 0.8)
        colour = [int(c + k * (grey - c)) for c in colour]
    return (colour[0], colour[1], colour[2])


def _contrasting(rng: random.Random, lumas: list[float], minimum: float = 80.0) -> tuple[int, int, int]:
    """A colour whose luma differs by ``minimum`` from every luma in ``lumas`` (else the best grey)."""
    for _ in range(12):
        colour = _random_colour(rng)
        if min(abs(_luma(colour) - v) for v in lumas) >= minimum:
            return colour
    v = max(range(0, 256, 15), key=lambda g: min(abs(g - x) for x in lumas))
    return (v, v, v)


def _lumas(background: np.ndarray) -> list[float]:
    """Lumas of a coarse grid over ``background`` (what text colour must stand out from)."""
    h, w = background.shape[:2]
    grid = background[:: max(1, h // 3), :: max(1, w // 5)].reshape(-1, 3).astype(np.float32)
    return (grid @ np.array([0.299, 0.587, 0.114], np.float32)).tolist()


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> tuple[float, ...]:
    """PIL PERSPECTIVE coefficients mapping output points ``dst`` to input points ``src``."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return tuple(np.linalg.solve(np.asarray(rows, float), np.asarray(rhs, float)).tolist())


def check_difficulty(difficulty: float) -> float:
    """``difficulty`` as a float, or a ``ValueError`` when it is outside [0, 1]."""
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be within [0, 1], got {difficulty}")
    return float(difficulty)


class WordRenderer:
    """Draws word crops; holds the font list and a per-process font cache."""

    def __init__(self, fonts: tuple[FontInfo, ...] | None = None, sizes: tuple[int, ...] = FONT_SIZES,
                 difficulty: float = 1.0) -> None:
        #: scales the chance and strength of every effect: 0 is flat text on a plain
        #: background (a curriculum's first stage), 1 the full mix
        self.difficulty = check_difficulty(difficulty)
        self.fonts = fonts if fonts is not None else discover_fonts()
        self.sizes = sizes
        self.families: dict[str, list[FontInfo]] = {}
        for font in self.fonts:
            self.families.setdefault(font.family, []).append(font)
        self.family_names = sorted(self.families)
        self._cache: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}

    # -- fonts ---------------------------------------------------------------------------
    def font(self, path: str, size: int) -> ImageFont.FreeTypeFont:
        key = (path, size)
        if key not in self._cache:
            if len(self._cache) > 400:
                self._cache.clear()
            self._cache[key] = ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)
        return self._cache[key]

    def pick_font(self, text: str, rng: random.Random) -> FontInfo | None:
        """A font that draws every character of ``text`` (family first, for balance)."""
        for _ in range(8):
            font = rng.choice(self.families[rng.choice(self.family_names)])
            if font.covers(text):
                return font
        covering = [f for f in self.fonts if f.covers(text)]
        return rng.choice(covering) if covering else None

    # -- text masks ----------------------------------------------------------------------
    def _masks(self, text: str, font: ImageFont.FreeTypeFont, stroke: int, tracking: float,
               cover: tuple[int, ...] = ()):
        """(fill mask, outline mask or None, cover mask or None), cropped to the ink plus
        ``size // 2`` pixels; the cover mask is the ink boxes of the characters at ``cover``."""
        pad = font.size // 2 + stroke + 2
        if tracking:
            advances = [font.getlength(c) + tracking for c in text]
            width = int(sum(advances)) + font.size
        else:  # generous: no glyph is wider than ~1 em; measuring would cost a second render
            width = int(len(text) * font.size * 1.1) + 2 * stroke
        ascent, descent = font.getmetrics()
        size = (width + 2 * pad, ascent + descent + 2 * stroke + 2 * pad)
        masks = []
        for sw in ((0, stroke) if stroke else (0,)):
            mask = Image.new("L", size, 0)
            draw = ImageDraw.Draw(mask)
            if tracking:
                x = float(pad)
                for c, adv in zip(text, advances):
                    draw.text((x, pad + stroke), c, fill=255, font=font, stroke_width=sw)
                    x += adv
            else:
                draw.text((pad, pad + stroke), text, fill=255, font=font, stroke_width=sw)
            masks.append(mask)
        ink = masks[-1].getbbox()
        if ink is None:
            return None, None, None
        covered = self._cover_mask(text, font, stroke, tracking, cover, size, pad) if cover else None
        box = (max(0, ink[0] - pad), max(0, ink[1] - pad), min(size[0], ink[2] + pad), min(size[1], ink[3] + pad))
        masks = [m.crop(box) for m in masks]
        return masks[0], (masks[1] if stroke else None), (covered.crop(box) if covered else None)

    @staticmethod
    def _cover_mask(text: str, font: ImageFont.FreeTypeFont, stroke: int, tracking: float,
                    cover: tuple[int, ...], size: tuple[int, int], pad: int) -> Image.Image:
        """A mask of the ink boxes (grown by ~1/24 of the font size) of ``text[i]`` for each
        ``i`` in ``cover``, where :meth:`_masks` draws them."""
        mask = Image.new("L", size, 0)
        draw = ImageDraw.Draw(mask)
        grow = font.size // 24 + 1
        for i in cover:
            x = pad + (sum(font.getlength(c) + tracking for c in text[:i]) if tracking else font.getlength(text[:i]))
            left, top, right, bottom = font.getbbox(text[i], stroke_width=stroke)
            draw.rectangle((x + left - grow, pad + stroke + top - grow, x + right + grow, pad + stroke + bottom + grow),
                           fill=255)
        return mask

    def _chance(self, rng: random.Random, p: float) -> bool:
        """True with probability ``p * difficulty``; one draw, as ``rng.random() < p`` made
        before, so difficulty 1 renders exactly what the generator always rendered."""
        return rng.random() < p * self.difficulty

    @staticmethod
    def _curve(masks: list[Image.Image], rng: random.Random) -> list[Image.Image]:
        width, height = masks[0].size
        amp = rng.uniform(0.1, 0.35) * height
        if rng.random() < 0.6:  # arc, up or down
            sign = rng.choice((-1.0, 1.0))
            dy = lambda x: sign * amp * (1.0 - (2.0 * x / width - 1.0) ** 2) - sign * amp / 2  # noqa: E731
        else:  # wave
            phase, period = rng.uniform(0, 2 * math.pi), rng.uniform(0.6, 1.5) * width
            dy = lambda x: amp * 0.6 * math.sin(2 * math.pi * x / period + phase)  # noqa: E731
        extra = int(math.ceil(amp))
        out_h = height + 2 * extra
        mesh = []
        xs = np.linspace(0, width, _MESH_STRIPS + 1)
        for x0, x1 in zip(xs[:-1], xs[1:]):
            o0, o1 = extra + dy(x0), extra + dy(x1)
            box = (int(x0), 0, int(x1), out_h)
            quad = (int(x0), -o0, int(x0), out_h - o0, int(x1), out_h - o1, int(x1), -o1)
            mesh.append((box, quad))
        return [m.transform((width, out_h), Image.Transform.MESH, mesh, Image.Resampling.BILINEAR) for m in masks]

    def _geometry(self, masks: list[Image.Image], rng: random.Random, gen: np.random.Generator,
                  ink: int = -1) -> list[Image.Image]:
        """Shear, rotate and put ``masks`` in perspective, framed on the ink of ``masks[ink]``."""
        box = masks[ink].getbbox()
        if box is None:
            return masks
        x0, y0, x1, y1 = box
        src = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)
        h = float(y1 - y0)
        centre = src.mean(axis=0)
        pts = src - centre
        shear = rng.uniform(-0.35, 0.35) if self._chance(rng, 0.2) else 0.0
        pts[:, 0] -= shear * pts[:, 1]
        angle = math.radians(float(np.clip(gen.normal(0, 3.0), -10, 10)) * self.difficulty)
        if self._chance(rng, 0.05):
            angle = math.radians(rng.uniform(-20, 20))
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        pts = pts @ rot.T
        if self._chance(rng, 0.35):  # perspective: move the corners independently
            pts += gen.uniform(-1, 1, size=(4, 2)) * np.array([0.08, 0.08]) * h
            if rng.random() < 0.5:  # one side shorter (a sign seen from aside), down to ~70%
                side = rng.choice(((1, 2), (0, 3)))
                k = rng.uniform(0.05, 0.15) * h
                pts[side[0], 1] += k
                pts[side[1], 1] -= k
        pad = 2.0
        pts -= pts.min(axis=0) - pad
        size = (int(math.ceil(pts[:, 0].max() + pad)), int(math.ceil(pts[:, 1].max() + pad)))
        coeffs = _perspective_coeffs(pts, src)
        return [m.transform(size, Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR) for m in masks]

    # -- backgrounds ---------------------------------------------------------------------
    def _background(self, size: tuple[int, int], rng: random.Random, gen: np.random.Generator) -> np.ndarray:
        width, height = size
        base = np.array(_random_colour(rng), np.float32)
        kind = rng.random()
        if self.difficulty < 1.0 and rng.random() >= self.difficulty:  # easier: more plain backgrounds
            kind = 0.0
        if kind < 0.35:
            bg = np.broadcast_to(base, (height, width, 3)).copy()
        elif kind < 0.6:  # linear gradient in a random direction
            other = np.array(_random_colour(rng), np.float32) * 0.5 + base * 0.5
            theta = rng.uniform(0, 2 * math.pi)
            yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
            t = xx * math.cos(theta) / width + yy * math.sin(theta) / height
            t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
            bg = base + t[..., None] * (other - base)
        elif kind < 0.85:  # blotchy texture: upsampled low-resolution noise
            low = gen.normal(0, rng.uniform(8, 35), size=(rng.randint(2, 6), rng.randint(3, 16), 3))
            low = np.clip(low + 128, 0, 255).astype(np.uint8)
            tex = np.asarray(Image.fromarray(low).resize(size, Image.Resampling.BICUBIC), np.float32) - 128
            if rng.random() < 0.5:
                tex = tex.mean(axis=2, keepdims=True)
            bg = base + tex
            if rng.random() < 0.4:
                bg = bg + gen.normal(0, rng.uniform(3, 10), size=(height, width, 1))
        else:  # patches and stripes of other colours
            bg = np.broadcast_to(base, (height, width, 3)).copy()
            for _ in range(rng.randint(1, 3)):
                colour = np.array(_random_colour(rng), np.float32)
                if rng.random() < 0.5:
                    y = rng.randint(0, height - 1)
                    bg[y : y + rng.randint(1, max(1, height // 4))] = colour
                else:
                    x = rng.randint(0, width - 1)
                    bg[:, x : x + rng.randint(1, max(1, width // 5))] = colour
        return np.clip(bg, 0, 255).astype(np.uint8)

    # -- the whole crop ------------------------------------------------------------------
    def render(self, text: str, rng: random.Random, gen: np.random.Generator,
               cover: tuple[int, ...] = ()) -> Image.Image | None:
        """An RGB word crop of ``text``, or ``None`` when no font draws it.

        ``cover``: indices of characters to hide under a box filled with the median colour
        of the crop's border, drawn before the degradations (as
        :mod:`benchmarks.occlusion` covers real crops); the other random draws are the
        same as without it."""
        info = self.pick_font(text, rng)
        if info is None:
            return None
        size = rng.choice(self.sizes)
        font = self.font(info.path, size)
        stroke = rng.randint(1, max(1, size // 16)) if self._chance(rng, 0.15) else 0
        tracking = rng.uniform(0.05, 0.35) * size if self._chance(rng, 0.12) and len(text) > 1 else 0.0
        fill_mask, stroke_mask, cover_mask = self._masks(text, font, stroke, tracking, cover)
        if fill_mask is None:  # nothing drawn: a glyph-less render
            return None
        masks = [fill_mask] if stroke_mask is None else [fill_mask, stroke_mask]
        n_ink = len(masks)
        if cover_mask is not None:
            masks.append(cover_mask)
        if self._chance(rng, 0.2):
            masks = self._curve(masks, rng)
        masks = self._geometry(masks, rng, gen, ink=n_ink - 1)
        masks, cover_mask = masks[:n_ink], (masks[n_ink] if cover_mask is not None else None)
        ink = masks[-1].getbbox()
        if ink is None:
            return None
        x0, y0, x1, y1 = ink
        h = y1 - y0
        margins = [rng.uniform(0.0, 0.25) * h for _ in range(2)] + [rng.uniform(0.0, 0.2) * h for _ in range(2)]
        if self._chance(rng, 0.05):  # a crop that cuts into the text a little
            margins[rng.randrange(4)] = -rng.uniform(0.0, 0.12) * h
        box = (int(x0 - margins[0]), int(y0 - margins[2]), int(x1 + margins[1]) + 1, int(y1 + margins[3]) + 1)
        masks = [m.crop(box) for m in masks]
        crop_size = masks[0].size
        if cover_mask is not None:
            cover_mask = cover_mask.crop(box)

        background = self._background(crop_size, rng, gen)
        image = Image.fromarray(background)
        lumas = _lumas(background)
        bg_luma = sum(lumas) / len(lumas)
        fill = _contrasting(rng, lumas)
        if self._chance(rng, 0.12):  # drop shadow
            shadow = masks[-1].filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
            dx, dy = rng.randint(-3, 3), rng.randint(1, 3)
            tone = (20, 20, 20) if bg_luma > 90 else (0, 0, 0)
            image.paste(tone, (dx, dy, dx + crop_size[0], dy + crop_size[1]), shadow)
        if stroke_mask is not None:
            outline = _contrasting(rng, [_luma(fill)], 60.0) if rng.random() < 0.7 else fill
            image.paste(outline, (0, 0, *crop_size), masks[1])
        if self._chance(rng, 0.1):  # two-tone (gradient) letters
            other = _contrasting(rng, lumas)
            t = np.linspace(0, 1, crop_size[1], dtype=np.float32)[:, None, None]
            grad = (np.array(fill, np.float32) * (1 - t) + np.array(other, np.float32) * t)
            grad = np.broadcast_to(grad, (crop_size[1], crop_size[0], 3)).astype(np.uint8)
            image.paste(Image.fromarray(grad), (0, 0), masks[0])
        else:
            image.paste(fill, (0, 0, *crop_size), masks[0])
        if cover_mask is not None:
            image = self._cover(image, cover_mask)
        return self._degrade(image, rng, gen)

    @staticmethod
    def _cover(image: Image.Image, cover_mask: Image.Image) -> Image.Image:
        """``image`` with the bounding rectangle of each run of covered columns filled
        with the median colour of the crop's border, as :mod:`benchmarks.occlusion` covers
        real crops (:mod:`runtime.occlusion`) (two covered characters may be apart)."""
        from runtime.occlusion import border_colour, occlude

        covered = np.asarray(cover_mask) > 127
        columns = np.flatnonzero(covered.any(axis=0))
        boxes = []
        for run in np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1) if len(columns) else ():
            rows = np.flatnonzero(covered[:, run].any(axis=1))
            boxes.append((int(run[0]), int(rows[0]), int(run[-1] - run[0] + 1), int(rows[-1] - rows[0] + 1)))
        return occlude(image, boxes, border_colour(image))

    def _degrade(self, image: Image.Image, rng: random.Random, gen: np.random.Generator) -> Image.Image:
        width, height = image.size
        if self._chance(rng, 0.1):  # partial occlusion: a bar, a wire or a blob over the word
            draw = ImageDraw.Draw(image)
            colour = _random_colour(rng)
            if rng.random() < 0.5:
                x = rng.uniform(0, width)
                draw.line((x, 0, x + rng.uniform(-0.5, 0.5) * height, height), fill=colour,
                          width=rng.randint(1, max(1, height // 8)))
            else:
                cx, cy = rng.uniform(0, width), rng.choice((rng.uniform(-0.2, 0.2), rng.uniform(0.8, 1.2))) * height
                r = rng.uniform(0.15, 0.35) * height
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        scale = height / 32.0  # degradations are relative to the crop size
        if self._chance(rng, 0.25):
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.8) * scale))
        elif self._chance(rng, 0.15) and height >= 24:  # a low-resolution crop, upsampled
            f = rng.uniform(0.45, 0.8)
            small = image.resize((max(1, int(width * f)), max(1, int(height * f))), Image.Resampling.BILINEAR)
            image = small.resize((width, height), Image.Resampling.BILINEAR)
        if self._chance(rng, 0.1):  # low contrast / haze
            image = Image.blend(image, Image.new("RGB", image.size, _random_colour(rng)), rng.uniform(0.15, 0.35))
        if self._chance(rng, 0.3):
            noisy = np.asarray(image, np.float32) + gen.normal(0, rng.uniform(2, 10), size=(height, width, 1))
            image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        if self._chance(rng, 0.3):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=rng.randint(25, 80))
            image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        return image
