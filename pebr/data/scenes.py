"""Procedural scenes with exact ground truth, rendered to real pixels with Pillow.

Three kinds, each built so that a tiny vision tower can see it at 112x112: few, large, flat,
saturated objects in six well-separated colours on white.

- `shapes`: 2-6 coloured shapes (circle, square, triangle, diamond), one per cell of a 3x3 grid.
- `digits`: 2-4 digits, each drawn alone in a colour or in white/black inside a coloured
            circle, square or diamond.
- `bars`:   a bar chart of 2-4 coloured bars with integer values 1-9 over a grid line per unit.

Digits are drawn as seven-segment glyphs (thick rectangles), so rendering needs no font and
looks the same on every machine. Coordinates are fractions of the image side, so one scene
renders at any size; the position words (left/right, top/bottom) follow the grid column/row.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageDraw

# Saturated, far apart in hue, and all far from the white background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (20, 150, 40),
    "blue": (30, 70, 230),
    "yellow": (245, 200, 0),
    "purple": (140, 40, 190),
    "orange": (255, 120, 0),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# Shapes that hold a digit in random scenes: a triangle leaves room only for a glyph too small
# to read at 112 pixels.
DIGIT_SHAPES = ("circle", "square", "diamond")
KINDS = ("shapes", "digits", "bars")
BACKGROUND = (255, 255, 255)
GRID_LINE = (215, 215, 215)
AXIS = (0, 0, 0)
MAX_BAR_VALUE = 9
# Grid cells; an object's centre is its cell's centre plus a small jitter.
GRID = 3
OBJECT_SIZE = 0.26  # object diameter as a fraction of the image side (a cell is 1/3)
_JITTER = 0.025

# Seven segments per digit: a top, b top-right, c bottom-right, d bottom, e bottom-left,
# f top-left, g middle.
_SEGMENTS = {
    0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc",
    5: "afgcd", 6: "afgedc", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}


@dataclass
class SceneObject:
    """One object. `shape` None: a digit drawn alone (then `digit` is set)."""

    shape: str | None
    colour: str
    col: int  # grid column, 0 = left
    row: int  # grid row, 0 = top
    digit: int | None = None
    dx: float = 0.0  # jitter of the centre, fraction of the image side
    dy: float = 0.0

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the centre as fractions of the image side."""
        return ((self.col + 0.5) / GRID + self.dx, (self.row + 0.5) / GRID + self.dy)

    @property
    def noun(self) -> str:
        """What the object is called in text: its shape, or `digit` for a digit alone."""
        return self.shape if self.shape is not None else "digit"


@dataclass
class Bar:
    colour: str
    value: int  # 1..MAX_BAR_VALUE


@dataclass
class Scene:
    kind: str
    objects: list[SceneObject] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        """Inverse of `to_dict`; ValueError on a malformed dict (unknown kind, colour, shape)."""
        if not isinstance(data, dict) or data.get("kind") not in KINDS:
            raise ValueError(f"scene: expected a dict with kind in {KINDS}, got {data!r:.200}")
        try:
            objects = [SceneObject(**o) for o in data.get("objects") or []]
            bars = [Bar(**b) for b in data.get("bars") or []]
        except TypeError as exc:  # unknown or missing fields
            raise ValueError(f"scene: malformed object or bar ({exc})") from exc
        for o in objects:
            if o.colour not in COLOURS or (o.shape is not None and o.shape not in SHAPES):
                raise ValueError(f"scene: unknown colour/shape in {o}")
            if o.col not in range(GRID) or o.row not in range(GRID):
                raise ValueError(f"scene: cell outside the {GRID}x{GRID} grid in {o}")
            if (o.shape is None and o.digit is None) or (o.digit is not None and o.digit not in range(10)):
                raise ValueError(f"scene: an object needs a shape or a digit 0-9: {o}")
        for b in bars:
            if b.colour not in COLOURS or b.value not in range(MAX_BAR_VALUE + 1):
                raise ValueError(f"scene: bad bar {b}")
        return cls(kind=data["kind"], objects=objects, bars=bars)

    @property
    def digits(self) -> list[int]:
        """Every digit in the scene in reading order (object digits; bar values are not digits)."""
        return [o.digit for o in sorted(self.objects, key=lambda o: (o.row, o.col)) if o.digit is not None]


# ---------------------------------------------------------------------------------------------
# Random scenes


def _place(rng: random.Random, n: int) -> list[tuple[int, int]]:
    cells = [(c, r) for r in range(GRID) for c in range(GRID)]
    return rng.sample(cells, n)


def _jitter(rng: random.Random) -> float:
    return round(rng.uniform(-_JITTER, _JITTER), 4)


