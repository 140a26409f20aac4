"""The embedded default dataset: procedural "shapes" scenes rendered with numpy.

Every record is a pure function of `(seed, split, index)`, so the source is
random access, deterministic, needs no files and renders at any resolution.
A scene holds 1..`max_objects` objects (colour x shape x size x position) on a
low-contrast textured background, and comes with everything the objectives and
finetuning tasks need: three caption fields of different quality (noisy
alt-text, accurate short caption, detailed long caption), a class label,
per-pixel class and instance masks, COCO-style boxes and a depth map.

Choices that matter for what a model can learn here (see DESIGN.md):
- objects are big enough to cover several patches (radius 0.16 / 0.25 of the
  side: ~3x3 / ~4x4 8-px patches at 64 px), and the six shapes differ at patch
  scale (a ring has a hole, a cross has arms, a diamond's tips are where a
  square's edges are);
- shapes are never rotated, otherwise a square and a diamond are one shape;
- background colours are low-saturation mid greys, far from all eight object
  colours including white and black, so "background" is a learnable decision;
- the scene sentence of the long caption mixes many templates with scene facts
  (texture, tone, object count, empty corner, background share), so sentences
  from different images are rarely near-duplicates (repeated sentences act as
  false negatives for multi-positive and grouping losses);
- objects in a scene have distinct (colour, shape) classes, so "the blue
  square" in a relation is never ambiguous.

Text lengths in bytes (= ByteTokenizer tokens - 1), median / p99 / max over
3,000 train records with max_objects=3: long_caption 217 / 336 / 367, one
long-caption sentence 71 / 110 / 132, caption 36 / 66 / 72, alt_text 35 / 80 /
101. So a context of 128 holds any single sentence (sub-captions) and 384 any
long caption; longer-than-context captions are truncated with EOS kept.

Speed, all fields of a record, one core (2-core CPU machine, numpy 2.x):
    /work/venv/bin/python -m input_pipeline.sources.shapes --bench
    /work/venv/bin/python -m input_pipeline.sources.shapes --bench --image_size 224 --n 500
measured ~3,450 images/s at 64 px and ~600 at 224 px (DESIGN target: >= 1,000
at 64 px) on the first development machine; on the later shared Xeon, 1,530-1,650 before
and 1,960 after the background, composition and occlusion steps were made cheaper with
bit-identical records (the sha256 of every field of 26.5k records, both splits, 32-224 px,
3-8 objects, is unchanged).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
SIZES = ("small", "large")
NUM_CLASSES = len(COLOURS) * len(SHAPES)  # 48; class = colour * 6 + shape

# Saturated or extreme colours; the background stays in [~75, ~200] grey with a
# small tint, i.e. >= ~45 levels from white/black even with texture + jitter.
_RGB = np.array(
    [
        (215, 35, 35),  # red
        (35, 160, 55),  # green
        (35, 75, 215),  # blue
        (235, 215, 40),  # yellow
        (135, 45, 175),  # purple
        (240, 135, 20),  # orange
        (242, 242, 242),  # white
        (18, 18, 18),  # black
    ],
    dtype=np.int16,
)
_COLOUR_JITTER = 12  # per channel, so colour is a category, not one exact RGB

# Radius as a fraction of the image side: small objects are ~20 px across at 64 px (3x3
# patches of 8 px), large ones ~32 px. Up from (0.12, 0.2), with which CLIP (shapes BPE,
# 800 steps) learnt shape far more slowly: held-out zero-shot 45.1 -> 48.2%, shape alone
# 39.5 -> 44.5%, i->t R@1 48.2 -> 51.6%; a crowded draw now renders 2 objects more often
# (scenes of 1/2/3 objects among the 512 eval scenes: 192/195/125, was 170/161/181).
_RADIUS = (0.16, 0.25)
_RADIUS_JITTER = 0.05
# Centres at least this fraction of (r1 + r2) apart. Every shape fits inside
# 1.25 r, so with this spacing the centre of an occluded object stays visible:
# overlaps happen but never hide an object.
_MIN_SEPARATION = 0.85
_PLACEMENT_TRIES = 30

_SPLIT_IDS = {"train": 0, "eval": 1}
_DEFAULT_LEN = {"train": 1_000_000, "eval": 512}


def class_index(colour: int, shape: int) -> int:
    return colour * len(SHAPES) + shape


def class_names() -> list[str]:
    """The 48 class names, index = colour * 6 + shape, e.g. "red circle"."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


