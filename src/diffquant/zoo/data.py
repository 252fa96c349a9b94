"""Procedural captioned scenes: the data every mini-zoo model is trained and judged on.

A scene is one or two flat-coloured shapes on a plain background, rendered at 32x32 with 4x
supersampling (soft edges like a real image, no aliasing stairs). The caption names every object's
size, colour, shape and position plus the background, from a few templates with synonyms, so a
model must read the whole caption to draw the scene and the evaluator can score it.

The split is compositional: some (shape, colour, background) triples never occur in training.
Held-out captions contain at least one of them, so they are compositions no model has seen.
Everything is a pure function of a seed (numpy ``Generator``), so data, prompt sets and
training batches are reproducible on any machine.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where it is used: the CLI's --help imports this module and no numpy
    import numpy as np

RESOLUTION = 32
SUPERSAMPLE = 4

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.12, 0.78, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "cyan": (0.10, 0.85, 0.90),
    "magenta": (0.88, 0.12, 0.85),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.06, 0.06, 0.06),
    "gray": (0.50, 0.50, 0.50),
    "white": (0.95, 0.95, 0.95),
}
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
SIZES: dict[str, float] = {"small": 4.0, "large": 7.0}  # radius in pixels at 32x32
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) centre in pixels at 32x32
    "left": (8.0, 16.0),
    "right": (24.0, 16.0),
    "top": (16.0, 8.0),
    "bottom": (16.0, 24.0),
    "centre": (16.0, 16.0),
}
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)
TWO_OBJECT_LAYOUTS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))

# Paraphrase: synonyms and phrase templates (the parser below inverts all of them).
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_PHRASES = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "on the top"),
    "bottom": ("at the bottom", "on the bottom"),
    "centre": ("in the centre", "in the center", "in the middle"),
}
ONE_TEMPLATES = ("a {o1} on a {bg} background", "{o1} {bg} background", "a {bg} background with a {o1}",
                 "an image of a {o1} on a {bg} background")
TWO_TEMPLATES = ("a {o1} and a {o2} on a {bg} background", "{o1} and {o2} {bg} background",
                 "a {bg} background with a {o1} and a {o2}")
_WORD_TO_SIZE = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
_WORD_TO_POSITION = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "centre": "centre",
                     "center": "centre", "middle": "centre"}

# Held-out (shape, colour, background) triples: each shape, colour and background stays common in
# training; only these combinations are new at evaluation time.
HELDOUT_TRIPLES: frozenset[tuple[str, str, str]] = frozenset({
    ("circle", "red", "gray"), ("square", "green", "black"), ("triangle", "blue", "white"),
    ("cross", "yellow", "gray"), ("circle", "cyan", "white"), ("square", "magenta", "gray"),
    ("triangle", "yellow", "black"), ("cross", "red", "white"), ("triangle", "magenta", "gray"),
    ("circle", "blue", "black"),
})


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    jitter: tuple[tuple[float, float], ...] = field(default=(), compare=False)

    @property
    def heldout(self) -> bool:
        """True when any object forms a (shape, colour, background) triple reserved for evaluation."""
        return any((o.shape, o.colour, self.background) in HELDOUT_TRIPLES for o in self.objects)


def vocabulary() -> list[str]:
    """Every word a caption can contain (the tokenizer's vocabulary)."""
    words = set(SHAPES) | set(COLOURS) | set(BACKGROUNDS) | set(_WORD_TO_POSITION)
    words |= {w for ws in SIZE_WORDS.values() for w in ws}
    for text in itertools.chain(ONE_TEMPLATES, TWO_TEMPLATES, *POSITION_PHRASES.values()):
        words |= {w for w in re.findall(r"[a-z]+", text) if w not in ("o", "bg")}
    return sorted(words)


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """Draw one scene from ``split`` ("train": no held-out triple; "heldout": at least one)."""
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"unknown split {split!r}; use 'train', 'heldout' or 'any'")
    while True:
        background = BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))]
        if rng.random() < 0.5:
            positions: tuple[str, ...] = (POSITION_NAMES[rng.integers(len(POSITION_NAMES))],)
        else:
            positions = TWO_OBJECT_LAYOUTS[rng.integers(len(TWO_OBJECT_LAYOUTS))]
        objects = tuple(
            SceneObject(SHAPES[rng.integers(len(SHAPES))], COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
                        SIZE_NAMES[rng.integers(len(SIZE_NAMES))], p)
            for p in positions
        )
        jitter = tuple((float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))) for _ in objects)
        scene = Scene(objects, background, jitter)
        if split == "any" or scene.heldout == (split == "heldout"):
            return scene


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Caption ``scene`` from a random template and synonyms (``rng=None``: the first of each, canonical)."""
    def pick(options):
        return options[0] if rng is None else options[rng.integers(len(options))]

    def phrase(o: SceneObject) -> str:
        return f"{pick(SIZE_WORDS[o.size])} {o.colour} {o.shape} {pick(POSITION_PHRASES[o.position])}"

    objs = list(scene.objects)
    if len(objs) == 2 and rng is not None and rng.random() < 0.5:
        objs.reverse()
    if len(objs) == 1:
        return pick(ONE_TEMPLATES).format(o1=phrase(objs[0]), bg=scene.background)
    return pick(TWO_TEMPLATES).format(o1=phrase(objs[0]), o2=phrase(objs[1]), bg=scene.background)


def parse_caption(text: str) -> Scene:
    """Recover the scene a caption describes (inverse of :func:`caption`); raises ValueError if it cannot."""
    words = re.findall(r"[a-z]+", text.lower())
    objects = []
    for i, w in enumerate(words):
        if w not in SHAPES:
            continue
        if i < 2 or words[i - 1] not in COLOURS or words[i - 2] not in _WORD_TO_SIZE:
            raise ValueError(f"cannot parse object {w!r} in caption {text!r}: expected '<size> <colour> <shape>'")
        position = next((_WORD_TO_POSITION[v] for v in words[i + 1:] if v in _WORD_TO_POSITION), None)
        if position is None:
            raise ValueError(f"no position after {w!r} in caption {text!r}")
        objects.append(SceneObject(w, words[i - 1], _WORD_TO_SIZE[words[i - 2]], position))
    bg = [words[i - 1] for i, w in enumerate(words) if w == "background" and i > 0 and words[i - 1] in BACKGROUNDS]
    if not objects or len(bg) != 1:
        raise ValueError(f"caption {text!r} is not a mini-zoo caption (needs objects and '<colour> background')")
    return Scene(tuple(objects), bg[0])


def _masks(scene: Scene, res: int) -> list[np.ndarray]:
    """Soft coverage masks [res, res] of each object, by supersampled point-in-shape tests."""
    import numpy as np

    ss = res * SUPERSAMPLE
    coords = (np.arange(ss, dtype=np.float32) + 0.5) / SUPERSAMPLE * (32.0 / res)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    masks = []
    for k, o in enumerate(scene.objects):
        cx, cy = POSITIONS[o.position]
        jx, jy = scene.jitter[k] if k < len(scene.jitter) else (0.0, 0.0)
        dx, dy, r = xx - (cx + jx), yy - (cy + jy), SIZES[o.size]
        if o.shape == "circle":
            m = dx * dx + dy * dy <= r * r
        elif o.shape == "square":
            m = np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
        elif o.shape == "triangle":  # pointing up: apex (0, -r), base at y = 0.8 r
            m = (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) * 0.55)
        elif o.shape == "cross":
            a, b = np.abs(dx), np.abs(dy)
            m = ((a <= 0.33 * r) & (b <= r)) | ((b <= 0.33 * r) & (a <= r))
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
        masks.append(m.reshape(res, SUPERSAMPLE, res, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32))
    return masks


def render(scene: Scene, res: int = RESOLUTION) -> np.ndarray:
    """Render ``scene`` to float32 RGB [res, res, 3] in [0, 1]."""
    import numpy as np

    img = np.empty((res, res, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[scene.background]
    for o, m in zip(scene.objects, _masks(scene, res)):
        img = img * (1 - m[..., None]) + np.asarray(COLOURS[o.colour], dtype=np.float32) * m[..., None]
    return img


def make_batch(seed: int, index: int, batch_size: int, split: str = "train") -> tuple[np.ndarray, list[str], list[Scene]]:
    """Batch number ``index`` of the stream for ``seed``: images [B, 3, H, W] in [0, 1], captions, scenes.

    A pure function of (seed, index): a resumed training run sees exactly the batches it would have.
    """
    import numpy as np

    rng = np.random.default_rng([seed, index, {"train": 0, "heldout": 1, "any": 2}[split]])
    scenes = [sample_scene(rng, split) for _ in range(batch_size)]
    captions = [caption(s, rng) for s in scenes]
    images = np.stack([render(s) for s in scenes]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images), captions, scenes


REAL_SEED = 12345  # the stream of real scenes generated samples are compared with (no model trains on it)


def real_scenes(n: int, seed: int = REAL_SEED) -> np.ndarray:
    """``n`` real training-distribution scenes [n, 3, H, W] in [0, 1]: what an unconditional model's samples are
    judged against (``zoo eval mini-ddim``, ``--reference-images zoo:scenes``)."""
    return make_batch(seed, 0, n, split="train")[0]


def _prompt_set(seed: int, split: str, n: int) -> list[str]:
    import numpy as np

    rng = np.random.default_rng([seed, 7])
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        text = caption(sample_scene(rng, split), rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


_CALIBRATION_SIZE = 512
_HELDOUT_SIZE = 512


def calibration_prompts(n: int | None = None) -> list[str]:
    """Built-in calibration prompts: distinct training-distribution captions (fixed order)."""
    prompts = _prompt_set(1001, "train", _CALIBRATION_SIZE)
    return prompts if n is None else prompts[:_check_n(n, _CALIBRATION_SIZE)]


def heldout_prompts(n: int | None = None) -> list[str]:
    """Built-in evaluation prompts: distinct captions of compositions never seen in training."""
    prompts = _prompt_set(2002, "heldout", _HELDOUT_SIZE)
    return prompts if n is None else prompts[:_check_n(n, _HELDOUT_SIZE)]


def _check_n(n: int, limit: int) -> int:
    if not 1 <= n <= limit:
        raise ValueError(f"n={n} is out of range; ask for 1..{limit} prompts")
    return n