@dataclass(frozen=True)
class Difficulty:
    """How hard the built-in scenes are to see: the knob that sizes the procedural world to a policy.

    shapes / digits / bars: (fewest, most) objects of a scene of that kind. Reasoning tasks that
    compare several objects ask for at least 2 (3 for colour counts) whatever the range.
    colours: how many of COLOURS scenes use (the first ones; at least 3, so that a colour question
    has wrong answers).
    """

    shapes: tuple[int, int] = (2, 6)
    digits: tuple[int, int] = (2, 4)
    bars: tuple[int, int] = (2, 4)
    colours: int = len(COLOURS)

    def __post_init__(self):
        if not 3 <= self.colours <= len(COLOURS):
            raise ValueError(f"difficulty colours: expected 3..{len(COLOURS)}, got {self.colours}")
        for kind in KINDS:
            lo, hi = getattr(self, kind)
            most = GRID * GRID if kind != "bars" else self.colours
            if not 1 <= lo <= hi <= most:
                raise ValueError(f"difficulty {kind}: expected 1 <= fewest <= most <= {most}, got ({lo}, {hi})")

    def objects(self, kind: str) -> tuple[int, int]:
        return getattr(self, kind)

    def palette(self) -> list[str]:
        return list(COLOURS)[: self.colours]


# Named levels (`--difficulty`). "standard" is the world every figure before 2026-11-30 was
# measured on; "simple" halves the clutter (docs/recipe.md, "The built-in default", says what it
# does to the warm-up policy's splits).
DIFFICULTIES: dict[str, Difficulty] = {
    "standard": Difficulty(),
    "simple": Difficulty(shapes=(1, 3), digits=(1, 2), bars=(2, 3), colours=4),
}


def difficulty_of(level: "str | Difficulty") -> Difficulty:
    """A Difficulty from its name (DIFFICULTIES) or itself."""
    if isinstance(level, Difficulty):
        return level
    if level not in DIFFICULTIES:
        raise ValueError(f"difficulty: expected one of {sorted(DIFFICULTIES)}, got {level!r}")
    return DIFFICULTIES[level]