# ----------------------------------------------------------------------------
# Shape masks in object coordinates: u to the right, v downwards, both in units
# of the radius. All are upright and of comparable area (~2.2-3.1 r^2).


def _circle(u, v):
    return u * u + v * v <= 1.0


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.85


def _triangle(u, v):
    # Apex at the top (v = -1), flat base at v = 0.8, base half-width 1.05.
    return (v <= 0.8) & (np.abs(u) <= (v + 1.0) * (1.05 / 1.8))


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.33) & (av <= 1.0)) | ((av <= 0.33) & (au <= 1.0))


def _ring(u, v):
    d2 = u * u + v * v
    return (d2 <= 1.0) & (d2 >= 0.55**2)


def _diamond(u, v):
    return np.abs(u) + np.abs(v) <= 1.1


_SHAPE_FNS = (_circle, _square, _triangle, _cross, _ring, _diamond)
_EXTENT = 1.25  # every shape lies inside a (2 * 1.25 r) square window


# ----------------------------------------------------------------------------
# Scene description (sampled first, rendered second).


@dataclasses.dataclass(frozen=True)
class _Object:
    colour: int
    shape: int
    size: int  # 0 small, 1 large
    cx: float  # centre in pixels
    cy: float
    radius: float
    rgb: np.ndarray  # (3,) uint8, jittered colour


@dataclasses.dataclass(frozen=True)
class _Background:
    base: np.ndarray  # (3,) float32
    tone: str  # "light warm grey"
    texture: str  # noise | clouds | gradient | stripes | checker
    amplitude: float
    params: dict  # texture parameters (angle, period, ...), also used in text


_LUMINANCE = (("dark", 95.0), ("mid", 135.0), ("light", 175.0))
_TINTS = (
    ("warm", (9.0, 3.0, -9.0)),
    ("cool", (-9.0, 0.0, 9.0)),
    ("neutral", (0.0, 0.0, 0.0)),
)
# Eight gradient directions: angle (degrees, y down) -> side that is lighter.
_DIRECTIONS = {
    0: "right",
    45: "bottom right",
    90: "bottom",
    135: "bottom left",
    180: "left",
    225: "top left",
    270: "top",
    315: "top right",
}


def _sample_background(rng: np.random.Generator) -> _Background:
    lum_name, lum = _LUMINANCE[rng.integers(len(_LUMINANCE))]
    tint_name, tint = _TINTS[rng.integers(len(_TINTS))]
    base = lum + rng.uniform(-8, 8) + np.asarray(tint, np.float32)
    tone = f"{lum_name} grey" if tint_name == "neutral" else f"{lum_name} {tint_name} grey"
    tone = tone.replace("mid ", "")  # "mid grey" reads oddly; plain "grey"
    texture = ("noise", "clouds", "gradient", "stripes", "checker")[rng.integers(5)]
    if texture == "gradient":
        params = {"angle": int(rng.integers(8)) * 45}
    elif texture == "stripes":
        params = {
            "orientation": ("horizontal", "vertical", "diagonal")[rng.integers(3)],
            "period": float(rng.uniform(0.1, 0.25)),  # fraction of the side
            "phase": float(rng.uniform(0, 2 * np.pi)),
        }
    elif texture == "checker":
        params = {"cell": float(rng.uniform(0.08, 0.2)), "offset": float(rng.uniform(0, 1))}
    elif texture == "clouds":
        params = {"coarse": rng.uniform(-1, 1, (5, 5)).astype(np.float32)}
    else:
        params = {}
    amplitude = float(rng.uniform(8, 18))
    return _Background(base.astype(np.float32), tone, texture, amplitude, params)


