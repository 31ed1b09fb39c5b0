"""Test helper: timm ViTs with random weights, saved the way each teacher repository saves its files.

Every layout reverses what dmt_jax/formats.py undoes (prefixes, wrappers, heads, momentum encoders,
DINOv2's register folding), and adds the junk the real files carry, so conversion is tested on the
same structure it meets in the wild. Values are random everywhere, LayerNorm and LayerScale included:
ones and zeros would hide a transposed or swapped tensor.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from timm.models.vision_transformer import VisionTransformer

from dmt_jax.teachers import num_heads_for_width


@dataclasses.dataclass(frozen=True)
class VitConfig:
    width: int = 64
    depth: int = 2
    patch: int = 16
    img_size: int = 64
    reg_tokens: int = 0
    no_embed_class: bool = False
    layerscale: bool = False


TINY = VitConfig()
TINY_14 = VitConfig(patch=14, img_size=56, layerscale=True)
TINY_14_REG = VitConfig(patch=14, img_size=56, layerscale=True, reg_tokens=4, no_embed_class=True)
# Real width, reduced depth: realistic numerics, fast.
B16 = VitConfig(width=768, depth=2, img_size=224)
B16_LS = dataclasses.replace(B16, layerscale=True)
B14_518 = VitConfig(width=768, depth=2, patch=14, img_size=518, layerscale=True)
B14_518_REG = dataclasses.replace(B14_518, reg_tokens=4, no_embed_class=True)


def random_timm_vit(config: VitConfig, seed: int = 0) -> VisionTransformer:
    model = VisionTransformer(
        img_size=config.img_size,
        patch_size=config.patch,
        embed_dim=config.width,
        depth=config.depth,
        num_heads=num_heads_for_width(config.width),
        mlp_ratio=4.0,
        num_classes=0,
        reg_tokens=config.reg_tokens,
        no_embed_class=config.no_embed_class,
        init_values=1e-5 if config.layerscale else None,
    )
    randomize_(model, seed)
    return model.eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("gamma"):
            p.copy_(0.5 + 0.3 * noise)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.3 * noise)
        elif name.endswith("bias") or name in ("cls_token", "reg_token", "pos_embed"):
            p.copy_(0.3 * noise)
        else:  # Linear / conv weights, scaled to keep activations O(1)
            p.copy_(noise / p[0].numel() ** 0.5)


def _noise(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen)


def timm_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _perturbed(sd: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Another network of the same shape (a momentum encoder, a DINO student): must not be picked."""
    return {k: v + 0.5 * _noise(gen, *v.shape) for k, v in sd.items()}


def _mlp_head(
    prefix: str, width: int, gen: torch.Generator, batchnorm: bool = False
) -> dict[str, torch.Tensor]:
    head = {f"{prefix}0.weight": _noise(gen, 32, width), f"{prefix}0.bias": _noise(gen, 32)}
    if batchnorm:  # MoCo v3's projector: Linear, BatchNorm1d, ... (BN buffers include an int64 counter)
        head |= {f"{prefix}1.weight": _noise(gen, 32), f"{prefix}1.running_mean": _noise(gen, 32)}
        head[f"{prefix}1.num_batches_tracked"] = torch.tensor(7)
    return head


def mae_layout(model, full: bool = False):
    """mae_pretrain_vit_*.pth: {'model': encoder}; *_full.pth adds the decoder and mask_token (1,1,512)."""
    sd, gen = timm_state(model), torch.Generator().manual_seed(11)
    if full:
        width, tokens = model.embed_dim, model.pos_embed.shape[1]
        sd |= {
            "mask_token": _noise(gen, 1, 1, 512),
            "decoder_embed.weight": _noise(gen, 512, width),
            "decoder_embed.bias": _noise(gen, 512),
            "decoder_pos_embed": _noise(gen, 1, tokens, 512),
            "decoder_blocks.0.norm1.weight": _noise(gen, 512),
            "decoder_norm.weight": _noise(gen, 512),
            "decoder_pred.weight": _noise(gen, 3 * model.patch_embed.patch_size[0] ** 2, 512),
        }
    return {"model": sd}


