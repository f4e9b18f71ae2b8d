"""A procedurally drawn world of coloured shapes whose captions carry a strong co-occurrence prior.

Every scene is a pure function of ``(seed, stream, index)``, so any subset of any split can be
regenerated exactly, in any order, in any process. Five object pairs co-occur in training scenes
(P(partner | member) about 0.95, like fork and knife); held-out "broken" scenes show a member
without its partner, which is where a language prior makes a model name what is not there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 255),
    "yellow": (240, 230, 40),
    "purple": (150, 50, 210),
    "orange": (255, 140, 0),
    "white": (245, 245, 245),
    "cyan": (40, 230, 230),
    "pink": (255, 120, 200),
    "brown": (150, 90, 40),
}

# Shape words and the other words a caption may use for them (CHAIR counts either).
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross",),
    "ring": ("ring", "hoop"),
    "diamond": ("diamond",),
    "hexagon": ("hexagon",),
    "bar": ("bar", "stick"),
    "arrow": ("arrow",),
}

# 20 classes, each a unique (colour, shape); every shape and every colour appears twice, so the
# model must bind colour to shape. The first ten form five co-occurring pairs.
CLASSES: tuple[tuple[str, str], ...] = (
    ("red", "star"), ("blue", "ring"),
    ("green", "cross"), ("yellow", "square"),
    ("white", "circle"), ("purple", "triangle"),
    ("orange", "diamond"), ("cyan", "hexagon"),
    ("pink", "bar"), ("brown", "arrow"),
    ("blue", "star"), ("red", "ring"),
    ("yellow", "cross"), ("green", "square"),
    ("purple", "circle"), ("white", "triangle"),
    ("cyan", "diamond"), ("orange", "hexagon"),
    ("brown", "bar"), ("pink", "arrow"),
)
PAIRS: tuple[tuple[int, int], ...] = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
# Objects that appear in many training scenes, so that the POPE "popular" split has teeth.
POPULAR: tuple[int, ...] = (10, 13, 15)

CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for c, s in CLASSES)


def class_synonyms(cls: int) -> tuple[str, ...]:
    """Every phrase that names class ``cls`` ("white circle", "white disc")."""
    colour, shape = CLASSES[cls]
    return tuple(f"{colour} {word}" for word in SHAPE_SYNONYMS[shape])


def partner_of(cls: int) -> int | None:
    """The class that co-occurs with ``cls`` in training, or None for an unpaired class."""
    for a, b in PAIRS:
        if cls == a:
            return b
        if cls == b:
            return a
    return None


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the scene distribution (defaults are the shipped world)."""

    pair_prob: float = 0.94
    """Probability that a drawn pair member brings its partner into a training scene."""
    near_prob: float = 0.8
    """Probability that an added partner is placed next to its mate."""
    hidden_prob: float = 0.3
    """Probability that a partner placed next to its mate is half hidden behind it."""
    popular_weight: float = 3.0
    """Sampling weight of the POPULAR classes relative to 1.0 for the others."""
    min_objects: int = 1
    max_objects: int = 5
    min_size: int = 12
    max_size: int = 22

    def __post_init__(self) -> None:
        for name in ("pair_prob", "near_prob", "hidden_prob"):
            value = getattr(self, name)
            if not 0 <= value <= 1:  # nan fails too
                raise ValueError(f"WorldConfig.{name} must be a probability in [0, 1], got "
                                 f"{value}")
        if not (1 <= self.min_objects <= self.max_objects and 1 <= self.min_size <= self.max_size):
            raise ValueError("WorldConfig needs 1 <= min_objects <= max_objects and "
                             f"1 <= min_size <= max_size, got {self}")


@dataclass(frozen=True)
class Obj:
    cls: int
    x: int
    y: int
    size: int
    angle: float
    """Small tilt (radians) around the shape's upright orientation."""


@dataclass(frozen=True)
class Scene:
    """One scene: its objects (at most one per class) and whether a pair was deliberately broken."""

    objects: tuple[Obj, ...]
    broken_pair: bool = False

    @property
    def classes(self) -> tuple[int, ...]:
        return tuple(sorted(o.cls for o in self.objects))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(CLASS_NAMES[c] for c in self.classes)


@dataclass
class RenderedScene:
    scene: Scene
    image: Image.Image
    masks: np.ndarray = field(repr=False)
    """bool [n_classes, H, W]: which pixels each class covers (all False for absent classes)."""


