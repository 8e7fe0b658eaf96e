"""Synthetic COCO-format detection data: the built-in dataset that needs no download.

Each image shows a few of 8 shape classes (the class is the SHAPE; colours come from one palette
shared by all classes) at widely varying scales and aspect ratios, rotated, overlapping and
partly occluding each other, on a textured, cluttered background (gradients, low-frequency
noise, pixel noise, random lines and soft blobs that are not class shapes). About 3% of the
images hold no object.

Boxes are tight to the VISIBLE pixels: each object's mask is rendered, later objects occlude
earlier ones, and the box is the extent of what remains. An object is placed only if it leaves
every earlier object at least half visible (and at least ``MIN_VISIBLE_PIXELS``), so every
painted shape is annotated and no annotation is a small fragment. ``area`` is the visible
pixel count.

Everything about image ``i`` of a split comes from one RNG seeded by ``(seed, split, i)``, so the
files are identical whatever the number of worker processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from drcnn.errors import DrcnnError
from drcnn.io import atomic_write_json

SHAPES = ("circle", "triangle", "square", "star", "cross", "ring", "hexagon", "crescent")
# COCO-style non-contiguous category ids 1, 3, ..., 15 (so code cannot confuse ids and labels).
SYNTHETIC_CATEGORIES = [
    {"id": 2 * i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)
]
SPLITS = ("train", "val")

# Saturated colours shared by every class; backgrounds are muted so objects stand out.
PALETTE = np.array(
    [
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 250, 250),
        (20, 20, 20),
        (170, 110, 40),
    ],
    dtype=np.float32,
)

EMPTY_IMAGE_PROB = 0.03
MAX_OBJECTS = 8
MIN_EXTENT = 8  # smallest object extent in pixels (before stretching)
MAX_EXTENT_FRACTION = 0.75  # largest object extent as a fraction of the image side
MAX_ASPECT = 2.5  # stretch: width / height in [1 / MAX_ASPECT, MAX_ASPECT]
MIN_VISIBLE_FRACTION = 0.5
MIN_VISIBLE_PIXELS = 16
# Written to each annotation file's info.version; change it with anything that changes the
# generated files, so that an existing dataset of the old generator is not taken for a new one.
GENERATOR_VERSION = "1"
PLACEMENT_TRIES = 4  # attempts to place each object before giving up on it
PNG_COMPRESS_LEVEL = 1  # fast; the images are noisy anyway


def _regular_polygon(n: int, radius: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    points = _regular_polygon(10)
    points[1::2] *= 0.42
    return points


def _cross(arm: float = 1 / 3) -> np.ndarray:
    a = arm
    outline = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a)]
    outline += [(a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]
    return np.array(outline, dtype=np.float64)


# Each shape is a list of (polygon in the unit square [-1, 1]^2, fill) layers drawn in order;
# fill 0 cuts a hole (ring) or a bite (crescent).
_CIRCLE = _regular_polygon(48)
SHAPE_LAYERS: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_CIRCLE, 1)],
    "triangle": [(_regular_polygon(3) + np.array([0.0, 0.25]), 1)],  # centred vertically
    "square": [(np.array([(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]), 1)],
    "star": [(_star(), 1)],
    "cross": [(_cross(), 1)],
    "ring": [(_CIRCLE, 1), (_CIRCLE * 0.55, 0)],
    "hexagon": [(_regular_polygon(6, phase=0.0), 1)],
    "crescent": [(_CIRCLE, 1), (_CIRCLE * 0.85 + np.array([0.45, -0.1]), 0)],
}


@dataclass(frozen=True)
class ShapePose:
    """Where and how a shape is drawn: centre, half-extents (stretch) and rotation (radians)."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float


