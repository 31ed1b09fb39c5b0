"""SAM's image encoder against segment-anything's ImageEncoderViT: numerics, config, CUDA lowering."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT

from dmt_jax.models.sam import SamConfig, SamEncoder

TOLERANCE = 1e-5
# Reduced sizes keep the suite fast; one full-size model (SAM B at 1024) checks the real shapes.
TINY = SamConfig(width=64, depth=2, num_heads=2, mlp_dim=256, img_size=64, global_attn_indexes=(1,))
H_REDUCED = SamConfig(width=1280, depth=3, num_heads=16, mlp_dim=5120, img_size=256, global_attn_indexes=(1,))
B_FULL = SamConfig(width=768, depth=12, num_heads=12, mlp_dim=3072, global_attn_indexes=(2, 5, 8, 11))


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


@torch.no_grad()
def random_reference(config: SamConfig, seed: int = 0) -> ImageEncoderViT:
    """segment-anything's encoder as build_sam_vit_* makes it, random values in every parameter
    (LayerNorm scales and biases, relative position tables and the neck too)."""
    torch.manual_seed(seed)
    model = ImageEncoderViT(
        img_size=config.img_size,
        patch_size=config.patch_size,
        embed_dim=config.width,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_dim / config.width,
        out_chans=config.out_chans,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=config.ln_eps),
        use_rel_pos=config.use_rel_pos,
        window_size=config.window_size,
        global_attn_indexes=config.global_attn_indexes,
    )
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim == 1 and name.endswith("weight"):  # LayerNorm / LayerNorm2d scales
            p.copy_(1.0 + 0.3 * noise)
        elif name.endswith("bias") or "pos" in name:  # biases, pos_embed, rel_pos_h/w
            p.copy_(0.3 * noise)
        else:  # Linear / conv weights, scaled to keep activations O(1)
            p.copy_(noise / p[0].numel() ** 0.5)
    return model.eval()


def flax_params(model: torch.nn.Module) -> dict:
    """segment-anything names -> Flax paths: 'blocks.3.attn.qkv.weight' -> blocks_3/attn/qkv/kernel."""
    params: dict = {}
    for name, value in model.state_dict().items():
        a = value.detach().numpy()
        parts = name.replace(".weight", ".kernel" if a.ndim in (2, 4) else ".scale").split(".")
        path = []
        for part in parts:
            if part.isdigit():
                path[-1] += f"_{part}"
            else:
                path.append(part)
        if path[-1] == "kernel":  # Linear [out, in] -> [in, out]; conv OIHW -> HWIO
            a = a.T if a.ndim == 2 else a.transpose(2, 3, 1, 0)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(a)
    return {"params": params}


def random_images(config: SamConfig, batch: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 3, config.img_size, config.img_size), generator=gen)


def reference_tokens(model: ImageEncoderViT, images: torch.Tensor) -> np.ndarray:
    """ImageEncoderViT's NCHW neck output as tokens [B, H*W, C], row-major over the grid."""
    with torch.no_grad():
        out = model(images)
    return out.permute(0, 2, 3, 1).reshape(out.shape[0], -1, out.shape[1]).numpy()


def check_against_reference(config: SamConfig, batch: int) -> float:
    torch.backends.cuda.matmul.allow_tf32 = False
    reference = random_reference(config)
    images = random_images(config, batch)
    expected = reference_tokens(reference, images)
    out = jax.jit(SamEncoder(config).apply)(
        flax_params(reference), jnp.asarray(images.permute(0, 2, 3, 1).numpy())
    )
    assert out.prefix.shape == (batch, 0, config.out_chans)
    assert out.summary is None
    assert out.patches.shape == (batch, config.grid**2, config.out_chans) == expected.shape
    assert out.tokens().shape == expected.shape
    err = relative_error(out.patches, expected)
    assert err < TOLERANCE, err
    return err