def _sample_objects(rng, num_objects: int, size: int) -> list[_Object]:
    """Distinct classes, rejection-sampled positions with limited overlap.

    An object that finds no place within `_PLACEMENT_TRIES` is dropped, so a
    crowded draw renders fewer objects (captions always describe what is drawn).
    """
    classes = rng.choice(NUM_CLASSES, size=num_objects, replace=False)
    objects: list[_Object] = []
    for cls in classes:
        colour, shape = divmod(int(cls), len(SHAPES))
        size_idx = int(rng.integers(2))
        radius = _RADIUS[size_idx] * size * (1 + rng.uniform(-_RADIUS_JITTER, _RADIUS_JITTER))
        for _ in range(_PLACEMENT_TRIES):
            cx, cy = rng.uniform(radius, size - radius, 2)
            if all(
                np.hypot(cx - o.cx, cy - o.cy) >= _MIN_SEPARATION * (radius + o.radius)
                for o in objects
            ):
                break
        else:
            continue
        jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3)
        rgb = np.minimum(np.maximum(_RGB[colour] + jitter, 0), 255)  # np.clip, 5x cheaper here
        objects.append(
            _Object(
                colour, shape, size_idx, float(cx), float(cy), float(radius), rgb.astype(np.uint8)
            )
        )
    return objects


# ----------------------------------------------------------------------------
# Text. Captions are built from the scene plus their own random draws.

_POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
_POSITION_PHRASES = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _position(obj: _Object, size: int) -> str:
    row = min(int(obj.cy * 3 / size), 2)
    col = min(int(obj.cx * 3 / size), 2)
    return _POSITIONS[row][col]


def _name(obj: _Object) -> str:
    return f"{COLOURS[obj.colour]} {SHAPES[obj.shape]}"


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def short_caption(objects: list[_Object], rng) -> str:
    """Accurate: every object with colour and shape, sometimes its size."""
    parts = []
    for o in objects:
        words = f"{SIZES[o.size]} {_name(o)}" if rng.random() < 0.3 else _name(o)
        parts.append(f"{_article(words)} {words}")
    return _join(parts)


_FILLERS = (
    "stock photo",
    "free download",
    "vector illustration",
    "clipart",
    "hd wallpaper",
    "royalty free",
    "abstract geometric background",
    "shapes",
    "png",
    "jpg",
    "click to enlarge",
    "design element",
    "icon set",
    "kids learning shapes",
    "flat design",
    "template",
    "pattern",
    "cute",
    "best price",
    "high resolution",
    "simple",
    "graphic",
    "cartoon",
    "educational",
    "new",
    "sale",
)


def alt_text(objects: list[_Object], rng) -> str:
    """Noisy web alt-text: some objects only, wrong attributes, filler words."""
    words = []
    mention_objects = rng.random() > 0.1  # ~10% are filler only
    for o in objects:
        if not mention_objects or rng.random() > 0.6:
            continue
        colour, shape = o.colour, o.shape
        if rng.random() < 0.15:  # a wrong attribute, as careless annotators write
            if rng.random() < 0.5:
                colour = (colour + 1 + rng.integers(len(COLOURS) - 1)) % len(COLOURS)
            else:
                shape = (shape + 1 + rng.integers(len(SHAPES) - 1)) % len(SHAPES)
        form = rng.integers(3)
        if form == 0:
            words.append(f"{COLOURS[colour]} {SHAPES[shape]}")
        elif form == 1:
            words.append(SHAPES[shape])
        else:
            words.append(f"{COLOURS[colour]} {SHAPES[shape]}s")
    for _ in range(rng.integers(1, 4)):
        r = rng.random()
        if r < 0.15:
            words.append(f"image {rng.integers(10000)}")
        elif r < 0.25:
            words.append(f"IMG_{rng.integers(10000):04d}.jpg")
        else:
            words.append(_FILLERS[rng.integers(len(_FILLERS))])
    order = rng.permutation(len(words))
    text = (" ", " - ", ", ", " | ")[rng.integers(4)].join(words[i] for i in order)
    return text.title() if rng.random() < 0.2 else text


_OBJECT_TEMPLATES = (
    "{A} {size} {colour} {shape} is {pos}{rel}.",
    "There is {a} {size} {colour} {shape} {pos}{rel}.",
    "{Pos}, there is {a} {size} {colour} {shape}{rel}.",
    "{Pos} is {a} {size} {colour} {shape}{rel}.",
    "{Ac} {colour} {shape}, {size}, sits {pos}{rel}.",
    "The {size} {colour} {shape} is located {pos}{rel}.",
    "You can see {a} {size} {colour} {shape} {pos}{rel}.",
    "{A} {size} {shape} in {colour} appears {pos}{rel}.",
)


