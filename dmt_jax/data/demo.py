"""A small generated image-folder dataset for the demo run and the tests.

Ten procedural texture classes (stripes at three orientations, checkerboards, rings, blobs, ...).
Colours, frequency, phase, position, orientation and noise are random per image, so the class is
in the structure of the image, not in its colours or exact pixels: a k-NN on raw pixels does
poorly, a k-NN on features that capture texture and shape does well.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import tensorflow as tf

from dmt_jax import storage
from dmt_jax.data.sources import DataError
from dmt_jax.progress import Progress

DEMO_SEED = 20240101
_MARKER = "demo.json"


def _rotated_coordinates(size, rng, angle_deg, jitter_deg=12.0):
    """Pixel coordinates in [-1, 1], rotated by angle +- jitter about a random centre."""
    theta = np.deg2rad(angle_deg + rng.uniform(-jitter_deg, jitter_deg))
    y, x = np.mgrid[0:size, 0:size] / (size - 1) * 2.0 - 1.0
    x, y = x - rng.uniform(-0.3, 0.3), y - rng.uniform(-0.3, 0.3)
    return x * np.cos(theta) + y * np.sin(theta), -x * np.sin(theta) + y * np.cos(theta)


def _stripes(angle):
    def pattern(size, rng):
        u, _ = _rotated_coordinates(size, rng, angle)
        return 0.5 + 0.5 * np.sin(np.pi * rng.uniform(3.0, 6.0) * u + rng.uniform(0, 2 * np.pi))

    return pattern


def _checkerboard(size, rng):
    u, v = _rotated_coordinates(size, rng, 0.0)
    frequency = np.pi * rng.uniform(2.0, 4.0)
    return (np.sin(frequency * u) * np.sin(frequency * v) > 0).astype(np.float64)


def _rings(size, rng):
    u, v = _rotated_coordinates(size, rng, 0.0, jitter_deg=0.0)
    radius = np.hypot(u, v)
    return 0.5 + 0.5 * np.sin(np.pi * rng.uniform(3.0, 6.0) * radius + rng.uniform(0, 2 * np.pi))


def _spokes(size, rng):
    u, v = _rotated_coordinates(size, rng, rng.uniform(0, 360))
    return 0.5 + 0.5 * np.sin(rng.integers(4, 9) * np.arctan2(v, u))


def _blobs(size, rng):
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    image = np.zeros((size, size))
    for _ in range(rng.integers(2, 5)):
        cx, cy, sigma = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.06, 0.16)
        image = np.maximum(image, np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2)))
    return image


def _gradient(size, rng):
    u, _ = _rotated_coordinates(size, rng, rng.uniform(0, 360), jitter_deg=0.0)
    return np.clip(0.5 + u * rng.uniform(0.4, 0.7), 0.0, 1.0)


def _dots(size, rng):
    u, v = _rotated_coordinates(size, rng, 0.0)
    period = rng.uniform(0.3, 0.5)
    du = (u / period) % 1.0 - 0.5
    dv = (v / period) % 1.0 - 0.5
    return (np.hypot(du, dv) < rng.uniform(0.18, 0.3)).astype(np.float64)


def _grid_lines(size, rng):
    u, v = _rotated_coordinates(size, rng, 0.0)
    period, width = rng.uniform(0.3, 0.5), rng.uniform(0.08, 0.15)
    on_line = (np.abs((u / period) % 1.0 - 0.5) < width) | (np.abs((v / period) % 1.0 - 0.5) < width)
    return on_line.astype(np.float64)


CLASSES = {
    "horizontal_stripes": _stripes(90.0),
    "vertical_stripes": _stripes(0.0),
    "diagonal_stripes": _stripes(45.0),
    "checkerboard": _checkerboard,
    "rings": _rings,
    "blobs": _blobs,
    "gradient": _gradient,
    "dots": _dots,
    "spokes": _spokes,
    "grid_lines": _grid_lines,
}


def render(class_index: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 [size, size, 3] image of the class: two random, well separated colours + noise."""
    pattern = list(CLASSES.values())[class_index](size, rng)
    background = rng.uniform(0, 255, 3)
    direction = rng.normal(size=3)
    foreground = background + direction / np.linalg.norm(direction) * rng.uniform(110, 200)
    foreground = np.clip(foreground, 0, 255)
    image = background + pattern[..., None] * (foreground - background)
    image += rng.normal(0, rng.uniform(4, 14), image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _spec(num_classes, per_class_train, per_class_val, img_size) -> dict:
    return {
        "seed": DEMO_SEED,
        "num_classes": num_classes,
        "per_class_train": per_class_train,
        "per_class_val": per_class_val,
        "img_size": img_size,
    }


def make_demo_dataset(
    root: str | os.PathLike,
    *,
    num_classes: int = 10,
    per_class_train: int = 64,
    per_class_val: int = 16,
    img_size: int = 64,
) -> Path:
    """Write root/{train,val}/<class>/<i>.{jpg,png} (even i JPEG, odd i PNG) once; return root.

    Idempotent and safe under concurrent callers: the dataset is written to a private temporary
    folder and renamed into place, so `root` is either absent or complete.
    """
    if not 1 <= num_classes <= len(CLASSES):
        raise DataError(f"demo num_classes must be in [1, {len(CLASSES)}], got {num_classes}")
    root = Path(storage.resolve(root, "--config.data.demo_root"))
    spec = _spec(num_classes, per_class_train, per_class_val, img_size)
    if _is_complete(root, spec):
        return root
    tmp = root.parent / f".{root.name[:200]}.tmp-{uuid.uuid4().hex}"
    try:
        # A full disk: one line naming the dataset (not a file in its temporary folder), nothing left.
        with _removed_when_stopped(tmp), storage.named_write_errors(root):
            root.parent.mkdir(parents=True, exist_ok=True)
            _write_images(tmp, spec, f"generating the demo dataset in {root}")
            (tmp / _MARKER).write_text(json.dumps(spec, sort_keys=True))
            os.rename(tmp, root)
    except OSError:
        if not _is_complete(root, spec):  # not a lost race with another writer: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write_images(tmp: Path, spec: dict, what: str) -> None:
    splits = [("train", spec["per_class_train"]), ("val", spec["per_class_val"])]
    images = spec["num_classes"] * (spec["per_class_train"] + spec["per_class_val"])
    with Progress(what, total=images, unit="images") as progress:
        _write_splits(tmp, spec, splits, progress)


def _write_splits(tmp: Path, spec: dict, splits, progress: Progress) -> None:
    for split_index, (split, per_class) in enumerate(splits):
        for class_index, class_name in enumerate(list(CLASSES)[: spec["num_classes"]]):
            folder = tmp / split / f"{class_index:02d}_{class_name}"
            folder.mkdir(parents=True)
            rng = np.random.default_rng([DEMO_SEED, split_index, class_index])
            for i in range(per_class):
                image = render(class_index, spec["img_size"], rng)
                if i % 2 == 0:
                    (folder / f"{i:05d}.jpg").write_bytes(tf.io.encode_jpeg(image, quality=90).numpy())
                else:
                    (folder / f"{i:05d}.png").write_bytes(tf.io.encode_png(image).numpy())
            progress.update(per_class)


class _Stopped(BaseException):
    """SIGTERM or SIGINT while the dataset was being written."""


@contextlib.contextmanager
def _removed_when_stopped(tmp: Path):
    """SIGTERM / Ctrl-C during the generation (thousands of files, minutes on a big demo) removes the
    temporary folder, says so in one line and exits (128 + the signal's number, as a shell reports it);
    the next run generates the dataset again. Signals are only caught in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise _Stopped(signum)

    from dmt_jax import parallel

    # Under jax.distributed's preemption service SIGTERM is its (the run then stops at an agreed step).
    caught = (signal.SIGINT,) if parallel.preemption_service_running() else (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, stop) for sig in caught}
    try:
        yield
    except _Stopped as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the clean-up is short: let it finish
        shutil.rmtree(tmp, ignore_errors=True)
        name = signal.Signals(e.args[0]).name
        print(
            f"stopped by {name} while generating the demo dataset: its partial copy {tmp} was removed; "
            "the next run generates it again",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(128 + e.args[0]) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _is_complete(root: Path, spec: dict) -> bool:
    marker = root / _MARKER
    if not marker.exists():
        if root.exists() and any(root.iterdir()):
            raise DataError(f"{root} exists but is not a demo dataset; remove it or choose another demo_root")
        return False
    found = json.loads(marker.read_text())
    if found != spec:
        raise DataError(f"demo dataset at {root} was made with {found}, not {spec}; remove it or change root")
    return True
