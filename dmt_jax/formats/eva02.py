"""baaivision/EVA: the EVA-02 MIM files and EVA-CLIP vision towers; OpenCLIP's EVA02-* (timm trunks).

Layouts (all read down to timm's Eva names, as timm's eva.checkpoint_filter_fn does):
- MIM (EVA-02/asuka): `eva02_{B,L}_pt_*_p14.pt` = {'module' | 'model': sd} or sd: patch_embed.proj,
  cls_token, pos_embed, blocks.N.{norm1, attn.{q,k,v}_proj.weight, attn.{q,v}_bias, attn.proj, norm2,
  mlp.{w1, w2, ffn_ln, w3}}, norm; dropped: mask_token, lm_head.* (the MIM head) and the RoPE buffers
  (rope.freqs_cos/sin, also under every block: recomputed from the grid, never read). The Ti/S files
  fuse attn.qkv (rows q; k; v) and mlp.w12 (rows w1; w2) and have no ffn_ln: split here.
- EVA-CLIP (EVA-CLIP/rei): `EVA02_CLIP_*.pt` = the whole CLIP; the vision tower under `visual.` adds
  attn.inner_attn_ln and the image projection `head`; the text tower and logit_scale are dropped.
- OpenCLIP (`EVA02-B-16` ...): `open_clip_pytorch_model.bin`, the tower is timm's Eva under
  `visual.trunk.` (already timm's names; its `head` is the projection).
Position tables resize with EVA's own interpolation (bicubic to a size, no antialias: EVA-02's
run_class_finetuning, EVA-CLIP's resize_evaclip_pos_embed), for the OpenCLIP towers too (their weights
are EVA-CLIP's; OpenCLIP itself never resizes a timm trunk). RoPE keeps its 16-grid frequencies and is
recomputed for the new grid, as timm (ref_feat_shape) and EVA (intp_freq) do.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from dmt_jax.formats._base import (
    OPENAI_MEAN,
    OPENAI_STD,
    CheckpointFormat,
    FormatError,
    name_list,
    resize_pos_embed,
)
from dmt_jax.formats.names_eva import eva_config, to_flax
from dmt_jax.models.eva import EvaConfig

# EVA's own loaders look under these keys, in this order (asuka --model_key 'model|module', EVA-CLIP
# load_state_dict 'model|module|state_dict'), then strip a DDP 'module.' prefix.
WRAPPERS = ("model", "module", "state_dict")
RESIZE_METHOD = "bicubic_size"
DROPPED = re.compile(r"^(mask_token|lm_head\..*)$|(^|\.)rope\.")  # MIM head, RoPE buffers
SWAPS = (
    ("attn.q_bias", "attn.q_proj.bias"),
    ("attn.v_bias", "attn.v_proj.bias"),
    ("attn.inner_attn_ln.", "attn.norm."),
    ("mlp.ffn_ln.", "mlp.norm."),
    ("mlp.w1.", "mlp.fc1_g."),
    ("mlp.w2.", "mlp.fc1_x."),
    ("mlp.w3.", "mlp.fc2."),
)


def _state_dict(ckpt: Mapping) -> Mapping:
    """The tensors, unwrapped as EVA's loaders do (no error: detect() asks this of any file)."""
    for key in WRAPPERS:
        if isinstance(ckpt.get(key), Mapping):
            ckpt = ckpt[key]
            break
    keys = [k for k in ckpt if isinstance(k, str)]
    if keys and all(k.startswith("module.") for k in keys):
        ckpt = {k.removeprefix("module."): v for k, v in ckpt.items()}
    return ckpt


