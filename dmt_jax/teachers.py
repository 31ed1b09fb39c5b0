"""Frozen teachers: the spec of a converted checkpoint, loading it, and running several at once.

A converted teacher is a directory written by `dmt-convert` (or `save_teacher`): `spec.json`
(a `TeacherSpec` plus a few derived fields for humans) and `params.safetensors` (float32 arrays
named by their Flax path, e.g. "blocks_0/attn/qkv/kernel"). Nothing here imports torch or
TensorFlow, so a training or benchmark machine needs neither.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dmt_jax import storage
from dmt_jax.errors import UserError
from dmt_jax.models.vit import VARIANTS, ViT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPEC_FILE = "spec.json"
PARAMS_FILE = "params.safetensors"
SPEC_KIND = "dmt_jax.teacher/1"  # marks a directory as a converted teacher


class TeacherFileError(UserError, ValueError):
    """A directory that is not a (valid) converted teacher, or one that may not be written; one line."""


def num_heads_for_width(width: int) -> int:
    """Heads of the standard ViT of this width (ViT-H: 16 heads of 80); otherwise 64 channels per head."""
    for w, _, heads, _ in VARIANTS.values():
        if w == width:
            return heads
    heads = max(1, width // 64)
    while width % heads:  # heads must divide the width; the tensors do not say how many there were
        heads -= 1
    return heads


_POSITIVE_INTS = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "img_size")
_STRINGS = ("format", "variant", "source", "pos_embed_resize")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def spec_problems(spec) -> list[str]:
    """'name: what is wrong' for every field of a TeacherSpec of the wrong type or out of range.

    Only what the fields say about each other; what the tensors hold is checked in load_teacher.
    """
    values = {n: getattr(spec, n) for n in _POSITIVE_INTS}
    bad = {n: v for n, v in values.items() if not _is_int(v) or v < 1}
    problems = [f"{n} must be a positive integer, got {v!r}" for n, v in bad.items()]
    if not _is_int(spec.num_reg_tokens) or spec.num_reg_tokens < 0:
        problems.append(f"num_reg_tokens must be an integer >= 0, got {spec.num_reg_tokens!r}")
    if spec.source_img_size is not None and (not _is_int(spec.source_img_size) or spec.source_img_size <= 0):
        problems.append(f"source_img_size must be a positive integer or null, got {spec.source_img_size!r}")
    flags = {n: getattr(spec, n) for n in ("no_embed_class", "layerscale")}
    problems += [f"{n} must be true or false, got {v!r}" for n, v in flags.items() if not isinstance(v, bool)]
    strings = {n: getattr(spec, n) for n in _STRINGS}
    problems += [f"{n} must be a string, got {v!r}" for n, v in strings.items() if not isinstance(v, str)]
    for name in ("mean", "std"):
        value = getattr(spec, name)
        numbers = isinstance(value, (list, tuple)) and len(value) == 3
        numbers = numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if not numbers or not all(np.isfinite(value)):
            problems.append(f"{name} must be 3 finite numbers (R, G, B), got {value!r}")
        elif name == "std" and min(value) <= 0:
            problems.append(f"std must be > 0 for every channel (it divides the pixels), got {list(value)}")
    if not problems and spec.width % spec.num_heads:
        problems.append(f"num_heads {spec.num_heads} does not divide width {spec.width}")
    if not problems and spec.img_size % spec.patch_size:
        problems.append(f"img_size {spec.img_size} is not a multiple of patch_size {spec.patch_size}")
    return problems


def variant_name(width: int, depth: int, mlp_dim: int, patch_size: int) -> str:
    """'B/16' for a standard shape; otherwise a name that says the shape, e.g. 'w768-d2-m3072/16'."""
    for name, (w, d, _, m) in VARIANTS.items():
        if (w, d, m) == (width, depth, mlp_dim):
            return f"{name}/{patch_size}"
    return f"w{width}-d{depth}-m{mlp_dim}/{patch_size}"


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """Everything needed to rebuild a teacher's ViT and feed it: architecture, input size, normalization."""

    format: str  # mae, mocov3, dino, ibot, dinov2 (or a demo label)
    variant: str  # e.g. "B/16"; descriptive, the fields below are authoritative
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    img_size: int
    num_reg_tokens: int = 0
    no_embed_class: bool = False
    layerscale: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = ""
    source_img_size: int | None = None
    pos_embed_resize: str = "none"

    def __post_init__(self):
        if problems := spec_problems(self):  # a spec.json is untrusted input: refuse it field by field
            raise TeacherFileError(f"spec field {'; spec field '.join(problems)}")
        # JSON gives lists; keep tuples so the spec stays hashable.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_reg_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid**2

    @property
    def architecture(self) -> tuple:
        """Teachers with equal architecture share one compiled ViT (and one vmap in a TeacherStack)."""
        return (self.width, self.depth, self.num_heads, self.mlp_dim, self.patch_size, self.img_size,
                self.num_reg_tokens, self.no_embed_class, self.layerscale)  # fmt: skip

    def model(self, dtype: Any = jnp.float32, attention: str = "auto") -> ViT:
        return ViT(
            width=self.width,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            patch_size=self.patch_size,
            img_size=self.img_size,
            num_reg_tokens=self.num_reg_tokens,
            no_embed_class=self.no_embed_class,
            layerscale_init=1.0 if self.layerscale else None,  # the value is overwritten by the checkpoint
            dtype=dtype,
            attention=attention,
        )

    @classmethod
    def of_architecture(cls, arch, *, layerscale: bool, **fields) -> TeacherSpec:
        """The spec with the shape of `arch` (a ViT, or a formats.Architecture read off a checkpoint)."""
        names = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "num_reg_tokens", "no_embed_class")
        return cls(**{n: getattr(arch, n) for n in names}, layerscale=layerscale, **fields)

    def to_json(self) -> str:
        derived = dict(grid=self.grid, num_prefix_tokens=self.num_prefix_tokens, num_tokens=self.num_tokens)
        fields = dataclasses.asdict(self)
        return json.dumps({"kind": SPEC_KIND, **fields, **derived, "params_file": PARAMS_FILE}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> TeacherSpec:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("kind") != SPEC_KIND:
            raise TeacherFileError(f"not a converted-teacher spec (expected kind {SPEC_KIND!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if missing := sorted(required - set(data)):
            raise TeacherFileError(f"spec lacks the fields {missing}")
        spec = cls(**{k: v for k, v in data.items() if k in fields})
        unknown = sorted(
            set(data) - fields - {"kind", "grid", "num_prefix_tokens", "num_tokens", "params_file"}
        )
        if unknown:
            raise TeacherFileError(f"spec has unknown fields {unknown}")
        return spec


# ---------------------------------------------------------------- parameters: flat <-> nested


def flatten_params(params: Mapping) -> dict[str, Any]:
    """{'blocks_0': {'attn': {'qkv': {'kernel': x}}}} -> {'blocks_0/attn/qkv/kernel': x}."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}/{k}": v for k, v in flatten_params(value).items()})
        else:
            flat[key] = value
    return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict:
    nested: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def expected_param_shapes(spec: TeacherSpec) -> dict[str, tuple[int, ...]]:
    model = spec.model()
    images = jax.ShapeDtypeStruct((1, spec.img_size, spec.img_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)["params"]
    return {k: tuple(v.shape) for k, v in flatten_params(shapes).items()}


def param_mismatches(spec: TeacherSpec, flat: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between `flat` and the parameters `spec.model()` needs (empty: fits)."""
    expected = expected_param_shapes(spec)
    problems = []
    if missing := sorted(set(expected) - set(flat)):
        problems.append(f"missing {', '.join(missing)}")
    if unexpected := sorted(set(flat) - set(expected)):
        problems.append(f"unexpected {', '.join(unexpected)}")
    problems += [
        f"{k} has shape {tuple(np.shape(flat[k]))}, expected {shape}"
        for k, shape in expected.items()
        if k in flat and tuple(np.shape(flat[k])) != shape
    ]
    return problems


# ---------------------------------------------------------------- directories


def save_teacher(
    out_dir: str | os.PathLike, spec: TeacherSpec, params: Mapping, *, overwrite: bool = False
) -> Path:
    """Writes spec.json + params.safetensors (float32) to a temp dir beside `out_dir`, then renames it.

    `params`: the ViT's 'params' tree (nested) or its flattened form. An existing `out_dir` is replaced
    only with `overwrite` and only if it is a converted teacher (or empty), never an arbitrary folder.
    """

    out = Path(out_dir)
    flat = flatten_params(params) if any(isinstance(v, Mapping) for v in params.values()) else dict(params)
    if problems := param_mismatches(spec, flat):
        raise TeacherFileError(f"parameters do not fit the spec ({spec.variant}): {'; '.join(problems)}")
    arrays = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in flat.items()}
    if storage.is_remote(out_dir):
        with storage.named_write_errors(out_dir):
            return _save_teacher_to_bucket(storage.path(out_dir), spec, arrays, overwrite)
    check_writable(out, overwrite)
    with storage.named_write_errors(out):  # a full disk: one line naming the teacher folder
        _save_teacher_locally(out, spec, arrays)
    return out


def _save_teacher_locally(out: Path, spec: TeacherSpec, arrays: dict) -> None:
    from safetensors.numpy import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(arrays, str(tmp / PARAMS_FILE), metadata={"kind": SPEC_KIND})
        (tmp / SPEC_FILE).write_text(spec.to_json() + "\n")
        for path in (tmp, tmp / PARAMS_FILE):  # mkdtemp and safetensors create them private
            give_default_permissions(path)
        if out.exists():  # overwrite: move the old one aside, so a failure puts it back
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / out.name, out)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_teacher_to_bucket(out, spec: TeacherSpec, arrays: dict, overwrite: bool):
    """A bucket has no rename: the params object first, spec.json last, so a teacher whose upload was
    cut short has no spec.json and load_teacher refuses it. Replaces only a converted teacher."""
    from safetensors.numpy import save

    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise TeacherFileError(f"{out} already exists (pass --overwrite to replace it)")
        if not (out / SPEC_FILE).exists():
            raise TeacherFileError(f"{out} exists and is not a converted teacher; refusing to replace it")
        (out / SPEC_FILE).unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / PARAMS_FILE).write_bytes(save(arrays, metadata={"kind": SPEC_KIND}))
    (out / SPEC_FILE).write_text(spec.to_json() + "\n")
    return out