def _relation(k: int, j: int, objects, occluders: list[set[int]]) -> str:
    """How object k relates to object j, for the long caption."""
    o, ref = objects[k], objects[j]
    if j in occluders[k]:
        rel = "partly behind"
    elif k in occluders[j]:
        rel = "in front of"
    else:
        dx, dy = o.cx - ref.cx, o.cy - ref.cy
        if abs(dx) >= abs(dy):
            rel = "to the left of" if dx < 0 else "to the right of"
        else:
            rel = "above" if dy < 0 else "below"
    return f", {rel} the {_name(ref)}"


def object_sentence(k: int, objects, occluders, size: int, rng) -> str:
    o = objects[k]
    rel = ""
    if len(objects) > 1:
        rel = _relation(k, k - 1 if k > 0 else 1, objects, occluders)
    pos = _POSITION_PHRASES[_position(o, size)]
    template = _OBJECT_TEMPLATES[rng.integers(len(_OBJECT_TEMPLATES))]
    colour, shape, size_word = COLOURS[o.colour], SHAPES[o.shape], SIZES[o.size]
    return template.format(
        a=_article(size_word),
        A=_article(size_word).capitalize(),
        Ac=_article(colour).capitalize(),
        size=size_word,
        colour=colour,
        shape=shape,
        pos=pos,
        Pos=pos[0].upper() + pos[1:],
        rel=rel,
    )


# Scene sentences. Fields: tone, tex_adj ("striped"), tex_noun ("thin vertical
# stripes"), count ("two shapes"), the_count, Count, are, empty (a corner with
# no object pixels), bg_pct. Templates needing `empty` are used only when a
# corner is empty.
_SCENE_TEMPLATES = (
    "The background is a {tone} surface with {tex_noun}.",
    "Behind {the_count} lies a {tex_adj} {tone} backdrop.",
    "The scene has {count} on a {tex_adj} {tone} background.",
    "Everything sits on a {tone} background covered in {tex_noun}.",
    "The backdrop is {tone} and {tex_adj}.",
    "{Count} {are} set against a {tex_adj} {tone} field.",
    "The image shows {count} over {tex_noun} in {tone}.",
    "A {tex_adj} {tone} texture fills the space around {the_count}.",
    "This is a simple render of {count} on {tone}.",
    "In total there {are} {count}, set against {tone} with {tex_noun}.",
    "The canvas is {tone}, patterned with {tex_noun}.",
    "Around {the_count} the background stays a {tex_adj} {tone}.",
    "Under {the_count} is a {tone} ground of {tex_noun}.",
    "The empty space is {tone} with {tex_noun}.",
    "A {tone} background with {tex_noun} surrounds {the_count}.",
    "The picture contains {count} and a {tex_adj} {tone} background.",
    "Only {count} {are} visible on the {tex_adj} {tone} background.",
    "Roughly {bg_pct} percent of the image is {tex_adj} {tone} background.",
    "About {bg_pct} percent of the frame is {tex_adj} {tone} backdrop, the rest is {count}.",
    "The {empty} is empty, showing only the {tex_adj} {tone} background.",
    "Nothing occupies the {empty}, where {tex_noun} in {tone} show through.",
    "The {tone} ground has {tex_noun}, and the {empty} is left blank.",
    "No object reaches the {empty} of this {tex_adj} {tone} picture.",
    "Apart from {the_count}, the picture is {tone} with {tex_noun}.",
)