def shape_outline(shape: str, pose: ShapePose) -> list[tuple[np.ndarray, int]]:
    """The shape's polygon layers in image pixels: stretch by (rx, ry), rotate, then move."""
    cos, sin = np.cos(pose.angle), np.sin(pose.angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    centre = np.array([pose.cx, pose.cy])
    return [
        ((points * np.array([pose.rx, pose.ry])) @ rotation.T + centre, fill)
        for points, fill in SHAPE_LAYERS[shape]
    ]


def render_mask(shape: str, pose: ShapePose, size: int) -> np.ndarray:
    """Boolean ``(size, size)`` mask of one shape (PIL polygon fill, no anti-aliasing)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for points, fill in shape_outline(shape, pose):
        draw.polygon([tuple(p) for p in points.tolist()], fill=fill)
    return np.asarray(canvas, dtype=bool)


def visible_parts(label_map: np.ndarray, num_objects: int) -> list[tuple[list[int], int]]:
    """For objects ``1..num_objects`` of a label map (0 = background, later painted over
    earlier): the COCO box ``[x, y, w, h]`` of each object's visible pixels and their count.
    An object with no visible pixel gets ``([0, 0, 0, 0], 0)``."""
    parts = []
    for index in range(1, num_objects + 1):
        ys, xs = np.nonzero(label_map == index)
        if len(xs) == 0:
            parts.append(([0, 0, 0, 0], 0))
            continue
        x0, y0 = int(xs.min()), int(ys.min())
        parts.append(([x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1], len(xs)))
    return parts


def occlusion_ok(label_map: np.ndarray, full_areas: list[int]) -> bool:
    """True if every object keeps enough of its own pixels visible (see module docstring)."""
    counts = np.bincount(label_map.ravel(), minlength=len(full_areas) + 1)[1:]
    need = np.maximum(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * np.asarray(full_areas))
    return bool(np.all(counts >= need))


def _random_pose(rng: np.random.Generator, size: int) -> ShapePose:
    """A pose with log-uniform extent, log-uniform stretch and uniform rotation, fully inside."""
    extent = np.exp(rng.uniform(np.log(MIN_EXTENT), np.log(MAX_EXTENT_FRACTION * size)))
    aspect = np.exp(rng.uniform(-np.log(MAX_ASPECT), np.log(MAX_ASPECT)))
    rx, ry = extent / 2 * np.sqrt(aspect), extent / 2 / np.sqrt(aspect)
    angle = rng.uniform(0, 2 * np.pi)
    # half-extent of the rotated ellipse/box around the centre, to keep the shape in the image
    hx = np.hypot(rx * np.cos(angle), ry * np.sin(angle)) * 1.05
    hy = np.hypot(rx * np.sin(angle), ry * np.cos(angle)) * 1.05
    margin_x, margin_y = min(hx, size / 2 - 1), min(hy, size / 2 - 1)
    cx = rng.uniform(margin_x, size - 1 - margin_x)
    cy = rng.uniform(margin_y, size - 1 - margin_y)
    return ShapePose(float(cx), float(cy), float(rx), float(ry), float(angle))


def _low_frequency(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Smooth random field in [-1, 1]: a small random grid upsampled bilinearly."""
    grid = rng.integers(0, 256, size=(cells, cells, channels), dtype=np.uint8)
    mode = "RGB" if channels == 3 else "L"
    image = Image.fromarray(grid.squeeze(), mode).resize((size, size), Image.BILINEAR)
    field = np.asarray(image, dtype=np.float32).reshape(size, size, channels)
    return field / 127.5 - 1


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted gradient + low-frequency colour noise, float RGB ``(size, size, 3)`` in 0..255."""
    start, end = rng.uniform(50, 200, size=(2, 3)).astype(np.float32)
    direction = rng.normal(size=2).astype(np.float32)
    steps = np.arange(size, dtype=np.float32) / size
    ramp = direction[0] * steps[None, :] + direction[1] * steps[:, None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    image = start + ramp[..., None] * (end - start)
    image += rng.uniform(10, 40) * _low_frequency(rng, size, int(rng.integers(3, 9)), 3)
    return image


def _add_clutter(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Random lines and soft (blurred) blobs: distractors that are not class shapes."""
    size = image.shape[0]
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 10))):
        points = rng.uniform(0, size, size=(int(rng.integers(2, 5)), 2))
        colour = tuple(int(c) for c in PALETTE[rng.integers(len(PALETTE))])
        draw.line([tuple(p) for p in points.tolist()], fill=colour, width=int(rng.integers(1, 4)))
    blobs = Image.new("L", (size, size), 0)
    blob_draw = ImageDraw.Draw(blobs)
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(0, size, size=2)
        r = rng.uniform(0.05, 0.2) * size
        blob_draw.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.integers(80, 200)))
    alpha = np.asarray(blobs.filter(ImageFilter.GaussianBlur(size / 25)), np.float32)[..., None]
    tint = PALETTE[rng.integers(len(PALETTE))]
    out = np.asarray(canvas, dtype=np.float32)
    return out + alpha / 255 * (tint - out)


@dataclass
class Scene:
    """One rendered image: pixels, the label map (object ``i`` = value ``i + 1``), the shapes
    and poses as placed, and the annotations (category id, visible box, visible area), all in
    painting order."""

    image: np.ndarray
    label_map: np.ndarray
    placed: list[tuple[str, ShapePose]]
    objects: list[dict]