def test_config_dict_round_trip_and_errors():
    assert SamConfig.from_dict(B_FULL.to_dict()) == B_FULL
    assert hash(SamConfig.from_dict(B_FULL.to_dict())) == hash(B_FULL)
    assert B_FULL.grid == 64 and B_FULL.attn_size(2) == 64 and B_FULL.attn_size(0) == 14
    with pytest.raises(ValueError, match=r"unknown fields \['heads'\], missing fields \['num_heads'\]"):
        SamConfig.from_dict({**{k: v for k, v in B_FULL.to_dict().items() if k != "num_heads"}, "heads": 12})
    with pytest.raises(ValueError, match="not a multiple of num_heads") as e:
        SamConfig(width=100, depth=2, num_heads=3, mlp_dim=4, global_attn_indexes=(5,))
    assert "global_attn_indexes [5] must lie in [0, 2)" in str(e.value) and "\n" not in str(e.value)


def test_reduced_h_matches_segment_anything():
    """SAM H's width and heads, 3 blocks, 256 px: a 16x16 grid, windows of 14 padded to 28 (4 windows)."""
    check_against_reference(H_REDUCED, batch=2)


def test_full_size_b_matches_segment_anything():
    """SAM B as released (1024 px: 64x64 grid, 25 padded windows, 127-row global tables), one image."""
    check_against_reference(B_FULL, batch=1)


def test_tiny_grid_smaller_than_window_and_wrong_size():
    """A 4x4 grid inside one 14x14 window (10 rows and columns of padding); other sizes are refused."""
    check_against_reference(TINY, batch=2)
    model = SamEncoder(TINY)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(
        ValueError, match="6x6 patch grid.*table is 4x4.*convert the checkpoint with --img-size"
    ):
        jax.eval_shape(model.apply, params, jnp.zeros((1, 96, 96, 3)))


def test_bfloat16_close_to_float32():
    model32, model16 = SamEncoder(TINY), SamEncoder(TINY, dtype=jnp.bfloat16)
    params = flax_params(random_reference(TINY))
    images = jnp.asarray(random_images(TINY, 2).permute(0, 2, 3, 1).numpy())
    out16 = jax.jit(model16.apply)(params, images).patches
    assert out16.dtype == jnp.bfloat16
    assert relative_error(out16.astype(jnp.float32), jax.jit(model32.apply)(params, images).patches) < 3e-2


def test_cuda_lowering_batches_windows_into_one_cudnn_call_per_block():
    """bf16 with cuDNN, lowered for CUDA on the CPU: one fused attention call per block, the windows
    in its batch, the relative positions as its bias, q/k/v straight from GEMMs, no loop."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import inspect_cuda

    inspect_cuda.stub_cudnn_version()
    config = SamConfig(width=64, depth=3, num_heads=2, mlp_dim=256, img_size=512, global_attn_indexes=(1,))
    model = SamEncoder(config, dtype=jnp.bfloat16, attention="cudnn")
    images = jax.ShapeDtypeStruct((2, 512, 512, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), images)
    text = inspect_cuda.lower_for_cuda(jax.jit(lambda p, x: model.apply(p, x).patches), params, images)
    found = inspect_cuda.inspect(text, patch_size=16, grid=32)
    assert found.attention_calls == 3 and found.direct_inputs == 9 and not found.copied_inputs
    calls = [line for line in text.splitlines() if "fmhaScaleBiasSoftmax" in line and "custom_call" in line]
    # 32x32 grid: 3x3 windows of 14 (padded to 42) per image -> batch 18; the global block: batch 2.
    window = ", ".join(["tensor<18x196x2x32xbf16>"] * 3 + ["tensor<18x2x196x196xbf16>"])
    glob = ", ".join(["tensor<2x1024x2x32xbf16>"] * 3 + ["tensor<2x2x1024x1024xbf16>"])
    assert [window in calls[0], glob in calls[1], window in calls[2]] == [True] * 3, calls
    assert "stablehlo.while" not in text