def _texture_words(bg: _Background, rng) -> tuple[str, str]:
    p = bg.params
    if bg.texture == "noise":
        return (
            ("grainy", "speckled", "noisy")[rng.integers(3)],
            ("fine grain", "light speckles", "soft noise")[rng.integers(3)],
        )
    if bg.texture == "clouds":
        return (
            ("cloudy", "mottled", "blotchy")[rng.integers(3)],
            ("soft blotches", "cloudy patches", "faint mottling")[rng.integers(3)],
        )
    if bg.texture == "gradient":
        side = _DIRECTIONS[p["angle"]]
        return (
            ("shaded", "graded")[rng.integers(2)],
            f"a gradient that gets lighter towards the {side}",
        )
    if bg.texture == "stripes":
        width = "thin" if p["period"] < 0.17 else "wide"
        return "striped", f"{width} {p['orientation']} stripes"
    size = "small" if p["cell"] < 0.14 else "large"
    return "checkered", f"a faint checkerboard of {size} squares"


def scene_sentence(objects, bg: _Background, instance: np.ndarray, rng) -> str:
    n = len(objects)
    h, w = instance.shape
    corners = {
        "top left corner": instance[: h // 2, : w // 2],
        "top right corner": instance[: h // 2, w // 2 :],
        "bottom left corner": instance[h // 2 :, : w // 2],
        "bottom right corner": instance[h // 2 :, w // 2 :],
    }
    empty = [name for name, quarter in corners.items() if not quarter.any()]
    templates = [t for t in _SCENE_TEMPLATES if empty or "{empty}" not in t]
    noun = ("shape", "object", "figure")[rng.integers(3)]
    count = f"{_NUMBERS[n]} {noun}{'s' if n > 1 else ''}"
    tex_adj, tex_noun = _texture_words(bg, rng)
    text = templates[rng.integers(len(templates))].format(
        tone=bg.tone,
        tex_adj=tex_adj,
        tex_noun=tex_noun,
        count=count,
        Count=count.capitalize(),
        the_count=f"the {count}" if n > 1 else f"the single {noun}",
        are="are" if n > 1 else "is",
        empty=empty[rng.integers(len(empty))] if empty else "",
        # Nearest ten, at most 90: objects always cover something.
        bg_pct=min(int(round(100 * (np.count_nonzero(instance == 0) / instance.size), -1)), 90),
    )
    return text


def long_caption(objects, occluders, bg, instance, size: int, rng) -> str:
    """One sentence per object (in z-order) plus a scene sentence, first or last."""
    sentences = [object_sentence(k, objects, occluders, size, rng) for k in range(len(objects))]
    scene = scene_sentence(objects, bg, instance, rng)
    if rng.random() < 0.5:
        sentences.insert(0, scene)
    else:
        sentences.append(scene)
    return " ".join(sentences)


# ----------------------------------------------------------------------------
# The source.


class ShapesSource:
    """Random-access source of procedural scenes (a grain RandomAccessDataSource).

    Args:
      split: "train" or "eval"; eval draws from a different seed stream, so
        held-out scenes differ from training ones.
      seed: base seed; a record depends only on (seed, split, index).
      image_size: side in pixels; every geometric quantity scales with it.
      max_objects: M, the length of the per-object arrays; scenes hold
        min_objects..M objects (fewer when placement fails in a crowded draw).
      num_records: epoch length; defaults to 1,000,000 (train) or 512 (eval).
        The world is infinite, this only fixes what an epoch is.

    Record fields (numpy / python types):
      image (H,W,3) uint8; alt_text, caption, long_caption str;
      obj_colour, obj_shape, obj_size (M,) int32 (-1 where invalid),
      obj_valid (M,) bool; label (class colour*6+shape of the object with the
      largest visible area), colour_label, shape_label int32;
      seg (H,W) int32 (0 background, 1 + class); instance (H,W) int32 (0
      background, k + 1 for object k in drawing order); boxes (M,4) float32
      COCO [x, y, w, h] in pixels of the visible pixels (zeros if invalid);
      depth (H,W) float32: 1.0 for the background, 1 - (k+1)/(M+1) for object
      k, i.e. later-drawn (occluding) objects are nearer; id int64 = index.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        seed: int = 0,
        image_size: int = 64,
        max_objects: int = 3,
        min_objects: int = 1,
        num_records: int | None = None,
    ):
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {list(_SPLIT_IDS)}, got {split!r}")
        if not 1 <= min_objects <= max_objects <= len(_NUMBERS) - 1:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= 8, got {min_objects}, {max_objects}"
            )
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        self.split = split
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.max_objects = int(max_objects)
        self.min_objects = int(min_objects)
        self.num_records = int(num_records if num_records is not None else _DEFAULT_LEN[split])
        # Pixel-centre coordinates as a row and a column: masks are computed by
        # broadcasting them inside each object's window, never per pixel.
        s = self.image_size
        coords = np.arange(s, dtype=np.float32) + 0.5
        self._xs = coords[None, :]
        self._ys = coords[:, None]
        # Bilinear upsampling matrix for the 5x5 "clouds" texture.
        grid = np.linspace(0, 4, s, dtype=np.float32)
        lo = np.minimum(grid.astype(int), 3)
        frac = grid - lo
        up = np.zeros((s, 5), np.float32)
        up[np.arange(s), lo] = 1 - frac
        up[np.arange(s), lo + 1] = frac
        self._upsample = up

    def __len__(self) -> int:
        return self.num_records

    def __repr__(self) -> str:
        return (
            f"ShapesSource(split={self.split!r}, seed={self.seed}, image_size={self.image_size}, "
            f"max_objects={self.max_objects}, num_records={self.num_records})"
        )

    def __getitem__(self, index) -> dict:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"index {index} out of range for {self!r}")
        # SeedSequence entropy from the triple: independent streams per record
        # and per split, with no state shared across calls (thread safe).
        rng = np.random.default_rng((self.seed, _SPLIT_IDS[self.split], index))
        s, m = self.image_size, self.max_objects
        bg = _sample_background(rng)
        objects = _sample_objects(rng, int(rng.integers(self.min_objects, m + 1)), s)

        instance, occluders = self._paint_instances(objects)
        n = len(objects)
        # Everything per pixel follows from the instance map by table lookup.
        cls_lut = np.zeros(m + 1, np.int32)
        depth_lut = np.ones(m + 1, np.float32)
        rgb_lut = np.zeros((m + 1, 3), np.uint8)
        for k, o in enumerate(objects):
            cls_lut[k + 1] = 1 + class_index(o.colour, o.shape)
            depth_lut[k + 1] = 1.0 - (k + 1) / (m + 1)
            rgb_lut[k + 1] = o.rgb
        image = self._render_background(bg, rng)
        drawn = instance > 0
        image[drawn] = rgb_lut[instance[drawn]]

        obj_colour = np.full(m, -1, np.int32)
        obj_shape = np.full(m, -1, np.int32)
        obj_size = np.full(m, -1, np.int32)
        obj_valid = np.zeros(m, bool)
        boxes = np.zeros((m, 4), np.float32)
        for k, o in enumerate(objects):
            obj_colour[k], obj_shape[k], obj_size[k], obj_valid[k] = o.colour, o.shape, o.size, True
            boxes[k] = _box(instance == k + 1)
        area = np.bincount(instance.ravel(), minlength=m + 1)[1 : n + 1]
        main = objects[int(np.argmax(area))]  # argmax takes the first on ties

        return {
            "image": image,
            "alt_text": alt_text(objects, rng),
            "caption": short_caption(objects, rng),
            "long_caption": long_caption(objects, occluders, bg, instance, s, rng),
            "obj_colour": obj_colour,
            "obj_shape": obj_shape,
            "obj_size": obj_size,
            "obj_valid": obj_valid,
            "label": np.int32(class_index(main.colour, main.shape)),
            "colour_label": np.int32(main.colour),
            "shape_label": np.int32(main.shape),
            "seg": cls_lut[instance],
            "instance": instance,
            "boxes": boxes,
            "depth": depth_lut[instance],
            "id": np.int64(index),
        }

    def _paint_instances(self, objects) -> tuple[np.ndarray, list[set[int]]]:
        """Instance map in z-order (later objects overwrite earlier ones).

        Also returns, per object, the set of objects drawn over it, which the
        long caption turns into "in front of" / "partly behind".
        """
        s = self.image_size
        instance = np.zeros((s, s), np.int32)
        occluders: list[set[int]] = [set() for _ in objects]
        for k, o in enumerate(objects):
            reach = _EXTENT * o.radius
            y0, y1 = max(int(o.cy - reach), 0), min(int(np.ceil(o.cy + reach)), s)
            x0, x1 = max(int(o.cx - reach), 0), min(int(np.ceil(o.cx + reach)), s)
            u = (self._xs[:, x0:x1] - o.cx) / o.radius
            v = (self._ys[y0:y1] - o.cy) / o.radius
            mask = _SHAPE_FNS[o.shape](u, v)
            window = instance[y0:y1, x0:x1]
            # Objects under this one's pixels: a count per instance id (faster than unique).
            for j in np.flatnonzero(np.bincount(window[mask], minlength=1)[1:]):
                occluders[j].add(k)
            window[mask] = k + 1
        return instance, occluders

    def _render_background(self, bg: _Background, rng: np.random.Generator) -> np.ndarray:
        s, p = self.image_size, bg.params
        xs, ys = self._xs / s, self._ys / s  # in [0, 1)
        if bg.texture == "noise":
            t = np.clip(rng.standard_normal((s, s), dtype=np.float32) * 0.5, -1, 1)
        elif bg.texture == "clouds":
            t = self._upsample @ p["coarse"] @ self._upsample.T
        elif bg.texture == "gradient":
            a = np.deg2rad(p["angle"])
            t = (
                (np.cos(a) * (xs - 0.5) + np.sin(a) * (ys - 0.5))
                * 2.0
                / (abs(np.cos(a)) + abs(np.sin(a)))
            )
        elif bg.texture == "stripes":
            proj = {
                "horizontal": ys + 0 * xs,
                "vertical": xs + 0 * ys,
                "diagonal": (xs + ys) * np.float32(0.7071),
            }[p["orientation"]]
            t = np.sin(proj * (2 * np.pi / p["period"]) + p["phase"])
        else:  # checker
            c, off = p["cell"], p["offset"]
            t = (np.floor(xs / c + off) + np.floor(ys / c + off)) % 2 * 2.0 - 1.0
        # base + amplitude * t per channel, as one broadcast (H, W, 1) + (3,) computes it
        # (same dtype, same values), but in contiguous passes: 2x faster.
        scaled = bg.amplitude * t
        image = np.empty(scaled.shape + (3,), np.result_type(bg.base, scaled))
        for c in range(3):
            np.add(bg.base[c], scaled, out=image[..., c])
        return np.clip(image, 0, 255).astype(np.uint8)


def _box(mask: np.ndarray) -> np.ndarray:
    """COCO [x, y, w, h] of a mask's pixels; pixel i spans [i, i + 1)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.zeros(4, np.float32)
    return np.array([cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]], np.float32)


# The shapes BPE (input_pipeline/shapes_bpe.json, tokenizer kind 'shapes_bpe') is trained on
# these many train records' three caption fields. Byte-level BPE as CLIP's and GPT-2's: any
# text still encodes (alt-text junk such as "IMG_1059.jpg" falls back to pieces and bytes).
TOKENIZER_VOCAB_SIZE = 1024
TOKENIZER_RECORDS = 5000


def write_tokenizer(
    path: str, vocab_size: int = TOKENIZER_VOCAB_SIZE, num_records: int = TOKENIZER_RECORDS
) -> None:
    """Train the shapes byte-level BPE with the `tokenizers` library and save it to `path`.

    Deterministic: the same records give the same merges. Ids 0 and 1 are <pad> and <eos>.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    source = ShapesSource(split="train", image_size=64, num_records=num_records)
    fields = ("alt_text", "caption", "long_caption")
    texts = [source[i][f] for i in range(num_records) for f in fields]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(path)


def _benchmark(n: int, image_size: int) -> float:
    source = ShapesSource(image_size=image_size)
    source[0]  # warm up numpy's first-call paths
    start = time.perf_counter()
    for i in range(n):
        source[i]
    return n / (time.perf_counter() - start)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", action="store_true", help="measure images/s on one core")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument(
        "--write_tokenizer",
        metavar="PATH",
        help="train the shapes BPE and write it (input_pipeline/shapes_bpe.json is this)",
    )
    args = parser.parse_args()
    if args.write_tokenizer:
        write_tokenizer(args.write_tokenizer)
        print(f"wrote {args.write_tokenizer}")
    if args.bench:
        print(
            f"{_benchmark(args.n, args.image_size):.0f} images/s at {args.image_size} px, one core"
        )
