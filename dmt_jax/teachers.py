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
from dmt_jax.models import FAMILIES, Features, ViT, ViTConfig, build_model, family_config, resize
from dmt_jax.models.family import IMAGENET_MEAN, IMAGENET_STD
from dmt_jax.models.vit import num_heads_for_width, variant_name  # noqa: F401  (their home before models/)

SPEC_FILE = "spec.json"
PARAMS_FILE = "params.safetensors"
SPEC_KIND = "dmt_jax.teacher/2"  # marks a directory as a converted teacher
SPEC_KIND_V1 = "dmt_jax.teacher/1"  # a ViT spec with flat fields; upgraded on load
# How a teacher's input is brought from the shared view to its img_size (`prepare_images`): today's
# antialiased bilinear, CLIP's bicubic, big_vision's squash (bilinear, no antialias: SigLIP), SAM's
# longest side to img_size then zero padding after normalization.
INPUT_RESIZE = ("bilinear", "bicubic", "squash", "longest_pad")
_DERIVED = ("variant", "img_size", "grid", "num_prefix_tokens", "num_tokens", "summary_dim", "params_file")


class TeacherFileError(UserError, ValueError):
    """A directory that is not a (valid) converted teacher, or one that may not be written; one line."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def spec_problems(spec) -> list[str]:
    """'name: what is wrong' for every field of a TeacherSpec of the wrong type or out of range (the
    family config checks its own fields when it is built).

    Only what the fields say about each other; what the tensors hold is checked in load_teacher.
    """
    problems = []
    if spec.family not in FAMILIES:
        problems.append(f"family must be one of {', '.join(FAMILIES)}, got {spec.family!r}")
    elif not isinstance(spec.config, FAMILIES[spec.family][0]):
        problems.append(
            f"config must be a {FAMILIES[spec.family][0].__name__}, got {type(spec.config).__name__}"
        )
    if spec.source_img_size is not None and (not _is_int(spec.source_img_size) or spec.source_img_size <= 0):
        problems.append(f"source_img_size must be a positive integer or null, got {spec.source_img_size!r}")
    strings = {n: getattr(spec, n) for n in ("format", "source", "pos_embed_resize", "input_resize")}
    problems += [f"{n} must be a string, got {v!r}" for n, v in strings.items() if not isinstance(v, str)]
    if isinstance(spec.input_resize, str) and spec.input_resize not in INPUT_RESIZE:
        problems.append(f"input_resize must be one of {', '.join(INPUT_RESIZE)}, got {spec.input_resize!r}")
    for name in ("mean", "std"):
        value = getattr(spec, name)
        numbers = isinstance(value, (list, tuple)) and len(value) == 3
        numbers = numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if not numbers or not all(np.isfinite(value)):
            problems.append(f"{name} must be 3 finite numbers (R, G, B), got {value!r}")
        elif name == "std" and min(value) <= 0:
            problems.append(f"std must be > 0 for every channel (it divides the pixels), got {list(value)}")
    return problems


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """Everything needed to rebuild a teacher and feed it: its family and that family's config (the
    single description of the architecture, img_size included), its input normalization and resize
    rule, and where it came from. The config's fields and properties read through the spec
    (spec.width, spec.depth, spec.grid, spec.num_tokens, spec.variant, ...)."""

    format: str  # mae, mocov3, dino, ibot, dinov2, clip, openclip, siglip, ...; random or demo in process
    family: str  # a key of models.FAMILIES
    config: Any  # the family's config (ViTConfig, ...)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_resize: str = "bilinear"  # one of INPUT_RESIZE
    source: str = ""
    source_img_size: int | None = None
    pos_embed_resize: str = "none"

    def __post_init__(self):
        if problems := spec_problems(self):  # a spec.json is untrusted input: refuse it field by field
            raise TeacherFileError(f"spec field {'; spec field '.join(problems)}")
        # JSON gives lists; keep tuples so the spec stays hashable.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def __getattr__(self, name: str):
        # Only reached for names that are not fields: the family config's fields and properties.
        if name.startswith("__") or name == "config":
            raise AttributeError(name)
        try:
            return getattr(self.config, name)
        except AttributeError:
            raise AttributeError(f"a {self.family} teacher's spec has no {name!r}") from None

    @property
    def architecture(self) -> tuple:
        """Teachers with equal architecture share one compiled model (and one vmap in a TeacherStack)."""
        return (self.family, self.config)

    def model(self, dtype: Any = jnp.float32, attention: str = "auto") -> ViT:
        """The ViT returning its token array (the DMT path, the demo's classifier); ViT family only."""
        if self.family != "vit":
            raise UserError(
                f"spec.model() is the ViT's token path; a {self.family} teacher has features_model()"
            )
        return self.config.module(dtype=dtype, attention=attention, output="tokens")

    def features_model(self, dtype: Any = jnp.float32, attention: str = "auto"):
        """The family's module returning Features (prefix, patches, summary)."""
        return build_model(self.family, self.config, dtype, attention)

    def to_dict(self) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**fields, "config": self.config.to_dict(), "mean": list(self.mean), "std": list(self.std)}

    def to_json(self) -> str:
        derived = dict(
            variant=self.variant,
            img_size=self.img_size,
            grid=self.grid,
            num_prefix_tokens=self.num_prefix_tokens,
            num_tokens=self.num_tokens,
            summary_dim=self.summary_dim,
            params_file=PARAMS_FILE,
        )
        return json.dumps({"kind": SPEC_KIND, **self.to_dict(), **derived}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> TeacherSpec:
        data = json.loads(text)
        if isinstance(data, dict) and data.get("kind") == SPEC_KIND_V1:
            data = _upgrade_v1(data)
        if not isinstance(data, dict) or data.get("kind") != SPEC_KIND:
            raise TeacherFileError(f"not a converted-teacher spec (expected kind {SPEC_KIND!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if missing := sorted(required - set(data)):
            raise TeacherFileError(f"spec lacks the fields {missing}")
        if unknown := sorted(set(data) - fields - {"kind", *_DERIVED}):
            raise TeacherFileError(f"spec has unknown fields {unknown}")
        try:
            config = family_config(data["family"], data["config"]) if data["family"] in FAMILIES else None
        except ValueError as e:
            raise TeacherFileError(f"spec config: {e}") from e
        values = {k: v for k, v in data.items() if k in fields}
        return cls(**{**values, "config": config if config is not None else data["config"]})

    def fingerprint_fields(self) -> dict:
        """The fields a teacher's fingerprint hashes: for a ViT that /1 could describe, exactly /1's
        (so checkpoints written before /2 still resume), else /2's; never where it came from."""
        legacy = _as_v1(self)
        if legacy is not None:
            return {k: v for k, v in legacy.items() if k not in ("kind", "source", "variant")}
        return {k: v for k, v in self.to_dict().items() if k != "source"}


# /1: the ViT's shape as flat fields, in this order (dataclasses.asdict of the /1 TeacherSpec).
_V1_CONFIG = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "img_size", "num_reg_tokens",
              "no_embed_class", "layerscale")  # fmt: skip
_V1_OTHER = ("format", "variant", "mean", "std", "source", "source_img_size", "pos_embed_resize")


def _upgrade_v1(data: dict) -> dict:
    """A /1 spec.json (today's five formats and random/demo teachers) as /2: a ViT with /1's fields."""
    required = ("format", "variant", "width", "depth", "num_heads", "mlp_dim", "patch_size", "img_size")
    if missing := sorted(set(required) - set(data)):
        raise TeacherFileError(f"spec lacks the fields {missing}")
    derived = {"kind", "grid", "num_prefix_tokens", "num_tokens", "params_file"}
    if unknown := sorted(set(data) - set(_V1_CONFIG) - set(_V1_OTHER) - derived):
        raise TeacherFileError(f"spec has unknown fields {unknown}")
    upgraded = {k: data[k] for k in _V1_OTHER if k in data and k != "variant"}
    config = {k: data[k] for k in _V1_CONFIG if k in data}
    return {"kind": SPEC_KIND, **upgraded, "family": "vit", "config": config, "input_resize": "bilinear"}


def _as_v1(spec: TeacherSpec) -> dict | None:
    """The /1 fields of a spec /1 could describe (a ViT with no /2 option set), else None."""
    if spec.family != "vit" or spec.input_resize != "bilinear":
        return None
    defaults = ViTConfig(width=64, depth=1, num_heads=1, mlp_dim=1)
    extra = [n for n in spec.config.to_dict() if n not in _V1_CONFIG]
    if any(getattr(spec.config, n) != getattr(defaults, n) for n in extra):
        return None
    c = spec.config
    return dict(format=spec.format, variant=c.variant, **{n: getattr(c, n) for n in _V1_CONFIG},
                mean=list(spec.mean), std=list(spec.std), source=spec.source,
                source_img_size=spec.source_img_size, pos_embed_resize=spec.pos_embed_resize)  # fmt: skip


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
    model = spec.features_model()
    images = jax.ShapeDtypeStruct((1, spec.img_size, spec.img_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)["params"]
    return {k: tuple(v.shape) for k, v in flatten_params(shapes).items()}


def param_mismatches(spec: TeacherSpec, flat: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between `flat` and the parameters the spec's model needs (empty: fits)."""
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
    digest.update(json.dumps(teacher.spec.fingerprint_fields(), sort_keys=True).encode())
    for name, value in sorted(flatten_params(teacher.params).items()):
        if isinstance(value, jax.ShapeDtypeStruct):  # an abstract teacher (no weights): its shapes
            digest.update(f"{name}{value.shape} abstract".encode())
            continue
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
    depth = getattr(spec.config, "depth", len(blocks))
    if depth != len(blocks):
        problems.append(f"spec field depth is {depth} but the file holds {len(blocks)} blocks")
    if spec.family != "vit":  # the other families' shapes are checked by param_mismatches
        return problems
    pos_rows = spec.num_pos_prefix + spec.grid**2
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


def _jitted_forward(spec: TeacherSpec, dtype: Any, attention: str):
    key = (spec.architecture, dtype, attention)
    if key not in _COMPILED:
        model = spec.features_model(dtype=dtype, attention=attention)
        _COMPILED[key] = jax.jit(lambda params, images: model.apply({"params": params}, images))
    return _COMPILED[key]


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A converted teacher: `params` is its model's 'params' tree (host or device arrays).

    `features(x)` and `summary(x)` take float [B, img_size, img_size, 3] images normalized with this
    teacher's own spec.mean and spec.std, i.e. (pixels / 255 - mean) / std; `normalize(pixels)` does
    that. NCHW or 0..255 input is refused, [0, 1] input (normalization forgotten) gets a warning.
    """

    spec: TeacherSpec
    params: Mapping

    def forward(self, images, *, dtype: Any = jnp.float32, attention: str = "auto") -> Features:
        """Normalized NHWC images -> the family's Features(prefix, patches, summary)."""
        _check_images(images, self.spec.img_size)
        return _jitted_forward(self.spec, jnp.dtype(dtype), attention)(self.params, images)

    def features(self, images, *, dtype: Any = jnp.float32, attention: str = "auto") -> jax.Array:
        """The family's final tokens [B, T, D] as its reference library computes them, in checkpoint
        order (prefix tokens such as CLS and registers, then patches): for today's ViTs timm's
        forward_features, for CLIP ln_post on every token, for SigLIP the encoder_norm tokens."""
        return self.forward(images, dtype=dtype, attention=attention).tokens()

    def summary(self, images, *, dtype: Any = jnp.float32, attention: str = "auto") -> jax.Array:
        """The family's image-level vector [B, S]: the final-norm CLS token (today's ViTs), CLIP's
        projected embedding (open_clip's encode_image, unnormalized), SigLIP's MAP head output."""
        if not self.spec.summary_dim:
            raise UserError(
                f"a {self.spec.format} teacher ({self.spec.family}) has no image-level summary: "
                "use features()"
            )
        return self.forward(images, dtype=dtype, attention=attention).summary

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


def make_random_teacher(variant: str, img_size: int, seed: int, fmt: str = "random", **vit_kwargs) -> Teacher:
    """A ViT teacher with random weights from a fixed seed (demos, tests); `vit_kwargs` go to the ViT
    (num_reg_tokens, no_embed_class, layerscale_init, class_token, pool, ...). Its mean/std are ImageNet's;
    `fmt` is the name the run's summary gives it ('random'; 'demo' once trained on the demo dataset)."""
    model = ViT.from_variant(variant, img_size=img_size, output="features", **vit_kwargs)
    spec = TeacherSpec(format=fmt, family="vit", config=model.config, source=f"random(seed={seed})")
    key = ("init", spec.architecture, tuple(sorted(vit_kwargs.items())))
    if key not in _COMPILED:  # compile the initializer once per architecture, not once per seed
        images = jnp.zeros((1, img_size, img_size, 3), jnp.float32)
        _COMPILED[key] = jax.jit(lambda rng: model.init(rng, images)["params"])
    return Teacher(spec, _COMPILED[key](jax.random.PRNGKey(seed)))


def prepare_images(pixels, img_size: int, rule: str, mean, std, dtype: Any = jnp.float32) -> jax.Array:
    """0..255 NHWC pixels (the shared view) -> a teacher's normalized input at img_size by its resize rule
    (INPUT_RESIZE). mean, std: [..., 3] on the 0..255 scale (a leading teacher axis broadcasts)."""
    x = jnp.asarray(pixels).astype(jnp.float32)
    b, h, w, _ = x.shape
    if rule == "longest_pad":  # SAM: longest side to img_size, normalize, zero-pad bottom and right
        scale = img_size / max(h, w)
        size = (int(h * scale + 0.5), int(w * scale + 0.5))
        if size != (h, w):
            x = jax.image.resize(x, (b, *size, 3), "bilinear", antialias=True)
        x = (x - mean) / std
        pad = [(0, 0)] * (x.ndim - 3) + [(0, img_size - size[0]), (0, img_size - size[1]), (0, 0)]
        return jnp.pad(x, pad).astype(dtype)
    if (h, w) != (img_size, img_size):
        method, antialias = {"bilinear": ("bilinear", True), "bicubic": ("bicubic", True),
                             "squash": ("bilinear", False)}[rule]  # fmt: skip
        x = jax.image.resize(x, (b, img_size, img_size, 3), method, antialias=antialias)
    return ((x - mean) / std).astype(dtype)


@dataclasses.dataclass(frozen=True)
class _Group:
    """Teachers of one architecture (family and config) and input rule: one model under one vmap over
    their stacked params."""

    members: tuple[int, ...]  # indices into the stack's teacher list
    spec: TeacherSpec  # the first member's (family, config, input_resize are the group's)
    pixel_mean: np.ndarray  # [G, 3], on the 0..255 scale
    pixel_std: np.ndarray  # [G, 3]
    follow: str | None = None  # the interpolation of its tables when it follows the student's size


class TeacherStack:
    """Several frozen teachers run as few batched computations.

    Teachers of identical architecture are grouped; each group's params are stacked on a leading axis
    (cast once to `dtype`) and the group runs under one `jax.vmap`, so each layer is one batched
    matmul; different families and sizes run one after another. `stack.params` is that stacked tree on
    the host (numpy): place it on the devices, pass it into the jitted step and call
    `stack.apply(params, pixels, keep)` (the DMT objective's tokens) or `stack.features(params, pixels)`
    (each teacher's Features at its own resolution and normalization) inside it. A teacher built to
    `follow` the student runs at the student's size given to `features(params, pixels, px)` instead, in
    a group of its own (its tables are resized in the step; one compile per px).
    """

    def __init__(
        self,
        teachers: Sequence[Teacher],
        dtype: Any = jnp.bfloat16,
        attention: str = "auto",
        follow: Sequence[str | None] | None = None,
    ):
        """follow: per teacher, None (it runs at its own img_size) or the interpolation (a
        models.resize method) its position tables are resized with when `features` is given the
        student's input size: it then runs at that size (`follow_size`)."""
        if not teachers:
            raise ValueError("a TeacherStack needs at least one teacher")
        self.specs = tuple(t.spec for t in teachers)
        self.dtype = jnp.dtype(dtype)
        self.attention = attention
        self.follow = tuple(follow) if follow is not None else (None,) * len(self.specs)
        if len(self.follow) != len(self.specs):
            raise ValueError(f"follow has {len(self.follow)} entries for {len(self.specs)} teachers")
        for spec, method in zip(self.specs, self.follow, strict=True):
            if method is not None and (why := resize.check_method(spec.family, method)):
                raise ValueError(why)
        by_arch: dict[tuple, list[int]] = {}
        for i, spec in enumerate(self.specs):
            by_arch.setdefault((*spec.architecture, spec.input_resize, self.follow[i]), []).append(i)
        self._groups = []
        params = []
        for members in by_arch.values():
            self._groups.append(
                _Group(
                    members=tuple(members),
                    spec=self.specs[members[0]],
                    pixel_mean=np.array([self.specs[i].mean for i in members], np.float32) * 255.0,
                    pixel_std=np.array([self.specs[i].std for i in members], np.float32) * 255.0,
                    follow=self.follow[members[0]],
                )
            )
            # Stack on the host, cast once; the stack keeps no device copy: train.build places these
            # shard by shard on the mesh (parallel.place_from_host) and then drops them.
            trees = [jax.tree.map(_host_or_abstract, teachers[i].params) for i in members]
            params.append(jax.tree.map(self._stack, *trees))
        self.params = tuple(params)

    def _stack(self, *leaves):
        if isinstance(leaves[0], jax.ShapeDtypeStruct):  # abstract teachers: shapes only (bench/)
            return jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), self.dtype)
        return np.stack(leaves).astype(self.dtype)

    @property
    def widths(self) -> list[int]:
        return [s.width for s in self.specs]

    @property
    def num_reg_tokens(self) -> list[int]:
        return [getattr(s.config, "num_reg_tokens", 0) for s in self.specs]

    @property
    def grids(self) -> list[int]:
        return [s.grid for s in self.specs]

    @property
    def num_tokens(self) -> list[int]:
        return [s.num_tokens for s in self.specs]

    @property
    def summary_dims(self) -> list[int]:
        """Per teacher the width of its summary (0: none, as SAM)."""
        return [s.summary_dim for s in self.specs]

    def apply(self, params, pixels, keep=None) -> list[jax.Array]:
        """pixels: uint8 or float [B, H, W, 3] in 0..255 -> per teacher (in the order given) its
        final-norm tokens [B, T_k, D_k], in `dtype`, under stop_gradient. Every teacher gets the view
        resized bilinearly (antialiased) to its img_size.

        keep: optional int [B, n] patch indices (the student's visible patches). Each teacher then
        returns only CLS and those patches, [B, 1 + n, D_k] (registers dropped; a teacher without a
        CLS token, as SigLIP, returns the patches alone), and a ViT's or an EVA's last block runs its
        queries, MLP and final norm only there: the same values, fewer FLOPs (SAM's neck mixes
        neighbouring patches: it runs whole, then the patches are picked)."""
        pixels = jnp.asarray(pixels).astype(jnp.float32)
        outputs: list[jax.Array | None] = [None] * len(self.specs)
        for group, group_params in zip(self._groups, params, strict=True):
            x = pixels
            img_size = group.spec.img_size
            if x.shape[1:3] != (img_size, img_size):
                # e.g. a /14 teacher fed 196 px to give a /16 student's 14x14 grid at 224 px.
                x = jax.image.resize(x, (x.shape[0], img_size, img_size, 3), "bilinear", antialias=True)
            if group.spec.family == "vit":
                model = group.spec.model(dtype=self.dtype, attention=self.attention)
                run = lambda p, images, model=model: model.apply({"params": p}, images, output_patches=keep)
            elif group.spec.family == "eva":  # its last block, too, only at the prefix and visible patches
                model = group.spec.features_model(dtype=self.dtype, attention=self.attention)
                run = lambda p, images, model=model: _select(
                    model.apply({"params": p}, images, output_patches=keep), keep, gathered=True
                )
            else:
                model = group.spec.features_model(dtype=self.dtype, attention=self.attention)
                run = lambda p, images, model=model: _select(model.apply({"params": p}, images), keep)

            def normalized_run(p, mean, std, images, run=run):
                return run(p, ((images - mean) / std).astype(self.dtype))

            tokens = jax.vmap(normalized_run, in_axes=(0, 0, 0, None))(
                group_params, group.pixel_mean, group.pixel_std, x
            )
            for j, i in enumerate(group.members):
                outputs[i] = jax.lax.stop_gradient(tokens[j])
        return outputs

    def img_sizes(self, px: int | None = None) -> list[int]:
        """Per teacher the input size `features(..., px)` runs it at."""
        pairs = zip(self.specs, self.follow, strict=True)
        return [follow_size(spec, px) if method and px else spec.img_size for spec, method in pairs]

    def grids_at(self, px: int | None = None) -> list[int]:
        """Per teacher its patch grid (per side) at `features(..., px)` (`grids`: at their own sizes)."""
        return [size // s.patch_size for s, size in zip(self.specs, self.img_sizes(px), strict=True)]

    def features(self, params, pixels, px: int | None = None) -> list[Features]:
        """pixels: uint8 or float [B, H, W, 3] in 0..255 (one view for all) -> per teacher (in the order
        given) its Features (prefix, patches, summary) at its own img_size, resize rule, mean and std,
        in `dtype`, under stop_gradient. The summary is None for a family without one.

        px: the student's input size (a resolution stage). A teacher that follows the stages then runs at
        `follow_size(spec, px)` instead, its position tables resized to that grid inside this call
        (models/resize.py, with its `follow` interpolation; EVA's rotary angles from the new grid)."""
        outputs: list[Features | None] = [None] * len(self.specs)
        for group, group_params in zip(self._groups, params, strict=True):
            spec, config = group.spec, group.spec.config
            img_size = follow_size(spec, px) if group.follow and px else spec.img_size
            if img_size != spec.img_size:
                config = dataclasses.replace(config, img_size=img_size)
            model = build_model(spec.family, config, self.dtype, self.attention)

            def run(p, mean, std, model=model, spec=spec, img_size=img_size, method=group.follow):
                if img_size != spec.img_size:
                    _, p = resize.at_size(spec.family, spec.config, p, img_size, method)
                images = prepare_images(pixels, img_size, spec.input_resize, mean, std, self.dtype)
                return model.apply({"params": p}, images)

            out = jax.vmap(run)(group_params, group.pixel_mean, group.pixel_std)
            for j, i in enumerate(group.members):
                outputs[i] = jax.lax.stop_gradient(jax.tree.map(lambda a, j=j: a[j], out))
        return outputs


def _host_or_abstract(x):
    """A parameter on the host, or its ShapeDtypeStruct as it is: a teacher of the right shapes without
    weights lowers and compiles the training step (bench/recipe_memory.py), nothing allocated."""
    return x if isinstance(x, jax.ShapeDtypeStruct) else np.asarray(x)


def follow_size(spec: TeacherSpec, px: int) -> int:
    """The input size of a teacher following a student at px: the largest multiple of its own patch
    size not above px (DINOv2 /14 beside a /16 student at 256 px: 252, an 18 x 18 grid)."""
    size = px // spec.patch_size * spec.patch_size
    if size <= 0:
        raise UserError(
            f"a {spec.format} teacher ({spec.variant}) cannot follow the student at {px} px: below its "
            f"patch size {spec.patch_size}"
        )
    return size


def _select(features: Features, keep, gathered: bool = False) -> jax.Array:
    """A non-ViT family's tokens for the DMT path: all of them, or the first prefix token (if any) and
    the patches in `keep` (gathered: `patches` holds only those already, as Eva's output_patches)."""
    if keep is None:
        return features.tokens()
    patches = (
        features.patches if gathered else jnp.take_along_axis(features.patches, keep[:, :, None], axis=1)
    )
    return jnp.concatenate([features.prefix[:, :1], patches], axis=1)