def random_scene(rng: random.Random, *, kind: str, n_objects: int | None = None,
                 difficulty: "str | Difficulty" = "standard") -> Scene:
    """A random scene of `kind` ("shapes", "digits", "bars").

    rng: the only source of randomness (same state -> same scene).
    n_objects: number of objects/bars; default random in the difficulty's range
    (standard: shapes 2-6, digits 2-4, bars 2-4).
    difficulty: a Difficulty or its name; its colours are the palette.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    level = difficulty_of(difficulty)
    lo, hi = level.objects(kind)
    n = rng.randint(lo, hi) if n_objects is None else int(n_objects)
    colours = level.palette()
    if not 1 <= n <= (GRID * GRID if kind != "bars" else len(colours)):
        raise ValueError(f"n_objects: {n} does not fit a {kind} scene")
    if kind == "bars":
        return Scene(kind=kind, bars=[Bar(c, rng.randint(1, MAX_BAR_VALUE)) for c in rng.sample(colours, n)])
    objects = []
    for col, row in _place(rng, n):
        colour = rng.choice(colours)
        if kind == "shapes":
            shape, digit = rng.choice(SHAPES), None
        else:
            # Half the digits stand alone, half sit in a shape.
            shape = rng.choice(DIGIT_SHAPES) if rng.random() < 0.5 else None
            digit = rng.randint(0, 9)
        objects.append(SceneObject(shape, colour, col, row, digit, _jitter(rng), _jitter(rng)))
    return Scene(kind=kind, objects=objects)


# ---------------------------------------------------------------------------------------------
# Rendering


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = 0.86 * r  # a square of the same visual weight as the circle
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.98 * r, cy + 0.75 * r), (cx - 0.98 * r, cy + 0.75 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return None


def _digit_box(obj: SceneObject, cx: float, cy: float, r: float) -> tuple[float, float, float]:
    """(centre x, centre y, height) of the digit glyph of `obj`."""
    if obj.shape is None:
        return cx, cy, 1.9 * r
    if obj.shape == "triangle":
        return cx, cy + 0.3 * r, 0.75 * r
    if obj.shape == "diamond":
        return cx, cy, 0.9 * r
    return cx, cy, 1.05 * r


def _segment_rects(digit: int, cx: float, cy: float, h: float) -> list[tuple[float, float, float, float]]:
    """Rectangles (x0, y0, x1, y1) of the seven-segment glyph of `digit`."""
    w, t = 0.58 * h, max(2.0, 0.17 * h)
    x0, x1, y0, y1, ym = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2, cy
    rects = {
        "a": (x0, y0, x1, y0 + t), "g": (x0, ym - t / 2, x1, ym + t / 2), "d": (x0, y1 - t, x1, y1),
        "f": (x0, y0, x0 + t, ym + t / 2), "b": (x1 - t, y0, x1, ym + t / 2),
        "e": (x0, ym - t / 2, x0 + t, y1), "c": (x1 - t, ym - t / 2, x1, y1),
    }
    return [rects[s] for s in _SEGMENTS[digit]]


def _digit_ink(obj: SceneObject) -> tuple[int, int, int]:
    if obj.shape is None:
        return COLOURS[obj.colour]
    # Contrast against the shape's fill: black on the light fills, white on the dark ones.
    return (0, 0, 0) if obj.colour in ("yellow", "orange") else (255, 255, 255)


def _pixel_geometry(obj: SceneObject, size: int) -> tuple[float, float, float]:
    x, y = obj.centre
    return x * size, y * size, OBJECT_SIZE * size / 2


def _bar_rects(scene: Scene, size: int) -> tuple[list[tuple[float, float, float, float]], tuple[float, float, float, float]]:
    """Bar rectangles and the plot area (left, top, right, bottom), in pixels."""
    left, right, top, bottom = 0.08 * size, 0.96 * size, 0.06 * size, 0.92 * size
    unit = (bottom - top) / (MAX_BAR_VALUE + 0.5)
    slot = (right - left) / max(1, len(scene.bars))
    rects = []
    for i, bar in enumerate(scene.bars):
        x0 = left + slot * (i + 0.2)
        rects.append((x0, bottom - bar.value * unit, x0 + slot * 0.6, bottom))
    return rects, (left, top, right, bottom)


def render(scene: Scene, size: int = 112) -> Image.Image:
    """The scene as an RGB image of `size` x `size` pixels (flat colours, no anti-aliasing)."""
    if int(size) < 28:
        raise ValueError(f"size: at least 28 pixels, got {size}")
    size = int(size)
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    if scene.kind == "bars":
        rects, (left, top, right, bottom) = _bar_rects(scene, size)
        unit = (bottom - top) / (MAX_BAR_VALUE + 0.5)
        for v in range(1, MAX_BAR_VALUE + 1):  # one grid line per unit, so values can be read
            y = round(bottom - v * unit)
            draw.line([(left, y), (right, y)], fill=GRID_LINE, width=1)
        for bar, (x0, y0, x1, y1) in zip(scene.bars, rects):
            draw.rectangle([round(x0), round(y0), round(x1), round(y1)], fill=COLOURS[bar.colour])
        lw = max(1, size // 112)
        draw.line([(left, bottom), (right, bottom)], fill=AXIS, width=lw)
        draw.line([(left, top), (left, bottom)], fill=AXIS, width=lw)
        return image
    for obj in scene.objects:
        cx, cy, r = _pixel_geometry(obj, size)
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape is not None:
            draw.polygon(_shape_polygon(obj.shape, cx, cy, r), fill=fill)
        if obj.digit is not None:
            ink = _digit_ink(obj)
            for x0, y0, x1, y1 in _segment_rects(obj.digit, *_digit_box(obj, cx, cy, r)):
                draw.rectangle([round(x0), round(y0), round(x1) - 1, round(y1) - 1], fill=ink)
    return image


def colour_point(scene: Scene, index: int, size: int) -> tuple[int, int]:
    """A pixel (x, y) that `render(scene, size)` paints in the colour of object/bar `index`.

    For checks that the pixels carry the ground truth: inside the shape away from its digit,
    on a stroke of a digit drawn alone, or in the middle of a bar.
    """
    if scene.kind == "bars":
        x0, y0, x1, y1 = _bar_rects(scene, size)[0][index]
        return round((x0 + x1) / 2), round((y0 + y1) / 2)
    obj = scene.objects[index]
    cx, cy, r = _pixel_geometry(obj, size)
    if obj.shape is None:
        x0, y0, x1, y1 = _segment_rects(obj.digit, *_digit_box(obj, cx, cy, r))[0]
        return int((x0 + x1) / 2), int((y0 + y1) / 2)
    if obj.digit is None:
        return round(cx), round(cy)
    # Above the digit glyph, still well inside the shape.
    return round(cx), round(cy - (0.4 if obj.shape == "triangle" else 0.72) * r)


# ---------------------------------------------------------------------------------------------
# Words


def horizontal_position(obj: SceneObject) -> str:
    return ("left", "middle", "right")[obj.col]


def vertical_position(obj: SceneObject) -> str:
    return ("top", "middle", "bottom")[obj.row]


def object_phrase(obj: SceneObject) -> str:
    """`red circle`, `blue square with the digit 3`, `green digit 7`."""
    if obj.shape is None:
        return f"{obj.colour} digit {obj.digit}"
    if obj.digit is None:
        return f"{obj.colour} {obj.shape}"
    return f"{obj.colour} {obj.shape} with the digit {obj.digit}"


def with_article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def describe(scene: Scene) -> str:
    """A short, complete description of the scene (the reference `### Image Description:`)."""
    if scene.kind == "bars":
        listed = ", ".join(f"{b.colour} bar of {b.value}" for b in scene.bars)
        return f"A bar chart: {listed}."
    # Reading order: top to bottom, left to right.
    ordered = sorted(scene.objects, key=lambda o: (o.row, o.col))
    return "There is " + ", ".join(with_article(object_phrase(o)) for o in ordered) + "."


def key_words(scene: Scene) -> list[str]:
    """The visual words a good description mentions: colours, shape names, digits/values.

    In first-appearance order, no duplicates (the keyword reward is the fraction found).
    """
    words: list[str] = []
    if scene.kind == "bars":
        for b in scene.bars:
            words += [b.colour, str(b.value)]
        words.append("bar")
    else:
        for o in sorted(scene.objects, key=lambda o: (o.row, o.col)):
            words += [o.colour, o.noun] + ([str(o.digit)] if o.digit is not None else [])
    return list(dict.fromkeys(words))