def _tower(sd: Mapping) -> tuple[str, dict]:
    """(layout, the vision tower's tensors with its prefix stripped)."""
    if any(isinstance(k, str) and k.startswith("visual.trunk.") for k in sd):
        if other := sorted(k for k in sd if k.startswith("visual.") and not k.startswith("visual.trunk.")):
            raise FormatError(
                f"an OpenCLIP EVA tower with a projection outside its timm trunk ({name_list(other)}) "
                "is not supported: the EVA02-* towers project with the trunk's head"
            )
        return "openclip", {
            k.removeprefix("visual.trunk."): v for k, v in sd.items() if k.startswith("visual.trunk.")
        }
    if any(isinstance(k, str) and k.startswith("visual.") for k in sd):
        return "eva_clip", {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    return "mim", dict(sd)


def _split_rows(t, parts: int):
    n = t.shape[0] // parts
    return [t[i * n : (i + 1) * n] for i in range(parts)]


def to_reference(ckpt: Mapping) -> dict:
    """The vision tower's tensors under timm's Eva names."""
    _, tower = _tower(_state_dict(ckpt))
    out = {}
    for name, tensor in tower.items():
        if DROPPED.search(name):
            continue
        if m := re.match(r"(blocks\.\d+\.attn\.)qkv\.weight$", name):  # Ti/S: fused, rows [q; k; v]
            for part, t in zip(("q", "k", "v"), _split_rows(tensor, 3), strict=True):
                out[f"{m.group(1)}{part}_proj.weight"] = t
            continue
        if m := re.match(r"(blocks\.\d+\.mlp\.)w12\.(weight|bias)$", name):  # Ti/S: fused, rows [w1; w2]
            gate, value = _split_rows(tensor, 2)
            out[f"{m.group(1)}fc1_g.{m.group(2)}"], out[f"{m.group(1)}fc1_x.{m.group(2)}"] = gate, value
            continue
        for old, new in SWAPS:
            name = name.replace(old, new)
        out[name] = tensor
    if "fc_norm.weight" in out and "norm.weight" not in out:
        raise FormatError(
            "this file pools with fc_norm and has no final norm on the tokens (an EVA-02 fine-tuned "
            "classifier, or timm's repackaging of the MIM weights): convert the official MIM file "
            "(eva02_*_pt_*.pt) or an EVA-CLIP / OpenCLIP tower instead"
        )
    return out


def detect(ckpt: Mapping) -> bool:
    """EVA's SwiGLU (mlp.w3), or timm's Eva SwiGLU (fc1_g) beside split q/k/v projections."""
    try:
        _, tower = _tower(_state_dict(ckpt))
    except FormatError:
        return True  # an OpenCLIP EVA tower of an unsupported kind: to_reference says so
    keys = [k for k in tower if isinstance(k, str)]
    official = any(re.match(r"blocks\.\d+\.mlp\.w3\.weight$", k) for k in keys)
    timm = any(re.match(r"blocks\.\d+\.mlp\.fc1_g\.weight$", k) for k in keys) and any(
        re.match(r"blocks\.\d+\.attn\.q_proj\.weight$", k) for k in keys
    )
    return official or timm


def resize(sd: dict, config: EvaConfig, img_size: int) -> tuple[dict, EvaConfig, str]:
    """The position table's grid rows resized to img_size / patch (the config's rope_ref_grid stays)."""
    sd = dict(sd)
    grid = img_size // config.patch_size
    sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], config.num_prefix_tokens, grid, RESIZE_METHOD)
    return sd, dataclasses.replace(config, img_size=img_size), RESIZE_METHOD


resize.method = lambda config: RESIZE_METHOD  # formats.resize_method


FORMAT = CheckpointFormat(
    name="eva02",
    repo="baaivision/EVA",
    family="eva",
    detect=detect,
    to_reference=to_reference,
    infer=eva_config,
    to_flax=to_flax,
    resize=resize,
    mean=OPENAI_MEAN,
    std=OPENAI_STD,
    input_resize="bicubic",
    options=("num_heads",),
    summary="EVA-02 MIM (eva02_*_pt_*.pt), EVA-CLIP towers (EVA02_CLIP_*.pt), OpenCLIP EVA02-* towers",
)