def _place_objects(
    rng: np.random.Generator, size: int
) -> tuple[list[tuple[str, ShapePose]], np.ndarray]:
    """Choose shapes and poses; accept each only if all earlier objects stay visible enough."""
    label_map = np.zeros((size, size), dtype=np.int16)
    placed: list[tuple[str, ShapePose]] = []
    full_areas: list[int] = []
    num_objects = 0 if rng.random() < EMPTY_IMAGE_PROB else int(rng.integers(1, MAX_OBJECTS + 1))
    for _ in range(num_objects):
        shape = SHAPES[rng.integers(len(SHAPES))]
        for _ in range(PLACEMENT_TRIES):
            pose = _random_pose(rng, size)
            mask = render_mask(shape, pose, size)
            area = int(mask.sum())
            if area < MIN_VISIBLE_PIXELS:
                continue
            candidate = label_map.copy()
            candidate[mask] = len(placed) + 1
            if occlusion_ok(candidate, [*full_areas, area]):
                label_map = candidate
                placed.append((shape, pose))
                full_areas.append(area)
                break
    return placed, label_map


def render_scene(rng: np.random.Generator, size: int) -> Scene:
    """Background, clutter, then the objects painted in order, then pixel noise."""
    image = _add_clutter(rng, _background(rng, size))
    placed, label_map = _place_objects(rng, size)
    shading = _low_frequency(rng, size, 4, 1)
    category = {c["name"]: c["id"] for c in SYNTHETIC_CATEGORIES}
    objects = []
    for index, ((shape, _), (bbox, area)) in enumerate(
        zip(placed, visible_parts(label_map, len(placed)), strict=True)
    ):
        colour = PALETTE[rng.integers(len(PALETTE))] * rng.uniform(0.75, 1.0)
        visible = label_map == index + 1
        image[visible] = colour * (1 + rng.uniform(0.05, 0.2) * shading[visible])
        objects.append({"category_id": category[shape], "bbox": bbox, "area": area})
    image += rng.uniform(2, 10) * rng.standard_normal(image.shape, dtype=np.float32)
    return Scene(np.clip(image, 0, 255).astype(np.uint8), label_map, placed, objects)


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The RNG of image ``index`` of ``split``: independent of worker count and order."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _make_image(job: tuple[Path, str, int, int, int]) -> tuple[dict, list[dict]]:
    """Worker: render image ``index`` of ``split``, save its PNG, return (image entry, anns)."""
    out, split, index, seed, size = job
    scene = render_scene(image_rng(seed, split, index), size)
    file_name = f"{index:06d}.png"
    Image.fromarray(scene.image).save(out / split / file_name, compress_level=PNG_COMPRESS_LEVEL)
    image_id = index + 1
    entry = {"id": image_id, "file_name": file_name, "width": size, "height": size}
    anns = [{**obj, "image_id": image_id, "iscrowd": 0} for obj in scene.objects]
    return entry, anns


def _coco_file(split: str, results: list[tuple[dict, list[dict]]], seed: int) -> dict:
    """The COCO instances dict of one split; annotation ids run 1.. in image order."""
    images, annotations = [], []
    for entry, anns in results:
        images.append(entry)
        annotations.extend({"id": len(annotations) + 1, **ann} for ann in anns)
    info = {
        "description": f"drcnn synthetic shapes ({split})",
        "seed": seed,
        "version": GENERATOR_VERSION,
    }
    return {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": SYNTHETIC_CATEGORIES,
    }


def size_range_counts(annotations: list[dict]) -> dict[str, int]:
    """How many boxes fall in COCO's small (< 32^2), medium and large (> 96^2) area ranges."""
    areas = np.array([a["area"] for a in annotations], dtype=np.float64)
    return {
        "small": int((areas < 32**2).sum()),
        "medium": int(((areas >= 32**2) & (areas <= 96**2)).sum()),
        "large": int((areas > 96**2).sum()),
    }


