"""The classifier: a ViT encoder, its pooling and a linear head (timm's), built from a config and an
optional init; its export as a timm state dict."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dmt_jax import formats
from dmt_jax.errors import UserError
from dmt_jax.models.vit import LayerNorm, ViT, parse_variant
from dmt_jax.teachers import flatten_params

EXPORT_NAME = "classifier_timm.safetensors"
# The classifier's own parameters beside the encoder's (formats.NAME_TABLE): timm name, Flax path, change.
HEAD_NAMES = (
    ("fc_norm.weight", "fc_norm/scale", formats.COPY),
    ("fc_norm.bias", "fc_norm/bias", formats.COPY),
    ("head.weight", "head/kernel", formats.LINEAR),
    ("head.bias", "head/bias", formats.COPY),
)


class Classifier(nn.Module):
    """ViT encoder + (mean of the patch tokens, fc_norm) or the CLS token + a linear head, as timm's."""

    encoder: ViT
    num_classes: int
    global_pool: str = "avg"
    head_init_std: float = 2e-5

    @nn.compact
    def __call__(self, images, train: bool = False):
        tokens = self.encoder(images, train=train)
        if self.global_pool == "avg":
            pooled = tokens[:, self.encoder.num_prefix_tokens :].mean(axis=1)
            pooled = LayerNorm(dtype=self.encoder.dtype, name="fc_norm")(pooled)
        else:
            pooled = tokens[:, 0]
        head = nn.Dense(
            self.num_classes, kernel_init=nn.initializers.truncated_normal(self.head_init_std), name="head"
        )
        return head(pooled.astype(jnp.float32))


@flax.struct.dataclass
class FinetuneState:
    step: jax.Array
    params: Any  # {'encoder': ..., 'fc_norm': ..., 'head': ...}
    opt_state: Any
    rng: jax.Array
    ema: Any  # EMA of params when ema_decay > 0, else a 0 placeholder


def build_model(config, pretrained, num_classes: int) -> Classifier:
    """The classifier of the config; with a `pretrained` (pretrained.Pretrained) its encoder's shape."""
    variant = parse_variant(config.model.variant)
    if pretrained:
        a = pretrained.arch
        shape = dict(width=a.width, depth=a.depth, num_heads=pretrained.num_heads, mlp_dim=a.mlp_dim)
        if (a.width, a.depth, a.mlp_dim, a.patch_size) != tuple(
            variant[k] for k in ("width", "depth", "mlp_dim", "patch_size")
        ):
            raise UserError(
                f"--config.init is a ViT {a.variant} but --config.model.variant={config.model.variant!r}: "
                f"set --config.model.variant={a.variant!r}"
            )
        if a.grid * a.patch_size != config.img_size:
            raise UserError(
                f"--config.init has position embeddings for {a.grid * a.patch_size} px but "
                f"--config.img_size={config.img_size}: fine-tune at {a.grid * a.patch_size} px (or convert "
                "the teacher with `dmt-convert --img-size`)"
            )
        extra = dict(
            num_reg_tokens=a.num_reg_tokens,
            no_embed_class=a.no_embed_class,
            layerscale_init=1.0 if a.layerscale else None,
        )
    else:
        shape = {k: variant[k] for k in ("width", "depth", "num_heads", "mlp_dim")}
        extra = dict(
            num_reg_tokens=config.model.num_reg_tokens,
            layerscale_init=config.model.layerscale_init if config.model.layerscale_init > 0 else None,
        )
    encoder = ViT(
        **shape,
        **extra,
        patch_size=variant["patch_size"],
        img_size=config.img_size,
        pos_embed=config.model.pos_embed,
        drop_path=config.model.drop_path,
        dtype=jnp.dtype(config.dtype),
        residual_dtype=jnp.dtype(config.model.residual_dtype) if config.model.residual_dtype else None,
        attention=config.attention,
        remat=config.remat,
        final_norm=config.model.global_pool == "token",
    )
    return Classifier(encoder, num_classes, config.model.global_pool, config.model.head_init_std)


def classifier_state_dict(params) -> dict[str, np.ndarray]:
    """The classifier's params -> timm names (the export name table plus HEAD_NAMES), float32."""
    flat = dict(flatten_params(params))
    state = {
        timm_name: formats.TO_TIMM[change](np.asarray(flat.pop(flax_name), np.float32))
        for timm_name, flax_name, change in HEAD_NAMES
        if flax_name in flat
    }
    encoder = {k.removeprefix("encoder/"): np.asarray(v, np.float32) for k, v in flat.items()}
    state.update(formats.flax_to_timm(encoder))
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def export_classifier(model: Classifier, params, path, *, img_size: int, mean, std, crop_pct: float) -> dict:
    """Writes the classifier as a timm state dict with its kwargs and pretrained_cfg (export.py's);
    returns the timm kwargs: `VisionTransformer(**kwargs).load_state_dict(file, strict=True)`."""
    from dmt_jax import export

    state = classifier_state_dict(params)
    kwargs = export.timm_model_kwargs(state, model.encoder.num_heads)
    kwargs.update(global_pool=model.global_pool, num_classes=model.num_classes)
    cfg = export.timm_pretrained_cfg(
        img_size, num_classes=model.num_classes, mean=mean, std=std, crop_pct=crop_pct
    )
    export.save_timm_file(state, path, kwargs, cfg)
    return kwargs