def give_default_permissions(path: str | os.PathLike) -> None:
    """The mode a plain mkdir / open would have given `path` (0777 / 0666 less the umask).

    tempfile and safetensors create folders 0700 and files 0600; a teacher directory or an export
    shared by several users or workers on one filesystem must be readable by all of them.
    """
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def check_writable(out: Path, overwrite: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise TeacherFileError(f"{out} already exists (pass --overwrite to replace it)")
    if not out.is_dir() or not ((out / SPEC_FILE).is_file() or not any(out.iterdir())):
        raise TeacherFileError(f"{out} exists and is not a converted teacher; refusing to replace it")
    # Replacing removes the folder: only when it holds nothing but what dmt-convert wrote there.
    if others := sorted(p.name for p in out.iterdir() if p.name not in (SPEC_FILE, PARAMS_FILE)):
        raise TeacherFileError(
            f"{out} holds files dmt-convert did not write ({', '.join(others[:5])}); refusing to replace it: "
            "move them or choose another output folder"
        )


def load_teacher(path: str | os.PathLike) -> Teacher:
    """Reads a directory written by `dmt-convert` / `save_teacher`; one-line TeacherFileError otherwise."""
    from safetensors import SafetensorError
    from safetensors.numpy import load, load_file

    path = storage.path(path)  # a local directory or gs://...
    spec_file, params_file = path / SPEC_FILE, path / PARAMS_FILE
    if not path.is_dir():
        raise TeacherFileError(f"{path} is not a directory (expected a teacher converted by dmt-convert)")
    if not spec_file.is_file() or not params_file.is_file():
        raise TeacherFileError(f"{path} is not a converted teacher: it needs {SPEC_FILE} and {PARAMS_FILE}")
    try:
        spec = TeacherSpec.from_json(spec_file.read_text())
        remote = storage.is_remote(params_file)
        flat = load(params_file.read_bytes()) if remote else load_file(os.fspath(params_file))
    except (ValueError, TypeError, SafetensorError, OSError) as e:
        why = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise TeacherFileError(f"{path} is not a valid converted teacher: {why}") from e
    # What the spec claims is bounded by what the tensors hold before any model is built from it
    # (a spec saying depth 99999999 would otherwise trace that many blocks).
    if problems := spec_vs_tensors(spec, flat) or param_mismatches(spec, flat):
        raise TeacherFileError(
            f"{params_file} does not fit {SPEC_FILE} ({spec.variant}): {'; '.join(problems)}"
        )
    if bad := nonfinite_tensors(flat):
        raise TeacherFileError(
            f"teacher {path}: tensors holding NaN or Inf: {', '.join(bad[:5])}; re-convert it from an intact "
            "checkpoint"
        )
    return Teacher(spec, unflatten_params(flat))


def check_teacher_dir(path: str, grid: int | None = None) -> list[str]:
    """Cheap problems of a teacher directory before a run (validate.py): it exists, holds both files,
    its spec parses and gives `grid` patches per side. No weight is read; load_teacher checks those.
    Checks of the spec alone belong here (they are reported with every other problem of the run)."""
    from dmt_jax import storage

    folder = storage.path(path)  # local or gs://
    if not folder.exists():
        return [
            f"teacher {path!r} does not exist: convert the official checkpoint first, "
            f"e.g. `dmt-convert mae_pretrain_vit_base.pth {path}` (see README, Teachers)"
        ]
    if not folder.is_dir() or not (folder / SPEC_FILE).is_file() or not (folder / PARAMS_FILE).is_file():
        return [f"teacher {path!r} is not a converted teacher: it needs {SPEC_FILE} and {PARAMS_FILE}"]
    try:
        spec = TeacherSpec.from_json((folder / SPEC_FILE).read_text())
    except (ValueError, TypeError, OSError) as e:
        why = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        return [f"teacher {path!r}: {SPEC_FILE} is not valid: {why}"]
    if grid is not None and spec.grid != grid:
        return [
            f"teacher {path!r} has a {spec.grid}x{spec.grid} patch grid but the student has {grid}x{grid}: "
            f"re-convert it with `dmt-convert SRC OUT --img-size {grid * spec.patch_size}`"
        ]
    return []


def fingerprint(teacher: Teacher) -> str:
    """sha256 of a teacher's content: its spec's fields (not where it came from) and every parameter.
    Checkpoints record it, so a resume with other weights of the same shapes is noticed."""
    import hashlib

    digest = hashlib.sha256()
    fields = dataclasses.asdict(teacher.spec)
    for where in ("source", "variant"):
        fields.pop(where)
    digest.update(json.dumps(fields, sort_keys=True).encode())
    for name, value in sorted(flatten_params(teacher.params).items()):
        array = np.ascontiguousarray(np.asarray(value, np.float32))
        digest.update(f"{name}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def nonfinite_tensors(flat: Mapping[str, Any]) -> list[str]:
    """Names of the tensors holding a NaN or an Inf, sorted."""
    return sorted(k for k, v in flat.items() if not np.isfinite(np.asarray(v)).all())


def spec_vs_tensors(spec: TeacherSpec, flat: Mapping[str, Any]) -> list[str]:
    """Cheap checks of the spec's size fields against the tensors (dtype, block count, position rows)."""
    problems = [f"tensor {k} has dtype {np.asarray(v).dtype}, expected float32"
                for k, v in sorted(flat.items()) if np.asarray(v).dtype != np.float32]  # fmt: skip
    blocks = {m.group(1) for k in flat if (m := re.match(r"blocks_(\d+)/", k))}
    if spec.depth != len(blocks):
        problems.append(f"spec field depth is {spec.depth} but the file holds {len(blocks)} blocks")
    pos_rows = (0 if spec.no_embed_class else spec.num_prefix_tokens) + spec.grid**2
    pos = np.shape(flat["pos_embed"]) if "pos_embed" in flat else "missing"
    if pos != (1, pos_rows, spec.width):
        problems.append(
            f"pos_embed has shape {pos}; spec fields img_size {spec.img_size}, patch_size "
            f"{spec.patch_size}, num_reg_tokens {spec.num_reg_tokens} and width {spec.width} need "
            f"(1, {pos_rows}, {spec.width})"
        )
    return problems


# ---------------------------------------------------------------- running teachers


_COMPILED: dict[tuple, Any] = {}  # compiled once per architecture (+ dtype, attention), not per teacher


def _jitted_features(spec: TeacherSpec, dtype: Any, attention: str):
    key = (spec.architecture, dtype, attention)
    if key not in _COMPILED:
        model = spec.model(dtype=dtype, attention=attention)
        _COMPILED[key] = jax.jit(lambda params, images: model.apply({"params": params}, images))
    return _COMPILED[key]


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A converted teacher: `params` is its ViT's 'params' tree (host or device arrays)."""

    spec: TeacherSpec
    params: Mapping

    def features(self, images, *, dtype: Any = jnp.float32, attention: str = "auto") -> jax.Array:
        """Normalized NHWC float images at spec.img_size -> final-norm tokens [B, 1 + R + grid^2, width]
        in checkpoint order (CLS, registers, patches): timm's forward_features on the same weights.

        `images`: float [B, img_size, img_size, 3], normalized with this teacher's own spec.mean and
        spec.std, i.e. (pixels / 255 - mean) / std; `normalize(pixels)` does that. NCHW or 0..255
        input is refused, [0, 1] input (normalization forgotten) gets a warning.
        """
        _check_images(images, self.spec.img_size)
        return _jitted_features(self.spec, jnp.dtype(dtype), attention)(self.params, images)

    def normalize(self, pixels) -> jax.Array:
        """uint8 (or float 0..255) NHWC pixels -> the normalized float32 images `features` takes."""
        mean = np.asarray(self.spec.mean, np.float32) * 255.0
        std = np.asarray(self.spec.std, np.float32) * 255.0
        return (jnp.asarray(pixels, jnp.float32) - mean) / std


def _check_images(images, img_size: int) -> None:
    """UserError for input `Teacher.features` would misread; a warning for pixels left in [0, 1]."""
    shape = tuple(np.shape(images))
    expected = f"[B, {img_size}, {img_size}, 3]"
    if len(shape) == 4 and shape[1] == 3 and shape[-1] != 3:
        raise UserError(
            f"Teacher.features takes NHWC images {expected}, got NCHW {shape}: "
            "pass images.transpose(0, 2, 3, 1)"
        )
    if len(shape) != 4 or shape[1:] != (img_size, img_size, 3):
        raise UserError(
            f"Teacher.features takes NHWC images {expected}, got shape {shape}: resize or crop them"
        )
    if not jnp.issubdtype(jnp.asarray(images).dtype, jnp.floating):
        raise UserError("Teacher.features takes normalized float images: pass teacher.normalize(pixels)")
    try:
        low, high = float(jnp.min(images)), float(jnp.max(images))
    except jax.errors.ConcretizationTypeError:
        return  # traced inside jit: the values are not known
    if high > 20.0:  # normalized pixels stay within about +-5 for any sensible mean/std
        raise UserError(
            f"Teacher.features takes normalized images, got values up to {high:.0f} (0..255 pixels?): "
            "pass teacher.normalize(pixels)"
        )
    if low >= 0.0 and high <= 1.0:
        warnings.warn(
            "Teacher.features got images in [0, 1]: they should be normalized with the teacher's mean/std "
            "((x - mean) / std, or teacher.normalize(pixels) from 0..255); the features are wrong otherwise",
            stacklevel=3,
        )


def make_random_teacher(variant: str, img_size: int, seed: int, fmt: str = "mae", **vit_kwargs) -> Teacher:
    """A teacher with random weights from a fixed seed (demos, tests); `vit_kwargs` go to the ViT
    (num_reg_tokens, no_embed_class, layerscale_init, ...). Its mean/std are ImageNet's."""
    model = ViT.from_variant(variant, img_size=img_size, **vit_kwargs)
    spec = TeacherSpec.of_architecture(
        model,
        layerscale=model.layerscale_init is not None,
        format=fmt,
        variant=variant,
        img_size=img_size,
        source=f"random(seed={seed})",
    )
    key = ("init", spec.architecture, tuple(sorted(vit_kwargs.items())))
    if key not in _COMPILED:  # compile the initializer once per architecture, not once per seed
        images = jnp.zeros((1, img_size, img_size, 3), jnp.float32)
        _COMPILED[key] = jax.jit(lambda rng: model.init(rng, images)["params"])
    return Teacher(spec, _COMPILED[key](jax.random.PRNGKey(seed)))


@dataclasses.dataclass(frozen=True)
class _Group:
    """Teachers of one architecture: one ViT run under one vmap over their stacked params."""

    members: tuple[int, ...]  # indices into the stack's teacher list
    model: ViT
    img_size: int
    pixel_mean: np.ndarray  # [G, 3], on the 0..255 scale
    pixel_std: np.ndarray  # [G, 3]


class TeacherStack:
    """Several frozen teachers run as few batched computations.

    Teachers of identical architecture are grouped; each group's params are stacked on a leading axis
    (cast once to `dtype`) and the group runs under one `jax.vmap`, so each layer is one batched
    matmul. `stack.params` is that stacked tree on the host (numpy): place it on the devices, pass it
    into the jitted step and call `stack.apply(params, pixels)` inside it.
    """

    def __init__(self, teachers: Sequence[Teacher], dtype: Any = jnp.bfloat16, attention: str = "auto"):
        if not teachers:
            raise ValueError("a TeacherStack needs at least one teacher")
        self.specs = tuple(t.spec for t in teachers)
        self.dtype = jnp.dtype(dtype)
        by_arch: dict[tuple, list[int]] = {}
        for i, spec in enumerate(self.specs):
            by_arch.setdefault(spec.architecture, []).append(i)
        self._groups = []
        params = []
        for members in by_arch.values():
            first = self.specs[members[0]]
            self._groups.append(
                _Group(
                    members=tuple(members),
                    model=first.model(dtype=self.dtype, attention=attention),
                    img_size=first.img_size,
                    pixel_mean=np.array([self.specs[i].mean for i in members], np.float32) * 255.0,
                    pixel_std=np.array([self.specs[i].std for i in members], np.float32) * 255.0,
                )
            )
            # Stack on the host, cast once; the stack keeps no device copy: train.build places these
            # shard by shard on the mesh (parallel.place_from_host) and then drops them.
            trees = [jax.tree.map(np.asarray, teachers[i].params) for i in members]
            params.append(jax.tree.map(lambda *xs: np.stack(xs).astype(self.dtype), *trees))
        self.params = tuple(params)

    @property
    def widths(self) -> list[int]:
        return [s.width for s in self.specs]

    @property
    def num_reg_tokens(self) -> list[int]:
        return [s.num_reg_tokens for s in self.specs]

    @property
    def grids(self) -> list[int]:
        return [s.grid for s in self.specs]

    @property
    def num_tokens(self) -> list[int]:
        return [s.num_tokens for s in self.specs]

    def apply(self, params, pixels, keep=None) -> list[jax.Array]:
        """pixels: uint8 or float [B, H, W, 3] in 0..255 -> per teacher (in the order given) its
        final-norm tokens [B, T_k, D_k], in `dtype`, under stop_gradient.

        keep: optional int [B, n] patch indices (the student's visible patches). Each teacher then
        returns only CLS and those patches, [B, 1 + n, D_k] (registers dropped), and its last block
        runs its queries, MLP and final norm only there: the same values, fewer FLOPs."""
        pixels = jnp.asarray(pixels).astype(jnp.float32)
        outputs: list[jax.Array | None] = [None] * len(self.specs)
        for group, group_params in zip(self._groups, params, strict=True):
            x = pixels
            if x.shape[1:3] != (group.img_size, group.img_size):
                # e.g. a /14 teacher fed 196 px to give a /16 student's 14x14 grid at 224 px.
                x = jax.image.resize(
                    x, (x.shape[0], group.img_size, group.img_size, 3), "bilinear", antialias=True
                )

            def run(p, mean, std, images, model=group.model):
                images = ((images - mean) / std).astype(self.dtype)
                return model.apply({"params": p}, images, output_patches=keep)

            tokens = jax.vmap(run, in_axes=(0, 0, 0, None))(
                group_params, group.pixel_mean, group.pixel_std, x
            )
            for j, i in enumerate(group.members):
                outputs[i] = jax.lax.stop_gradient(tokens[j])
        return outputs
