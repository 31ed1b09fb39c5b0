"""SAM's image encoder against segment-anything's ImageEncoderViT: numerics, config, CUDA lowering."""

from __future__ import annotations

import dataclasses
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from timm.layers import resample_abs_pos_embed_nhwc

from dmt_jax import convert, formats
from dmt_jax.errors import UserError
from dmt_jax.formats import names_sam
from dmt_jax.models.family import IMAGENET_MEAN, IMAGENET_STD
from dmt_jax.models.sam import SamConfig, SamEncoder
from dmt_jax.teachers import TeacherStack, load_teacher, unflatten_params

TOLERANCE = 1e-5
# Reduced sizes keep the suite fast; one full-size model (SAM B at 1024) checks the real shapes.
TINY = SamConfig(embed_dim=64, depth=2, num_heads=2, mlp_dim=256, img_size=64, global_attn_indexes=(1,))
H_REDUCED = SamConfig.from_size("H", depth=3, img_size=256, global_attn_indexes=(1,))
B_FULL = SamConfig.from_size("B")


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
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_dim / config.embed_dim,
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
    """The encoder's weights as SamEncoder's variables, through the format's name table."""
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return {"params": unflatten_params(names_sam.TABLE.to_flax(state))}


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
    print(f"{config.variant} at {config.img_size} px vs segment-anything: relative error {err:.2e}")
    assert err < TOLERANCE, err
    return err


def test_config_dict_round_trip_and_errors():
    assert SamConfig.from_dict(B_FULL.to_dict()) == B_FULL
    assert hash(SamConfig.from_dict(B_FULL.to_dict())) == hash(B_FULL)
    assert (B_FULL.variant, B_FULL.grid, B_FULL.width, B_FULL.num_tokens) == ("SAM-B/16", 64, 256, 4096)
    assert (B_FULL.attn_size(2), B_FULL.attn_size(0), B_FULL.summary_dim, B_FULL.num_prefix_tokens) == (
        64,
        14,
        0,
        0,
    )
    assert SamConfig.from_size("H").describe().startswith("SAM-H/16 (embed_dim 1280, depth 32, heads 16")
    with pytest.raises(
        ValueError, match=r"lacks the fields \['num_heads'\] and has unknown fields \['heads'\]"
    ):
        SamConfig.from_dict({**{k: v for k, v in B_FULL.to_dict().items() if k != "num_heads"}, "heads": 12})
    with pytest.raises(ValueError, match="num_heads 3 does not divide embed_dim 100") as e:
        SamConfig(embed_dim=100, depth=2, num_heads=3, mlp_dim=4, global_attn_indexes=(5,))
    assert "global_attn_indexes [5] must lie in [0, 2)" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="window_size must be a positive integer, got 0"):
        SamConfig.from_dict({**TINY.to_dict(), "window_size": 0})


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
    config = SamConfig(
        embed_dim=64, depth=3, num_heads=2, mlp_dim=256, img_size=512, global_attn_indexes=(1,)
    )
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


# ---------------------------------------------------- the official .pth -> dmt-convert -> load_teacher


# SAM-shaped and small: a 28x28 grid (2x2 windows of 14), two global blocks (55-row tables).
SMALL = SamConfig(embed_dim=64, depth=4, num_heads=2, mlp_dim=256, img_size=448, global_attn_indexes=(1, 3))


