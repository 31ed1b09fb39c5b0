"""Test helper: timm ViTs with random weights, saved the way each teacher repository saves its files.

Every layout reverses what dmt_jax/formats.py undoes (prefixes, wrappers, heads, momentum encoders,
DINOv2's register folding), and adds the junk the real files carry, so conversion is tested on the
same structure it meets in the wild. Values are random everywhere, LayerNorm and LayerScale included:
ones and zeros would hide a transposed or swapped tensor.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings

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


# ---------------------------------------------------------------- CLIP / OpenCLIP (open_clip) and SigLIP

# A small text tower: the files carry one, conversion must drop it, its size does not matter.
TINY_TEXT = dict(context_length=8, vocab_size=64, width=64, heads=1, layers=1)


@torch.no_grad()
def randomize_all_(model: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter of any model (open_clip's ln_*, embeddings and scalars too)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma":
            p.copy_(0.5 + 0.3 * noise)
        elif ("norm" in name or "ln_" in name) and leaf == "weight":
            p.copy_(1.0 + 0.3 * noise)
        elif (
            p.ndim <= 1
            or leaf in ("bias", "latent")
            or "embedding" in leaf
            or leaf in ("cls_token", "pos_embed")
        ):
            p.copy_(0.3 * noise)
        else:  # Linear / conv weights and CLIP's proj, scaled to keep activations O(1)
            p.copy_(noise / p[0].numel() ** 0.5)


def random_open_clip(width: int, layers: int, patch: int, img_size: int, *, quick_gelu: bool = False,
                     layerscale: bool = False, embed_dim: int = 32, seed: int = 0):  # fmt: skip
    """An open_clip CLIP (OpenAI's layout: visual.conv1, visual.transformer.resblocks.N, ...)."""
    import open_clip

    vision = dict(layers=layers, width=width, patch_size=patch, image_size=img_size,
                  ls_init_value=0.1 if layerscale else None)  # fmt: skip
    model = open_clip.model.CLIP(embed_dim, vision, TINY_TEXT, quick_gelu=quick_gelu)
    randomize_all_(model, seed)
    return model.eval()


def random_open_clip_timm_trunk(timm_name: str, depth: int, embed_dim: int, seed: int = 0, **timm_kwargs):
    """An open_clip CLIP whose image tower is a timm trunk (open_clip's SigLIP configs: pool 'map', proj
    'none'), cut to `depth` blocks."""
    import open_clip

    vision = dict(timm_model_name=timm_name, timm_model_pretrained=False, timm_pool="map", timm_proj="none",
                  image_size=224)  # fmt: skip
    model = open_clip.model.CLIP(embed_dim, vision, TINY_TEXT)
    model.visual.trunk.blocks = model.visual.trunk.blocks[:depth]
    randomize_all_(model, seed)
    return model.eval()


def openai_torchscript(model, path, *, half: bool = True) -> None:
    """Saves `model` as OpenAI released CLIP: a TorchScript archive (traced), fp16, with the
    input_resolution entry OpenAI's state dicts carry (open_clip's CLIP has the other two already)."""
    size = model.visual.image_size[0]
    if not hasattr(model, "input_resolution"):
        model.register_buffer("input_resolution", torch.tensor(size))
    images, text = torch.zeros(1, 3, size, size), torch.zeros(1, 8, dtype=torch.long)
    with warnings.catch_warnings():  # tracing is deprecated and chatty; OpenAI's archives were traced
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (images, text), check_trace=False, strict=False)
    torch.jit.save(traced.half() if half else traced, str(path))


def big_vision_siglip(model, *, stacked: bool = False, prefix: str = "params/img/") -> dict:
    """A timm SigLIP ViT's weights as big_vision saves a SigLIP two-tower model (.npz arrays): the
    inverse of timm's _load_weights, plus a text tower and the logit scale/bias."""
    sd = {k: v.detach().numpy().astype("float32") for k, v in model.state_dict().items()}
    d = model.embed_dim
    h = model.blocks[0].attn.num_heads
    heads_in = lambda w: w.T.reshape(d, h, d // h)  # torch [out, in] -> [D, heads, head_dim]
    heads_out = lambda w: w.T.reshape(h, d // h, d)
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }

    def attention(out: str, q, k, v, qb, kb, vb, proj, proj_b):
        for name, kernel, bias in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            w[f"{out}{name}/kernel"], w[f"{out}{name}/bias"] = heads_in(kernel), bias.reshape(h, d // h)
        w[f"{out}out/kernel"], w[f"{out}out/bias"] = heads_out(proj), proj_b

    def mlp(out: str, src: str):
        for r in range(2):
            w[f"{out}Dense_{r}/kernel"] = sd[f"{src}fc{r + 1}.weight"].T
            w[f"{out}Dense_{r}/bias"] = sd[f"{src}fc{r + 1}.bias"]

    for i in range(len(model.blocks)):
        b, s = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        w[f"{b}LayerNorm_0/scale"], w[f"{b}LayerNorm_0/bias"] = sd[s + "norm1.weight"], sd[s + "norm1.bias"]
        w[f"{b}LayerNorm_1/scale"], w[f"{b}LayerNorm_1/bias"] = sd[s + "norm2.weight"], sd[s + "norm2.bias"]
        qkv, qkv_b = sd[s + "attn.qkv.weight"], sd[s + "attn.qkv.bias"]
        attention(f"{b}MultiHeadDotProductAttention_0/", *qkv.reshape(3, d, d), *qkv_b.reshape(3, d),
                  sd[s + "attn.proj.weight"], sd[s + "attn.proj.bias"])  # fmt: skip
        mlp(f"{b}MlpBlock_0/", s + "mlp.")
    m = "MAPHead_0/"
    w[m + "probe"] = sd["attn_pool.latent"]
    w[m + "LayerNorm_0/scale"], w[m + "LayerNorm_0/bias"] = (
        sd["attn_pool.norm.weight"],
        sd["attn_pool.norm.bias"],
    )
    kv, kv_b = sd["attn_pool.kv.weight"].reshape(2, d, d), sd["attn_pool.kv.bias"].reshape(2, d)
    attention(f"{m}MultiHeadDotProductAttention_0/", sd["attn_pool.q.weight"], *kv, sd["attn_pool.q.bias"],
              *kv_b, sd["attn_pool.proj.weight"], sd["attn_pool.proj.bias"])  # fmt: skip
    mlp(m + "MlpBlock_0/", "attn_pool.mlp.")
    if stacked:  # big_vision's scan layout: one encoderblock, the depth leading
        import numpy as np

        first = [k for k in w if k.startswith("Transformer/encoderblock_0/")]
        for k in first:
            rest = k.removeprefix("Transformer/encoderblock_0/")
            blocks = [w.pop(f"Transformer/encoderblock_{i}/{rest}") for i in range(len(model.blocks))]
            w[f"Transformer/encoderblock/{rest}"] = np.stack(blocks)
    gen = torch.Generator().manual_seed(16)
    text = {"txt/Encoder_0/encoder_norm/scale": _noise(gen, 64), "txt/Embed_0/embedding": _noise(gen, 64, 32),
            "txt/head/kernel": _noise(gen, 32, d), "t": _noise(gen, 1), "b": _noise(gen, 1)}  # fmt: skip
    out = {prefix + k: v for k, v in w.items()}
    out |= {prefix.removesuffix("img/") + k: v.numpy() for k, v in text.items()}
    return out
