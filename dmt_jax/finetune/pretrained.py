"""Where a fine-tuning's weights come from (--config.init): a distillation workdir (the student encoder
of its newest checkpoint), a student_timm.safetensors, or a converted teacher directory."""

from __future__ import annotations

import dataclasses
import json

from etils import epath

from dmt_jax import checkpoint, formats
from dmt_jax.errors import UserError
from dmt_jax.models.vit import parse_variant
from dmt_jax.teachers import IMAGENET_MEAN, IMAGENET_STD, flatten_params, load_teacher, unflatten_params


@dataclasses.dataclass
class Pretrained:
    """An encoder's Flax params and what is needed to build and feed its ViT."""

    params: dict
    arch: formats.Architecture
    num_heads: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


def load_pretrained(source: str) -> Pretrained:
    """A distillation workdir, a student_timm.safetensors or a converted teacher directory -> Pretrained."""
    path = epath.Path(source)
    if (path / "spec.json").exists():
        teacher = load_teacher(source)
        spec, state = teacher.spec, formats.flax_to_timm(flatten_params(teacher.params))
        return Pretrained(
            teacher.params, formats.infer_architecture(state), spec.num_heads, spec.mean, spec.std
        )
    if (path / "checkpoints").is_dir():
        return _from_distillation(path)
    if path.is_file() and path.name.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.numpy import load_file

        with safe_open(str(path), "np") as f:
            kwargs = json.loads((f.metadata() or {}).get("timm_kwargs", "{}"))
        state = load_file(str(path))
        return _pretrained_from_timm(state, kwargs.get("num_heads"))
    raise UserError(
        f"--config.init={source!r} is neither a distillation workdir (with checkpoints/), a "
        "student_timm.safetensors nor a converted teacher directory (with spec.json)"
    )


def _pretrained_from_timm(state: dict, num_heads: int | None) -> Pretrained:
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    arch = formats.infer_architecture(state)
    params = unflatten_params(formats.timm_to_flax(state))
    return Pretrained(params, arch, num_heads or arch.num_heads)


def _from_distillation(workdir: epath.Path) -> Pretrained:
    """The student encoder of the newest checkpoint of a distillation workdir."""
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    if not steps:
        raise UserError(f"--config.init={str(workdir)!r} holds no checkpoint yet: distill first")
    encoder = checkpoint.read_state(str(workdir / "checkpoints"), steps[-1])["params"]["encoder"]
    num_heads = None
    if (workdir / "config.json").exists():
        variant = json.loads((workdir / "config.json").read_text())["student"]["variant"]
        num_heads = parse_variant(variant)["num_heads"]
    return _pretrained_from_timm(formats.flax_to_timm(flatten_params(encoder)), num_heads)