STREAM_TRAIN = 0
STREAM_HELDOUT = 1
STREAM_PAIRS = 2  # image-caption pairs for concept spaces, apart from the toy models' own data


def scene_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator behind scene ``index`` of ``stream``; independent of every other scene."""
    return np.random.default_rng([seed, stream, index])


def _class_weights(cfg: WorldConfig) -> np.ndarray:
    w = np.ones(len(CLASSES))
    w[list(POPULAR)] = cfg.popular_weight
    return w


def sample_scene(rng: np.random.Generator, cfg: WorldConfig = WorldConfig(),
                 broken: bool = False) -> Scene:
    """Draw a scene. ``broken=True`` puts one member of two pairs in and their partners out."""
    weights = _class_weights(cfg)
    target = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    chosen: list[int] = []
    anchors: dict[int, int] = {}  # partner class -> class it should be placed near
    banned: set[int] = set()
    if broken:  # two pairs, each shown by one member only
        for pair in rng.choice(len(PAIRS), size=2, replace=False):
            a, b = PAIRS[int(pair)]
            member, partner = (a, b) if rng.random() < 0.5 else (b, a)
            chosen.append(member)
            banned.add(partner)
    while len(chosen) < target:
        free = [c for c in range(len(CLASSES)) if c not in chosen and c not in banned]
        p = weights[free] / weights[free].sum()
        c = int(rng.choice(free, p=p))
        chosen.append(c)
        mate = partner_of(c)
        if (mate is not None and mate not in chosen and mate not in banned
                and rng.random() < cfg.pair_prob):
            if len(chosen) < cfg.max_objects:
                chosen.append(mate)
                anchors[mate] = c
        elif mate is not None and mate not in chosen:
            banned.add(mate)  # this member stays alone: do not let the filler draw its partner
    objects = _place(rng, chosen, anchors, cfg)
    return Scene(objects=tuple(objects), broken_pair=broken)


def _place(rng: np.random.Generator, classes: list[int], anchors: dict[int, int],
           cfg: WorldConfig) -> list[Obj]:
    """Positions with little overlap, except partners placed by their mates: with probability
    ``cfg.hidden_prob`` such a partner is tucked half behind its mate (drawn first, still
    captioned), the way real annotations name the knife half hidden under the plate."""
    placed: dict[int, Obj] = {}
    behind: list[int] = []
    for c in classes:
        size = int(rng.integers(cfg.min_size, cfg.max_size + 1))
        best, best_overlap = None, math.inf
        near = anchors.get(c) in placed and rng.random() < cfg.near_prob
        hidden = near and rng.random() < cfg.hidden_prob
        for _ in range(1 if hidden else 40):
            if near:
                mate = placed[anchors[c]]
                ang = rng.uniform(0, 2 * math.pi)
                reach = (mate.size + size) / 2
                dist = reach * rng.uniform(0.3, 0.6) if hidden else reach + rng.uniform(0, 4)
                x, y = mate.x + dist * math.cos(ang), mate.y + dist * math.sin(ang)
            else:
                x, y = rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE)
            half = size / 2
            x = float(np.clip(x, half, IMAGE_SIZE - half))
            y = float(np.clip(y, half, IMAGE_SIZE - half))
            overlap = sum(
                max(0.0, (o.size + size) / 2 - max(abs(o.x - x), abs(o.y - y)))
                for o in placed.values()
            )
            if overlap < best_overlap:
                best, best_overlap = (x, y), overlap
            if overlap == 0:
                break
        assert best is not None
        placed[c] = Obj(cls=c, x=round(best[0]), y=round(best[1]), size=size,
                        angle=float(rng.uniform(-0.15, 0.15)))
        if hidden:
            behind.append(c)
    return [placed[c] for c in behind] + [o for c, o in placed.items() if c not in behind]


def _polygon(n: int, cx: float, cy: float, r: float, angle: float,
             inner: float | None = None) -> list[tuple[float, float]]:
    pts = []
    steps = n * 2 if inner else n
    for i in range(steps):
        rad = r if (inner is None or i % 2 == 0) else r * inner
        a = angle + 2 * math.pi * i / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


# Each shape keeps its upright orientation (up to the object's small tilt): at 12-22 px a freely
# rotated square is a diamond and a rotated bar an arrow, which made classes ambiguous.
BASE_ANGLE = {"square": math.pi / 4, "triangle": -math.pi / 2, "star": -math.pi / 2}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, o: Obj, fill) -> None:
    cx, cy, r = o.x, o.y, o.size / 2
    a = o.angle + BASE_ANGLE.get(shape, 0.0)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r / 2.5)))
    elif shape == "square":
        draw.polygon(_polygon(4, cx, cy, r * 1.2, a), fill=fill)
    elif shape == "diamond":
        pts = _polygon(4, cx, cy, r, a)
        draw.polygon([(cx + (px - cx) * (0.6 if i % 2 else 1.0),
                       cy + (py - cy) * (0.6 if i % 2 else 1.0)) for i, (px, py) in enumerate(pts)],
                     fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(3, cx, cy, r * 1.1, a), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(6, cx, cy, r, a), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(5, cx, cy, r * 1.15, a, inner=0.42), fill=fill)
    elif shape == "cross":
        for rot in (a, a + math.pi / 2):
            dx, dy = math.cos(rot), math.sin(rot)
            w = r * 0.32
            draw.polygon([(cx + dx * r - dy * w, cy + dy * r + dx * w),
                          (cx + dx * r + dy * w, cy + dy * r - dx * w),
                          (cx - dx * r + dy * w, cy - dy * r - dx * w),
                          (cx - dx * r - dy * w, cy - dy * r + dx * w)], fill=fill)
    elif shape == "bar":
        dx, dy = math.cos(a), math.sin(a)
        w = r * 0.28
        draw.polygon([(cx + dx * r - dy * w, cy + dy * r + dx * w),
                      (cx + dx * r + dy * w, cy + dy * r - dx * w),
                      (cx - dx * r + dy * w, cy - dy * r - dx * w),
                      (cx - dx * r - dy * w, cy - dy * r + dx * w)], fill=fill)
    elif shape == "arrow":
        dx, dy = math.cos(a), math.sin(a)
        w = r * 0.22
        tip = (cx + dx * r, cy + dy * r)
        base = (cx + dx * r * 0.1, cy + dy * r * 0.1)
        draw.polygon([tip, (base[0] - dy * r * 0.6, base[1] + dx * r * 0.6),
                      (base[0] + dy * r * 0.6, base[1] - dx * r * 0.6)], fill=fill)
        draw.polygon([(base[0] - dy * w, base[1] + dx * w), (base[0] + dy * w, base[1] - dx * w),
                      (cx - dx * r + dy * w, cy - dy * r - dx * w),
                      (cx - dx * r - dy * w, cy - dy * r + dx * w)], fill=fill)
    else:  # pragma: no cover - CLASSES only names the shapes above
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, rng: np.random.Generator) -> RenderedScene:
    """Draw ``scene`` on a dark noisy background; also return each class's pixel mask."""
    base = rng.integers(0, 40, size=3)
    noise = rng.normal(0, 8, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    canvas = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    masks = np.zeros((len(CLASSES), IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for o in scene.objects:  # later objects cover earlier ones, masks follow
        colour, shape = CLASSES[o.cls]
        jitter = rng.integers(-20, 21, size=3)
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
        _draw_shape(draw, shape, o, fill)
        mask_img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        _draw_shape(ImageDraw.Draw(mask_img), shape, o, 255)
        m = np.asarray(mask_img) > 0
        masks[:, m] = False
        masks[o.cls] = m
    return RenderedScene(scene=scene, image=image, masks=masks)


def make_scene(seed: int, stream: int, index: int, cfg: WorldConfig = WorldConfig(),
               broken: bool = False) -> RenderedScene:
    """Scene ``index`` of ``stream`` under ``seed``: sampled and rendered from its own generator."""
    rng = scene_rng(seed, stream, index)
    return render(sample_scene(rng, cfg, broken=broken), rng)


def heldout_scenes(seed: int, n: int, cfg: WorldConfig = WorldConfig()) -> list[RenderedScene]:
    """The held-out evaluation set of ``seed``: every odd scene breaks two pairs (the probe of
    hallucination); even scenes are drawn like the training scenes (the check on ordinary ones)."""
    return [make_scene(seed, STREAM_HELDOUT, i, cfg, broken=bool(i % 2)) for i in range(n)]