def mocov3_layout(model):
    """vit-b-300ep.pth.tar: {'epoch', 'arch', 'state_dict', 'optimizer'} with base + momentum encoders."""
    sd, gen, width = timm_state(model), torch.Generator().manual_seed(12), model.embed_dim
    state = {f"module.base_encoder.{k}": v for k, v in sd.items()}
    state |= {f"module.momentum_encoder.{k}": v for k, v in _perturbed(sd, gen).items()}
    state |= _mlp_head("module.base_encoder.head.", width, gen, batchnorm=True)
    state |= _mlp_head("module.momentum_encoder.head.", width, gen, batchnorm=True)
    state |= _mlp_head("module.predictor.", 256, gen, batchnorm=True)
    optimizer = {"state": {0: {"exp_avg": _noise(gen, 4)}}, "param_groups": [{"lr": 1.5e-4, "params": [0]}]}
    return {"epoch": 300, "arch": "vit_base", "state_dict": state, "optimizer": optimizer}


def dino_layout(model, full: bool = False):
    """dino_vit*_pretrain.pth: the plain backbone; the training file: student, teacher, args, ..."""
    sd, gen, width = timm_state(model), torch.Generator().manual_seed(13), model.embed_dim
    if not full:
        return sd
    head = {"mlp.0.weight": _noise(gen, 32, width), "last_layer.weight_g": _noise(gen, 65, 1)}
    teacher = {f"backbone.{k}": v for k, v in sd.items()} | {f"head.{k}": v for k, v in head.items()}
    student = {f"module.backbone.{k}": v for k, v in _perturbed(sd, gen).items()}
    student |= {f"module.head.{k}": v for k, v in head.items()}
    args = argparse.Namespace(arch="vit_base", patch_size=16, out_dim=65, norm_last_layer=True, lr=5e-4)
    return {
        "student": student,
        "teacher": teacher,
        "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": []}]},
        "epoch": 100,
        "args": args,
        "dino_loss": {"center": _noise(gen, 1, 65)},
    }


def ibot_layout(model, student_extras: bool = False):
    """checkpoint_teacher.pth: {'state_dict': backbone}, LayerScale as blocks.N.gamma_1/gamma_2."""
    gen = torch.Generator().manual_seed(14)
    sd = {
        k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v
        for k, v in timm_state(model).items()
    }
    if student_extras:  # what a student backbone file carries on top
        sd |= {
            "masked_embed": _noise(gen, 1, model.embed_dim),
            "head.mlp.0.weight": _noise(gen, 32, model.embed_dim),
        }
    return {"state_dict": sd}


def dinov2_layout(model):
    """dinov2_vit*14[_reg4]_pretrain.pth: plain, plus mask_token (1, D); registers as register_tokens
    with the CLS position row kept in pos_embed (the reverse of timm's _convert_dinov2)."""
    sd, gen = timm_state(model), torch.Generator().manual_seed(15)
    sd["mask_token"] = _noise(gen, 1, model.embed_dim)
    if "reg_token" in sd:
        cls_pos = 0.3 * _noise(gen, 1, 1, model.embed_dim)
        sd["register_tokens"] = sd.pop("reg_token")
        sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
        sd["cls_token"] = sd["cls_token"] - cls_pos
    return sd


# case -> (model config, layout, format dmt-convert must detect)
CASES = {
    "mae": (B16, mae_layout, "mae"),
    "mae_full": (B16, lambda m: mae_layout(m, full=True), "mae"),
    "mocov3": (B16, mocov3_layout, "mocov3"),
    "dino": (B16, dino_layout, "dino"),
    "dino_full": (B16, lambda m: dino_layout(m, full=True), "dino"),
    "ibot": (B16, ibot_layout, "ibot"),
    "ibot_layerscale": (B16_LS, lambda m: ibot_layout(m, student_extras=True), "ibot"),
    "dinov2": (B14_518, dinov2_layout, "dinov2"),
    "dinov2_reg4": (B14_518_REG, dinov2_layout, "dinov2"),
}