def whole_sam(encoder: ImageEncoderViT) -> Sam:
    """The encoder inside a whole SAM, prompt encoder and mask decoder as build_sam makes them."""
    grid, size = encoder.img_size // 16, encoder.img_size
    decoder = TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)
    return Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                     input_image_size=(size, size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=decoder, transformer_dim=256,
                                 iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()  # fmt: skip


def official_state(encoder: ImageEncoderViT) -> dict[str, torch.Tensor]:
    """What sam_vit_*.pth holds: Sam.state_dict() (image_encoder.*, prompt_encoder.*, mask_decoder.*)."""
    return whole_sam(encoder).state_dict()


def run_cli(*args) -> int:
    return convert.main([str(a) for a in args])


def teacher_tokens(teacher, images: torch.Tensor) -> np.ndarray:
    return np.asarray(teacher.features(jnp.asarray(images.permute(0, 2, 3, 1).numpy())))


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    reference = random_reference(SMALL, seed=3)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_s_0123ab.pth"
    torch.save(official_state(reference), path)
    return reference, path


def test_official_file_converts_to_segment_anythings_features(small_file, tmp_path):
    reference, src = small_file
    keys = list(torch.load(src, weights_only=True))
    assert {k.split(".")[0] for k in keys} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    assert run_cli(src, tmp_path / "sam") == 0
    teacher = load_teacher(tmp_path / "sam")
    spec = teacher.spec
    assert (spec.format, spec.family, spec.config, spec.input_resize) == ("sam", "sam", SMALL, "longest_pad")
    assert (spec.mean, spec.std, spec.pos_embed_resize) == (IMAGENET_MEAN, IMAGENET_STD, "none")
    assert (spec.width, spec.num_tokens, spec.summary_dim) == (256, 28 * 28, 0)
    images = random_images(SMALL, 2)
    err = relative_error(teacher_tokens(teacher, images), reference_tokens(reference, images))
    assert err < TOLERANCE, err
    with pytest.raises(UserError, match="has no image-level summary") as e:
        teacher.summary(jnp.zeros((1, 448, 448, 3)))
    assert "\n" not in str(e.value)


def test_resize_equals_segment_anything_at_that_size(small_file, tmp_path):
    """--img-size 320 (a 20x20 grid: windows of 14 padded to 28). The reference is segment-anything built
    at 320 px holding timm's resample_abs_pos_embed_nhwc of pos_embed and the ORIGINAL 55-row global
    tables, which its get_rel_pos interpolates to 39 rows at run time; windowed tables unchanged."""
    reference, src = small_file
    assert run_cli(src, tmp_path / "sam320", "--img-size", 320) == 0
    teacher = load_teacher(tmp_path / "sam320")
    assert (teacher.spec.img_size, teacher.spec.source_img_size) == (320, 448)
    assert teacher.spec.pos_embed_resize == "bicubic_size_antialias+rel_pos_linear"
    at_320 = dataclasses.replace(SMALL, img_size=320)
    resized = random_reference(at_320, seed=5)
    state = reference.state_dict()
    state["pos_embed"] = resample_abs_pos_embed_nhwc(state["pos_embed"], [20, 20])
    for i in SMALL.global_attn_indexes:  # room for the original 55-row tables (2*28-1; 320 px needs 39)
        attn = resized.blocks[i].attn
        attn.rel_pos_h = torch.nn.Parameter(torch.empty(55, 32))
        attn.rel_pos_w = torch.nn.Parameter(torch.empty(55, 32))
    resized.load_state_dict(state)
    images = random_images(at_320, 2)
    err = relative_error(teacher_tokens(teacher, images), reference_tokens(resized, images))
    assert err < TOLERANCE, err


def test_teacher_stack_pads_the_longest_side_as_sam_preprocess(small_file, tmp_path):
    """A 448 x 320 view: SAM's own preprocess normalizes with pixel_mean/std and zero-pads to 448 x 448."""
    reference, src = small_file
    assert run_cli(src, tmp_path / "sam") == 0
    stack = TeacherStack([load_teacher(tmp_path / "sam")], dtype=jnp.float32)
    pixels = torch.randint(0, 256, (2, 448, 320, 3), generator=torch.Generator().manual_seed(7)).float()
    (features,) = jax.jit(stack.features)(stack.params, jnp.asarray(pixels.numpy()))
    with torch.no_grad():
        padded = whole_sam(reference).preprocess(pixels.permute(0, 3, 1, 2))
    err = relative_error(features.tokens(), reference_tokens(reference, padded))
    assert err < TOLERANCE, err


def test_detection_and_the_help():
    state = official_state(random_reference(TINY))
    assert formats.detect(state) == "sam"
    assert formats.detect({k: v for k, v in state.items() if k.startswith("image_encoder.")}) == "sam"
    with pytest.raises(formats.FormatError, match="not recognized"):
        formats.detect({k: v for k, v in state.items() if not k.startswith("image_encoder.")})
    assert "sam " in convert._formats_help() and "segment-anything" in convert._formats_help()


def test_name_table_reads_both_ways():
    """segment-anything -> Flax -> segment-anything gives back every tensor unchanged (export's direction)."""
    state = {k: v.numpy() for k, v in random_reference(TINY).state_dict().items()}
    back = names_sam.to_reference(names_sam.TABLE.to_flax(state))
    assert sorted(back) == sorted(state) and all(np.array_equal(back[k], state[k]) for k in state)
    assert names_sam.expected_shapes(TINY) == {k: v.shape for k, v in state.items()}


def expect_refusal(capsys, tmp_path, state, *fragments, args=()) -> str:
    torch.save(state, tmp_path / "bad.pth")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run_cli(tmp_path / "bad.pth", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dmt-convert: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUT, no temp directory left
    return err


@pytest.fixture(scope="module")
def tiny_state():
    return official_state(random_reference(TINY))


def test_refuses_a_file_without_the_neck(capsys, tmp_path, tiny_state):
    state = {k: v for k, v in tiny_state.items() if not k.startswith("image_encoder.neck.2")}
    expect_refusal(capsys, tmp_path, state, "missing tensors: neck.2.weight")
    state = {k: v for k, v in tiny_state.items() if not k.startswith("image_encoder.neck.")}
    expect_refusal(capsys, tmp_path, state, "missing tensors: neck.0.weight")


def test_refuses_extra_or_missing_blocks(capsys, tmp_path, tiny_state):
    extra = {k.replace(".blocks.1.", ".blocks.7."): v for k, v in tiny_state.items() if ".blocks.1." in k}
    expect_refusal(
        capsys, tmp_path, {**tiny_state, **extra}, "blocks are not numbered 0..2", "blocks 7 beyond"
    )
    half = {k: v for k, v in tiny_state.items() if not k.startswith("image_encoder.blocks.1.mlp.")}
    expect_refusal(capsys, tmp_path, half, "missing tensors: blocks.1.mlp.lin1.weight")


def test_refuses_nan_weights_and_odd_tables(capsys, tmp_path, tiny_state):
    state = dict(tiny_state)
    state["image_encoder.blocks.0.attn.rel_pos_h"] = state["image_encoder.blocks.0.attn.rel_pos_h"].clone()
    state["image_encoder.blocks.0.attn.rel_pos_h"][3, 1] = float("nan")
    expect_refusal(capsys, tmp_path, state, "NaN or Inf: blocks.0.attn.rel_pos_h")
    state = dict(tiny_state)
    state["image_encoder.blocks.1.attn.rel_pos_w"] = torch.zeros(9, 32)  # a 7- or 4-wide table? neither
    expect_refusal(capsys, tmp_path, state, "blocks.1.attn.rel_pos_w (9, 32) (expected (7, 32))")
    expect_refusal(
        capsys, tmp_path, tiny_state, "not a positive multiple of the patch size 16", args=["--img-size", 40]
    )
