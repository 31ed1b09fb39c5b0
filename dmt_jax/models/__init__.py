"""Model families: one module per architecture, each a frozen config + a Flax module returning Features.

`FAMILIES[name] = (Config, Module)`; `build_model(family, config)` is `Module(config)` for a family
whose module takes its config, and `config.module(...)` for the ViT (whose module keeps the student's
keyword fields). models/ imports nothing from the rest of dmt_jax.
"""

from typing import Any

import jax.numpy as jnp

from dmt_jax.models.eva import Eva, EvaConfig
from dmt_jax.models.features import Features
from dmt_jax.models.sam import SamConfig, SamEncoder
from dmt_jax.models.vit import (
    VARIANTS,
    ViT,
    ViTConfig,
    num_heads_for_width,
    parse_variant,
    sincos_pos_embed_2d,
    variant_name,
)

FAMILIES: dict[str, tuple[type, type]] = {
    "vit": (ViTConfig, ViT),
    "eva": (EvaConfig, Eva),
    "sam": (SamConfig, SamEncoder),
}


def family_config(family: str, data: dict):
    """The family's config from its JSON dict; ValueError (one line) for an unknown family or bad fields."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family][0].from_dict(data)


def build_model(family: str, config, dtype: Any = jnp.float32, attention: str = "auto"):
    """The family's Flax module: `__call__(images) -> Features` (normalized NHWC images at img_size)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    config_cls, module_cls = FAMILIES[family]
    if not isinstance(config, config_cls):
        raise TypeError(f"family {family!r} takes a {config_cls.__name__}, got {type(config).__name__}")
    if hasattr(config, "module"):
        return config.module(dtype=dtype, attention=attention)
    return module_cls(config, dtype=dtype, attention=attention)


__all__ = [
    "FAMILIES",
    "Eva",
    "EvaConfig",
    "VARIANTS",
    "Features",
    "SamConfig",
    "SamEncoder",
    "ViT",
    "ViTConfig",
    "build_model",
    "family_config",
    "num_heads_for_width",
    "parse_variant",
    "sincos_pos_embed_2d",
    "variant_name",
]