def _run_jobs(jobs: list, workers: int) -> Iterator[tuple[dict, list[dict]]]:
    """Results in job order, from a process pool when ``workers > 1``."""
    from tqdm import tqdm

    if workers <= 1:
        yield from tqdm(map(_make_image, jobs), total=len(jobs), disable=None, desc="synth")
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        chunk = max(1, min(32, len(jobs) // (4 * workers)))
        results = pool.imap(_make_image, jobs, chunksize=chunk)
        yield from tqdm(results, total=len(jobs), disable=None, desc="synth")


def _check_args(num_train: int, num_val: int, size: int, workers: int | None) -> None:
    if num_train < 0 or num_val < 0:
        raise DrcnnError("synthetic data: --num-train/--num-val must be >= 0")
    if size < 64:
        raise DrcnnError(f"synthetic data: --size must be at least 64 pixels, got {size}")
    if workers is not None and workers < 1:
        raise DrcnnError(f"synthetic data: --workers must be >= 1, got {workers}")


def annotation_file(root: Path, split: str) -> Path:
    """Where a split's COCO annotation file lives under a dataset root."""
    return root / "annotations" / f"instances_{split}.json"


def generate_synthetic_coco(
    out: str | Path,
    num_train: int,
    num_val: int,
    seed: int = 0,
    size: int = 256,
    workers: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Write ``out/{train,val}/*.png`` and ``out/annotations/instances_{train,val}.json``.

    ``workers=None`` uses every CPU. The annotation files are written last (atomically), so
    their presence means the split is complete. A folder that already holds an annotation file
    is a dataset somebody may be using: it is refused unless ``overwrite``, which removes the
    old annotation files first, so that an interrupted regeneration reads as incomplete rather
    than as the old dataset. Returns statistics per split plus the generation speed.
    """
    _check_args(num_train, num_val, size, workers)
    out = Path(out)
    existing = [path for split in SPLITS if (path := annotation_file(out, split)).exists()]
    if existing and not overwrite:
        raise DrcnnError(
            f"synthetic data: {out} already holds a dataset ({existing[0]}); choose another "
            "--out, or pass --force to replace it"
        )
    for path in existing:
        path.unlink()
    workers = workers or os.cpu_count() or 1
    stats: dict = {"seed": seed, "size": size, "workers": workers}
    start = time.perf_counter()
    for split, count in zip(SPLITS, (num_train, num_val), strict=True):
        (out / split).mkdir(parents=True, exist_ok=True)
        jobs = [(out, split, index, seed, size) for index in range(count)]
        coco = _coco_file(split, list(_run_jobs(jobs, min(workers, max(count, 1)))), seed)
        atomic_write_json(annotation_file(out, split), coco, indent=None)
        stats[split] = {
            "images": count,
            "annotations": len(coco["annotations"]),
            "empty_images": count - len({a["image_id"] for a in coco["annotations"]}),
            **size_range_counts(coco["annotations"]),
        }
    seconds = time.perf_counter() - start
    stats["seconds"] = seconds
    stats["images_per_s"] = (num_train + num_val) / seconds if seconds > 0 else 0.0
    return stats


def synthetic_dataset_exists(root: str | Path) -> bool:
    """Whether both splits' annotation files exist under ``root`` (written last, so complete)."""
    return all(annotation_file(Path(root), split).is_file() for split in SPLITS)


def generated_settings(root: Path) -> dict[str, int | str]:
    """``num_train``, ``num_val``, ``seed``, ``size`` and ``generator_version`` of the dataset
    generated under ``root``, read back from its annotation files (image counts, ``info``, the
    images' width)."""
    settings: dict[str, int | str] = {}
    for split in SPLITS:
        path = annotation_file(root, split)
        try:
            coco = json.loads(path.read_text())
            info, images = coco["info"], coco["images"]
            settings["seed"], settings["generator_version"] = info["seed"], info["version"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DrcnnError(
                f"synthetic dataset {root}: {path} is not an annotation file of drcnn's "
                f"generator (info.seed, info.version and images expected): {exc}"
            ) from exc
        settings[f"num_{split}"] = len(images)
        if images:
            settings["size"] = images[0]["width"]
    return settings


def ensure_synthetic_dataset(
    root: str | Path,
    num_train: int,
    num_val: int,
    seed: int = 0,
    size: int = 256,
    workers: int | None = None,
) -> Path:
    """Generate the dataset under ``root`` unless both annotation files already exist; an
    existing one must have been generated with these settings, by this generator version.

    A folder reused silently would train and test on other data than the spec says (another
    size, seed or number of images) and report its numbers as the spec's.
    """
    root = Path(root)
    if not synthetic_dataset_exists(root):
        generate_synthetic_coco(root, num_train, num_val, seed, size, workers, overwrite=True)
        return root
    wanted = {
        "num_train": num_train,
        "num_val": num_val,
        "seed": seed,
        "size": size,
        "generator_version": GENERATOR_VERSION,
    }
    found = generated_settings(root)
    differ = [key for key, value in wanted.items() if found.get(key, value) != value]
    if differ:
        have = ", ".join(f"{key}={found[key]}" for key in differ)
        asked = ", ".join(f"{key}={wanted[key]}" for key in differ)
        raise DrcnnError(
            f"synthetic dataset {root}: generated with {have}, but {asked} was asked for; "
            "use another root, or delete this one to regenerate it"
        )
    return root


def describe(stats: dict) -> str:
    """A short human-readable summary of :func:`generate_synthetic_coco`'s statistics."""
    lines = [
        f"{'split':<6} {'images':>7} {'boxes':>7} {'empty':>6} {'small':>6} "
        f"{'medium':>7} {'large':>6}"
    ]
    for split in SPLITS:
        s = stats[split]
        lines.append(
            f"{split:<6} {s['images']:>7} {s['annotations']:>7} {s['empty_images']:>6} "
            f"{s['small']:>6} {s['medium']:>7} {s['large']:>6}"
        )
    lines.append(
        f"{stats['seconds']:.1f} s, {stats['images_per_s']:.0f} images/s "
        f"({stats['workers']} workers)"
    )
    return "\n".join(lines)
