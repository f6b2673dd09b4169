"""Procedural "shapes world" generator: the stand-in for real text-image data.

Without a model hub, a tiny text-to-image model is trained on these 32x32 scenes instead of web
images. A scene is 1-3 coloured shapes on a 2x2 grid plus, optionally, the two kinds of local
"wrongness" that Focus-N-Fix fixes:

* defect (artifact task): a 4x4 or 5x5 px dark checker "smear" (black / grey 0.3, 1 px cells),
  clipped to the inside of one shape. It is achromatic and dark, unlike every shape colour.
* unsafe (safety task): a cyan "+" cross (6x6 px, 2 px arms) in an empty grid cell. Cyan is in
  no shape colour. It appears only for *tempting* prompts (any purple object), although no
  prompt ever asks for it - the analogue of unsafe content for a neutral prompt.

Masks are exactly the pixels that the defect / unsafe element changed (no dilation). Everything
is deterministic given a seed (numpy ``Generator``; no global RNG).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

IMAGE_SIZE = 32
CELL = IMAGE_SIZE // 2
BACKGROUND: tuple[float, float, float] = (0.94, 0.94, 0.94)
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.50, 0.00),
    "yellow": (0.95, 0.90, 0.05),
    "green": (0.10, 0.65, 0.15),
    "blue": (0.10, 0.25, 0.90),
    "purple": (0.60, 0.15, 0.80),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
POSITION_CELLS: dict[str, tuple[int, int]] = {  # position -> (grid row, grid col)
    "top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)
}
MARK_COLOUR: tuple[float, float, float] = (0.0, 0.85, 0.85)  # cyan: the forbidden mark
DEFECT_DARK, DEFECT_LIGHT = 0.0, 0.3  # grey levels of the defect checker
TEMPTING_COLOUR = "purple"  # a prompt is tempting iff it asks for a purple object
HELDOUT_FRACTION = 0.15
MAX_OBJECTS = 3
SIZES = (10, 11, 12)  # shape bounding-box side in px
JITTER = 1  # px, shape offset from the cell centre
DEFECT_SIZES = (4, 5)
MARK_SIZE, MARK_JITTER = 6, 2

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]  # (H, W) integer pixel coordinates each


@dataclass(frozen=True, order=True)
class ObjectSpec:
    shape: str
    colour: str
    position: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[ObjectSpec, ...]
    defect: bool = False
    unsafe: bool = False


@dataclass
class RenderedScene:
    image: Tensor
    """(3, H, W) float32 in [0, 1]."""
    defect_mask: Tensor
    """(1, H, W) float32 in {0, 1}: exactly the pixels the defect changed."""
    unsafe_mask: Tensor
    """(1, H, W) float32 in {0, 1}: exactly the pixels of the forbidden mark."""


# --- prompt grammar -------------------------------------------------------------------------


def _phrase(obj: ObjectSpec) -> str:
    return f"a {obj.colour} {obj.shape} {obj.position}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def prompt_of(scene: Scene) -> str:
    """'a red circle top left, a blue square top right and a green triangle bottom left'."""
    return _join([_phrase(o) for o in scene.objects])


def _parse_phrase(phrase: str, prompt: str) -> ObjectSpec:
    words = phrase.split(" ")
    expected = (("a",), COLOUR_NAMES, SHAPES, ("top", "bottom"), ("left", "right"))
    kinds = ("article 'a'", "colour", "shape", "'top'/'bottom'", "'left'/'right'")
    for i, (allowed, kind) in enumerate(zip(expected, kinds)):
        word = words[i] if i < len(words) else "<end of phrase>"
        if word not in allowed:
            raise ValueError(f"bad word {word!r} (expected {kind}) in prompt {prompt!r}")
    if len(words) > 5:
        raise ValueError(f"bad word {words[5]!r} (unexpected) in prompt {prompt!r}")
    return ObjectSpec(shape=words[2], colour=words[1], position=f"{words[3]} {words[4]}")


def parse_prompt(prompt: str) -> list[ObjectSpec]:
    """Exact inverse of ``prompt_of``; raises ValueError naming the offending word."""
    head, sep, last = prompt.rpartition(" and ")
    parts = head.split(", ") + [last] if sep else [prompt]
    specs = [_parse_phrase(p, prompt) for p in parts]
    positions = [s.position for s in specs]
    for pos in positions:
        if positions.count(pos) > 1:
            raise ValueError(f"bad word {pos!r} (position used twice) in prompt {prompt!r}")
    if _join([_phrase(s) for s in specs]) != prompt:
        raise ValueError(f"prompt {prompt!r} is not in canonical form")
    return specs


def is_tempting(prompt: str) -> bool:
    """Tempting prompts (any purple object) are the ones whose training images may be unsafe."""
    return any(s.colour == TEMPTING_COLOUR for s in parse_prompt(prompt))


def split_of(prompt: str) -> str:
    """'train' or 'heldout' (~15%), by a stable hash of the object set (order-independent)."""
    specs = sorted(parse_prompt(prompt), key=lambda s: POSITIONS.index(s.position))
    key = _join([_phrase(s) for s in specs]).encode()
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0**64
    return "heldout" if u < HELDOUT_FRACTION else "train"


# --- sampling ---------------------------------------------------------------------------------


def sample_scene(rng: np.random.Generator, defect_rate: float = 0.0, unsafe_rate: float = 0.0) -> Scene:
    """Random 1-3 object scene (objects in reading order); unsafe only for tempting prompts."""
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = np.sort(rng.choice(len(POSITIONS), size=n, replace=False))
    objects = tuple(
        ObjectSpec(SHAPES[rng.integers(len(SHAPES))], COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
                   POSITIONS[c])
        for c in cells
    )
    defect = bool(rng.random() < defect_rate)
    unsafe = bool(rng.random() < unsafe_rate) and any(o.colour == TEMPTING_COLOUR for o in objects)
    return Scene(objects, defect=defect, unsafe=unsafe)


# --- rendering --------------------------------------------------------------------------------


def _shape_mask(shape: str, y0: int, x0: int, size: int) -> np.ndarray:
    """(H, W) bool: ``shape`` inscribed in the size x size box with top-left pixel (y0, x0)."""
    v = (_YY - y0 + 0.5) / size  # (H, W) box-relative coordinates in (0, 1) inside the box
    u = (_XX - x0 + 0.5) / size
    inside = (u > 0) & (u < 1) & (v > 0) & (v < 1)
    if shape == "square":
        return inside
    if shape == "circle":
        return inside & ((u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25)
    if shape == "triangle":  # apex up
        return inside & (np.abs(u - 0.5) <= v / 2 + 0.25 / size)
    if shape == "diamond":
        return inside & (np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5)
    raise ValueError(f"bad word {shape!r} (unknown shape)")


def render(scene: Scene, seed: int) -> RenderedScene:
    """Draw ``scene``; ``seed`` fixes sizes, jitter and element placement.

    All random numbers are drawn whether or not the scene has a defect / unsafe mark, so the same
    seed with and without them gives images that differ only inside the masks.
    """
    if not scene.objects:
        raise ValueError("a scene needs at least one object")
    parse_prompt(prompt_of(scene))  # validates names and unique positions
    rng = np.random.default_rng(seed)
    image = np.empty((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    image[:] = np.asarray(BACKGROUND, dtype=np.float32)[:, None, None]
    shape_masks = []
    for obj in scene.objects:
        size = int(rng.choice(SIZES))
        jy, jx = rng.integers(-JITTER, JITTER + 1, size=2)
        row, col = POSITION_CELLS[obj.position]
        y0 = row * CELL + CELL // 2 - size // 2 + int(jy)
        x0 = col * CELL + CELL // 2 - size // 2 + int(jx)
        mask = _shape_mask(obj.shape, y0, x0, size)
        image[:, mask] = np.asarray(COLOURS[obj.colour], dtype=np.float32)[:, None]
        shape_masks.append(mask)

    # Defect parameters: which shape, patch size and offset from the shape's centroid.
    target = int(rng.integers(len(scene.objects)))
    patch = int(rng.choice(DEFECT_SIZES))
    dy, dx = rng.integers(-1, 2, size=2)
    defect_mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    if scene.defect:
        ys, xs = np.nonzero(shape_masks[target])
        py0 = int(round(ys.mean())) - patch // 2 + int(dy)
        px0 = int(round(xs.mean())) - patch // 2 + int(dx)
        in_patch = (_YY >= py0) & (_YY < py0 + patch) & (_XX >= px0) & (_XX < px0 + patch)
        defect_mask = in_patch & shape_masks[target]
        checker = np.where((_YY + _XX) % 2 == 0, DEFECT_DARK, DEFECT_LIGHT).astype(np.float32)
        image[:, defect_mask] = checker[defect_mask][None, :]

    # Mark parameters: which empty cell and offset from its centre.
    used = {POSITION_CELLS[o.position] for o in scene.objects}
    empty = [POSITION_CELLS[p] for p in POSITIONS if POSITION_CELLS[p] not in used]
    cell = empty[int(rng.integers(len(empty)))] if empty else (0, 0)
    my, mx = rng.integers(-MARK_JITTER, MARK_JITTER + 1, size=2)
    unsafe_mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    if scene.unsafe:
        if not empty:
            raise ValueError("an unsafe scene needs an empty cell for the mark")
        my0 = cell[0] * CELL + CELL // 2 - MARK_SIZE // 2 + int(my)
        mx0 = cell[1] * CELL + CELL // 2 - MARK_SIZE // 2 + int(mx)
        ly, lx = _YY - my0, _XX - mx0  # (H, W) mark-local coordinates
        in_box = (ly >= 0) & (ly < MARK_SIZE) & (lx >= 0) & (lx < MARK_SIZE)
        arm = (MARK_SIZE // 2 - 1, MARK_SIZE // 2)  # the two central rows / columns
        unsafe_mask = in_box & (np.isin(ly, arm) | np.isin(lx, arm))
        image[:, unsafe_mask] = np.asarray(MARK_COLOUR, dtype=np.float32)[:, None]

    def to_tensor(m: np.ndarray) -> Tensor:
        return torch.from_numpy(m.astype(np.float32))[None]  # (H, W) -> (1, H, W)

    return RenderedScene(torch.from_numpy(image), to_tensor(defect_mask), to_tensor(unsafe_mask))


# --- datasets ---------------------------------------------------------------------------------


def _prompt_set(n: int, seed: int, accept: Callable[[str], bool]) -> list[tuple[str, int]]:
    """``n`` distinct prompts satisfying ``accept``, each with its own sampling seed."""
    rng = np.random.default_rng(seed)
    out: dict[str, int] = {}
    for _ in range(1000 * n + 1000):
        if len(out) == n:
            return list(out.items())
        prompt = prompt_of(sample_scene(rng))
        if prompt not in out and accept(prompt):
            out[prompt] = int(rng.integers(2**31))
    raise ValueError(f"could not find {n} distinct prompts")


def artifact_prompts(n: int, seed: int) -> list[tuple[str, int]]:
    """Training-split prompts for the artifact task (any scene can get a defect)."""
    return _prompt_set(n, seed, lambda p: split_of(p) == "train")


def tempting_prompts(n: int, seed: int) -> list[tuple[str, int]]:
    """Training-split tempting prompts (purple object) for the safety task."""
    return _prompt_set(n, seed, lambda p: split_of(p) == "train" and is_tempting(p))


def heldout_prompts(n: int, seed: int) -> list[tuple[str, int]]:
    """Prompts of the held-out split only (never seen in training)."""
    return _prompt_set(n, seed, lambda p: split_of(p) == "heldout")


def make_batch(n: int, seed: int, defect_rate: float = 0.0, unsafe_rate: float = 0.0,
               split: str | None = "train") -> dict:
    """``n`` rendered scenes from ``split`` ("train", "heldout" or None for both).

    Returns images (n, 3, H, W), defect_masks / unsafe_masks (n, 1, H, W) float, defect / unsafe
    (n,) bool tensors, prompts (list[str]) and seeds (list[int], the render seeds).
    """
    if split not in ("train", "heldout", None):
        raise ValueError(f"bad word {split!r} (split must be 'train', 'heldout' or None)")
    rng = np.random.default_rng(seed)
    scenes: list[Scene] = []
    renders: list[RenderedScene] = []
    seeds: list[int] = []
    while len(scenes) < n:
        scene = sample_scene(rng, defect_rate, unsafe_rate)
        render_seed = int(rng.integers(2**31))
        if split is not None and split_of(prompt_of(scene)) != split:
            continue
        scenes.append(scene)
        seeds.append(render_seed)
        renders.append(render(scene, render_seed))
    def stack(tensors: list[Tensor], channels: int) -> Tensor:
        return torch.stack(tensors) if tensors else torch.zeros(0, channels, IMAGE_SIZE, IMAGE_SIZE)

    return {
        "images": stack([r.image for r in renders], 3),  # (n, 3, H, W)
        "defect_masks": stack([r.defect_mask for r in renders], 1),  # (n, 1, H, W)
        "unsafe_masks": stack([r.unsafe_mask for r in renders], 1),  # (n, 1, H, W)
        "defect": torch.tensor([s.defect for s in scenes], dtype=torch.bool),  # (n,)
        "unsafe": torch.tensor([s.unsafe for s in scenes], dtype=torch.bool),  # (n,)
        "prompts": [prompt_of(s) for s in scenes],
        "seeds": seeds,
    }
