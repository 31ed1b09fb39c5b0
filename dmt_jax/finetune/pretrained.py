"""Where a fine-tuning's weights come from (--config.init): a distillation workdir (the student encoder
of its newest finished checkpoint), a student_timm.safetensors, or a converted teacher directory; local
or gs://. What a source says about itself (a variant, a head count) is checked against its tensors,
and tensors holding NaN or Inf are refused by name, before any model is built."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np

from dmt_jax import checkpoint, formats, storage
from dmt_jax.errors import UserError
from dmt_jax.models.vit import parse_variant
from dmt_jax.runner import say
from dmt_jax.teachers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    flatten_params,
    load_teacher,
    nonfinite_tensors,
    unflatten_params,
)


@dataclasses.dataclass
class Pretrained:
    """An encoder's Flax params and what is needed to build and feed its ViT."""

    params: dict
    arch: formats.Architecture
    num_heads: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    source: str = ""  # what it was read from, for the summary ("its checkpoint at step 1500")


def load_pretrained(source: str) -> Pretrained:
    """A distillation workdir, a student_timm.safetensors or a converted teacher directory -> Pretrained."""
    path = storage.path(source, "--config.init")  # the form every reader of the init uses
    if (path / "spec.json").exists():
        teacher = load_teacher(path)
        if problem := not_a_plain_vit(teacher.spec):
            raise UserError(f"--config.init={source}: {problem}")
        spec, state = teacher.spec, formats.flax_to_timm(flatten_params(teacher.params))
        arch = formats.infer_architecture(state)
        return Pretrained(
            teacher.params, arch, spec.num_heads, spec.mean, spec.std, f"teacher {spec.variant}"
        )
    if (path / "checkpoints").is_dir():
        return _from_distillation(str(path))
    if path.name.endswith(".safetensors") and path.is_file():
        state, metadata = read_safetensors(path)
        try:
            kwargs = json.loads(metadata.get("timm_kwargs", "{}"))
        except ValueError:
            kwargs = None
        if not isinstance(kwargs, dict):
            raise UserError(f"--config.init={source}: its timm_kwargs metadata is not a JSON object")
        return _pretrained_from_timm(state, kwargs, source, "student file")
    raise UserError(
        f"--config.init={source!r} is neither a distillation workdir (with checkpoints/), a "
        "student_timm.safetensors nor a converted teacher directory (with spec.json)"
    )


# What a fine-tuning builds is timm's plain ViT (Classifier's encoder). A teacher whose architecture differs
# (CLIP's ln_pre, QuickGELU, bias-free patch projection and eps 1e-5; SigLIP's missing CLS token and tanh
# GELU; EVA-02; SAM) would be built without its differences and run wrong: refused, never dropped.
PLAIN_VIT = dict(class_token=True, pre_norm=False, patch_bias=True, act="gelu", ln_eps=1e-6)


def not_a_plain_vit(spec) -> str:
    """'' for a teacher fine-tuning rebuilds exactly (MAE, MoCo v3, DINO, iBOT, DINOv2); else why not."""
    if spec.family == "vit":
        differs = [
            f"{k}={getattr(spec.config, k)!r}" for k, v in PLAIN_VIT.items() if getattr(spec.config, k) != v
        ]
        if not differs:
            return ""  # a projection or MAP head only feeds its summary: fine-tuning reads its tokens
        what = f"a ViT with {', '.join(differs)}"
    else:
        what = f"a{'n' if spec.family[0] in 'aeiou' else ''} {spec.family} model"
    return (
        f"its teacher ({spec.format}) is {what}, not the plain timm ViT fine-tuning builds (it would run "
        "without those differences): fine-tune from a distilled student, an MAE, MoCo v3, DINO, iBOT or "
        "DINOv2 teacher, or from random init (--config.init=)"
    )


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, local or in a bucket (read whole)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    raw = storage.path(path).read_bytes()
    try:
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + size])
        metadata = header.get("__metadata__") or {}
        return load(raw), {str(k): str(v) for k, v in metadata.items()}
    except (struct.error, ValueError, AttributeError, SafetensorError) as e:
        raise UserError(f"--config.init={path}: not a readable safetensors file ({e})") from None


def _pretrained_from_timm(state: dict, claims: dict, source, what: str) -> Pretrained:
    """An encoder from timm-named tensors; `claims` (timm kwargs: embed_dim, depth, ...) must fit them."""
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    try:
        arch = formats.infer_architecture(state)
    except formats.FormatError as e:
        raise UserError(f"--config.init={source}: {e}") from None
    if bad := nonfinite_tensors(state):
        raise UserError(
            f"--config.init={source}: tensors holding NaN or Inf: {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}; start from an intact checkpoint"
        )
    problems = [
        f"its metadata says {key}={claims[key]!r} but its tensors have {key} {value}"
        for key, value in (("embed_dim", arch.width), ("depth", arch.depth), ("patch_size", arch.patch_size))
        if key in claims and claims[key] != value
    ]
    heads = claims.get("num_heads")
    if heads is not None and not (isinstance(heads, int) and not isinstance(heads, bool) and heads > 0
                                  and arch.width % heads == 0):  # fmt: skip
        problems.append(
            f"its metadata says num_heads={heads!r}, which does not divide its width {arch.width}"
        )
    if problems:
        raise UserError(f"--config.init={source}: {'; '.join(problems)}")
    params = unflatten_params(formats.timm_to_flax(state))
    return Pretrained(params, arch, heads or arch.num_heads, source=what)


def _from_distillation(source: str) -> Pretrained:
    """The student encoder of the newest finished checkpoint of a distillation workdir (an older one when
    the newest cannot be read: damaged, or deleted by a running distillation's rotation meanwhile)."""
    workdir = storage.path(source)
    directory = str(workdir / "checkpoints")
    steps = checkpoint.committed_steps(directory)
    if not steps:
        raise UserError(f"--config.init={source!r} holds no finished checkpoint yet: distill first")
    claims = {}
    if (workdir / "config.json").exists():
        try:  # a distillation's student, or a fine-tuning's model
            config = json.loads((workdir / "config.json").read_text())
            shape = parse_variant((config.get("student") or config.get("model"))["variant"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"--config.init={source}: its config.json names no ViT variant ({e})") from None
        claims = dict(embed_dim=shape["width"], depth=shape["depth"], num_heads=shape["num_heads"])
        claims.update(patch_size=shape["patch_size"])
    for step in reversed(steps):
        try:
            encoder = checkpoint.read_state(directory, step)["params"]["encoder"]
        except Exception as e:  # noqa: BLE001 - damage falls back to an older one; anything else is raised
            if not checkpoint.is_damage(e) and not isinstance(e, KeyError):
                raise
            say(f"--config.init: its checkpoint at step {step} is unreadable ({type(e).__name__})")
            continue
        state = formats.flax_to_timm(flatten_params(encoder))
        return _pretrained_from_timm(state, claims, source, f"its student at step {step}")
    raise UserError(f"--config.init={source!r}: none of its checkpoints (steps {steps}) can be read")
