"""google-research/big_vision SigLIP and SigLIP 2 (fixed resolution), the image tower: `.npz` files.

Keys `params/img/{embedding/{kernel,bias}, pos_embedding, Transformer/encoderblock_N/{LayerNorm_0,
MultiHeadDotProductAttention_0/{query,key,value,out}, LayerNorm_1, MlpBlock_0/Dense_{0,1}},
Transformer/encoder_norm, MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}}`
(or one stacked `Transformer/encoderblock` with the depth leading), beside the text tower (dropped).
big_vision/models/vit.py: no CLS token, learned position embedding added before the blocks, flax
nn.gelu (the tanh approximation), LayerNorm eps 1e-6, the MAP head's output is the image embedding
(no projection). Renamed to timm's names as timm's _load_weights reads these files; the head count
is the attention kernels' (D, heads, head_dim) shape. Inputs: squashed to img_size, mean = std = 0.5.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from dmt_jax.formats._base import HALF, CheckpointFormat, FormatError, Reference, any_key, name_list
from dmt_jax.formats.names_vit import pos_embed_resizer, to_flax, vit_config

# big_vision's decode_variant heads per width (its ViT-B 12, L/So400m/H/g/G 16, ...).
SIGLIP_HEADS = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1152: 16, 1280: 16, 1408: 16, 1536: 16,
                1664: 16, 1792: 16}  # fmt: skip
PREFIXES = ("params/img/", "img/", "params/", "")  # two-tower files, their image tower alone, a plain ViT
_BLOCK = r"Transformer/encoderblock_(\d+)/"
_ATTN = "MultiHeadDotProductAttention_0/"


def image_prefix(ckpt: Mapping) -> str | None:
    return next((p for p in PREFIXES if f"{p}embedding/kernel" in ckpt), None)


def _conv(a):  # HWIO -> OIHW
    return a.transpose(3, 2, 0, 1)


def _dense(a):  # [in, out] -> torch's [out, in]
    return a.T


def _heads_in(a):  # query/key/value kernel [D, heads, head_dim] -> [heads * head_dim, D]
    return a.reshape(a.shape[0], -1).T


def _heads_out(a):  # out kernel [heads, head_dim, D] -> [D, heads * head_dim]
    return a.reshape(-1, a.shape[-1]).T


def _flat(a):
    return a.reshape(-1)


def _same(a):
    return a


# big_vision name (after the prefix; N = block) -> timm name, array change
RENAMES = (
    ("embedding/kernel", "patch_embed.proj.weight", _conv),
    ("embedding/bias", "patch_embed.proj.bias", _same),
    ("pos_embedding", "pos_embed", _same),
    ("Transformer/encoder_norm/scale", "norm.weight", _same),
    ("Transformer/encoder_norm/bias", "norm.bias", _same),
    (_BLOCK + "LayerNorm_0/scale", r"blocks.\1.norm1.weight", _same),
    (_BLOCK + "LayerNorm_0/bias", r"blocks.\1.norm1.bias", _same),
    (_BLOCK + _ATTN + "out/kernel", r"blocks.\1.attn.proj.weight", _heads_out),
    (_BLOCK + _ATTN + "out/bias", r"blocks.\1.attn.proj.bias", _same),
    (_BLOCK + "LayerNorm_1/scale", r"blocks.\1.norm2.weight", _same),
    (_BLOCK + "LayerNorm_1/bias", r"blocks.\1.norm2.bias", _same),
    (_BLOCK + "MlpBlock_0/Dense_0/kernel", r"blocks.\1.mlp.fc1.weight", _dense),
    (_BLOCK + "MlpBlock_0/Dense_0/bias", r"blocks.\1.mlp.fc1.bias", _same),
    (_BLOCK + "MlpBlock_0/Dense_1/kernel", r"blocks.\1.mlp.fc2.weight", _dense),
    (_BLOCK + "MlpBlock_0/Dense_1/bias", r"blocks.\1.mlp.fc2.bias", _same),
    ("MAPHead_0/probe", "attn_pool.latent", _same),
    ("MAPHead_0/" + _ATTN + "query/kernel", "attn_pool.q.weight", _heads_in),
    ("MAPHead_0/" + _ATTN + "query/bias", "attn_pool.q.bias", _flat),
    ("MAPHead_0/" + _ATTN + "out/kernel", "attn_pool.proj.weight", _heads_out),
    ("MAPHead_0/" + _ATTN + "out/bias", "attn_pool.proj.bias", _same),
    ("MAPHead_0/LayerNorm_0/scale", "attn_pool.norm.weight", _same),
    ("MAPHead_0/LayerNorm_0/bias", "attn_pool.norm.bias", _same),
    ("MAPHead_0/MlpBlock_0/Dense_0/kernel", "attn_pool.mlp.fc1.weight", _dense),
    ("MAPHead_0/MlpBlock_0/Dense_0/bias", "attn_pool.mlp.fc1.bias", _same),
    ("MAPHead_0/MlpBlock_0/Dense_1/kernel", "attn_pool.mlp.fc2.weight", _dense),
    ("MAPHead_0/MlpBlock_0/Dense_1/bias", "attn_pool.mlp.fc2.bias", _same),
)
# Fused in timm: the blocks' query/key/value -> qkv, the MAP head's key/value -> kv (rows in this order).
FUSED = (
    (_BLOCK + _ATTN, ("query", "key", "value"), r"blocks.\1.attn.qkv"),
    ("MAPHead_0/" + _ATTN, ("key", "value"), "attn_pool.kv"),
)
_RULES = [(re.compile(src + "$"), dst, change) for src, dst, change in RENAMES]


def _unstack(w: dict) -> dict:
    """The scanned layout (one Transformer/encoderblock with the depth leading) as encoderblock_N."""
    stacked = {k: v for k, v in w.items() if k.startswith("Transformer/encoderblock/")}
    if not stacked:
        return w
    depths = {np.shape(v)[0] if np.ndim(v) else 0 for v in stacked.values()}
    if len(depths) != 1 or 0 in depths:
        raise FormatError(
            f"the stacked Transformer/encoderblock has arrays of different depths: {sorted(depths)}"
        )
    out = {k: v for k, v in w.items() if k not in stacked}
    for name, value in stacked.items():
        rest = name.removeprefix("Transformer/encoderblock/")
        out.update({f"Transformer/encoderblock_{i}/{rest}": value[i] for i in range(len(value))})
    return out


def to_reference(ckpt: Mapping) -> Reference:
    prefix = image_prefix(ckpt)
    if prefix is None:
        raise FormatError(
            f"a big_vision ViT file has params/img/embedding/kernel; keys seen: {name_list(sorted(ckpt), 10)}"
        )
    w = _unstack({k[len(prefix) :]: v for k, v in ckpt.items() if k.startswith(prefix)})
    if np.ndim(w["embedding/kernel"]) != 4:  # NaFlex: a Dense over flattened patches, no square grid
        raise FormatError(
            f"{prefix}embedding/kernel has shape {np.shape(w['embedding/kernel'])}: a NaFlex tower, which is "
            "not supported; use a fixed-resolution SigLIP / SigLIP 2 file (a (p, p, 3, width) kernel)"
        )
    if "MAPHead_0/probe" not in w:
        raise FormatError(
            f"no {prefix}MAPHead_0 in this big_vision file: SigLIP's image embedding is its MAP head's "
            "output (a ViT with another pool type is not a SigLIP image tower)"
        )
    out, used = {}, set()
    for pattern, parts, target in FUSED:
        for name in w:
            if (m := re.fullmatch(pattern + parts[0] + "/kernel", name)) is None:
                continue
            base = name[: -len(parts[0] + "/kernel")]
            for leaf, change in (("kernel", _heads_in), ("bias", _flat)):
                keys = [f"{base}{p}/{leaf}" for p in parts]
                if missing := [k for k in keys if k not in w]:
                    raise FormatError(f"missing tensors: {prefix}{missing[0]}")
                try:
                    out[m.expand(target) + (".weight" if leaf == "kernel" else ".bias")] = np.concatenate(
                        [change(w[k]) for k in keys], axis=0
                    )
                except ValueError as e:
                    shapes = ", ".join(f"{k} {np.shape(w[k])}" for k in keys)
                    raise FormatError(f"attention tensors that do not fit together: {shapes}") from e
                used.update(keys)
    heads = [np.shape(v)[1] for k, v in w.items() if k.endswith(_ATTN + "query/kernel") and np.ndim(v) == 3]
    for name, value in w.items():
        if name in used:
            continue
        for pattern, target, change in _RULES:
            if m := pattern.match(name):
                out[m.expand(target)] = change(value)
                break
        else:
            out[prefix + name] = value  # not part of a SigLIP image tower: check_backbone lists it
    return Reference(out, num_heads=heads[0] if heads and len(set(heads)) == 1 else None)


def infer(sd: Mapping, options: Mapping):
    """No CLS, tanh GELU; the heads the kernels state, else big_vision's count for the width."""
    width = tuple(getattr(sd.get("patch_embed.proj.weight"), "shape", (0,)))[0]
    fixed = dict(extras=True, class_token=False, act="gelu_tanh", num_heads=SIGLIP_HEADS.get(width))
    return vit_config(sd, options, **fixed)


def detect(ckpt: Mapping) -> bool:
    prefix = image_prefix(ckpt)
    return prefix is not None and (prefix != "" or any_key(ckpt, "MAPHead_0/"))


FORMAT = CheckpointFormat(
    name="siglip",
    repo="google-research/big_vision",
    family="vit",
    detect=detect,
    to_reference=to_reference,
    infer=infer,
    to_flax=to_flax,
    resize=pos_embed_resizer(lambda c: "linear_zoom"),  # big_vision's resample_posemb
    mean=HALF,
    std=HALF,
    input_resize="squash",
    summary="SigLIP / SigLIP 2 image tower (big_vision .npz)",
)
