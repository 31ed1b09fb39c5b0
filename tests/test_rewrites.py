"""The exact speed rewrites of the ViT forward against the plain computations they replace.

Patch embedding as a GEMM on flattened patches (vs the stride-p convolution), q/k/v as three dots
(vs slices of one fused qkv output), and a teacher's last block at CLS + visible patches only (vs
the full forward, then a gather). float32 at highest precision (conftest), relative error 1e-5.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dmt_jax.models import vit
from dmt_jax.teachers import TeacherStack, make_random_teacher

TOLERANCE = 1e-5


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def test_patch_embedding_gemm_equals_the_strided_convolution():
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 35, 32, 3))  # 35: a remainder row is dropped
    proj = vit.PatchProjection(width=16, patch_size=8)
    params = proj.init(jax.random.PRNGKey(1), images)["params"]
    params = {**params, "bias": jax.random.normal(jax.random.PRNGKey(2), (16,))}
    conv = jax.lax.conv_general_dilated(
        images, params["kernel"], (8, 8), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    ours = proj.apply({"params": params}, images)
    assert ours.shape == (2, 4, 4, 16)
    assert relative_error(ours, conv + params["bias"]) < TOLERANCE


def test_three_qkv_dots_equal_slices_of_the_fused_projection():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 32))
    attn = vit.Attention(num_heads=4, implementation="xla")
    params = attn.init(jax.random.PRNGKey(1), x)["params"]
    params["qkv"]["bias"] = jax.random.normal(jax.random.PRNGKey(2), (96,))

    # timm's computation: one fused [D, 3D] matmul, q/k/v sliced out of its output.
    qkv = (x @ params["qkv"]["kernel"] + params["qkv"]["bias"]).reshape(2, 9, 3, 4, 8)
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation="xla")
    reference = out.reshape(2, 9, 32) @ params["proj"]["kernel"] + params["proj"]["bias"]
    assert relative_error(attn.apply({"params": params}, x), reference) < TOLERANCE


def dinov2_like():
    """A teacher with registers, LayerScale and no position embedding on the prefix, as DINOv2-reg."""
    return make_random_teacher("mu/8", 32, seed=3, num_reg_tokens=2, no_embed_class=True, layerscale_init=0.5)


def test_last_block_at_visible_tokens_equals_full_forward_then_gather():
    teacher = dinov2_like()
    model = teacher.spec.model()
    images = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 3))
    keep = jnp.array([[0, 5, 15, 9], [3, 2, 1, 0], [14, 7, 8, 11]], jnp.int32)
    apply = jax.jit(functools.partial(model.apply, {"params": teacher.params}))

    full = apply(images)  # [B, 1 + 2 + 16, D]
    visible = jnp.take_along_axis(full[:, 3:], keep[:, :, None], axis=1)
    reference = jnp.concatenate([full[:, :1], visible], axis=1)
    ours = apply(images, output_patches=keep)
    assert ours.shape == (3, 5, 64)
    assert relative_error(ours, reference) < TOLERANCE


def test_teacher_stack_with_keep_returns_cls_and_visible_patches_of_each_teacher():
    plain = [make_random_teacher("mu/8", 32, seed=seed) for seed in (1, 2)]
    teachers = [plain[0], dinov2_like(), plain[1]]  # two architectures: two vmapped groups
    stack = TeacherStack(teachers, dtype=jnp.float32)
    pixels = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), maxval=255.0)
    keep = jnp.array([[4, 1, 12], [0, 15, 6]], jnp.int32)

    full = jax.jit(stack.apply)(stack.params, pixels)
    ours = jax.jit(stack.apply)(stack.params, pixels, keep)
    for tokens, selected, regs in zip(full, ours, stack.num_reg_tokens, strict=True):
        visible = jnp.take_along_axis(tokens[:, 1 + regs :], keep[:, :, None], axis=1)
        reference = jnp.concatenate([tokens[:, :1], visible], axis=1)
        assert selected.shape == (2, 4, 64)
        assert relative_error(selected, reference) < TOLERANCE


# ---------------------------------------------------------------- the step as lowered for CUDA

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import inspect_cuda  # noqa: E402


def test_step_lowered_for_cuda_feeds_cudnn_attention_from_gemms_and_embeds_patches_by_gemm(capsys):
    argv = ["--student", "ti", "--teacher", "mu/16", "--teachers", "2", "--img-size", "32", "--batch", "8"]
    found = inspect_cuda.main(argv)
    assert found.ok, capsys.readouterr().out
    assert found.attention_calls == 12 + 2  # every block: the Ti student's 12, the vmapped teachers' 2
    assert found.direct_inputs == 3 * found.attention_calls
    assert len(found.patch_gemms) == 2  # the student's and the teachers' (one batched GEMM)


def test_inspection_flags_q_k_v_sliced_from_a_fused_output():
    # The layout the rewrite replaced: one [D, 3D] GEMM, q/k/v sliced out of its output.
    def fused(x, w):
        qkv = (x @ w).reshape(2, 8, 3, 2, 64)
        return jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation="cudnn")

    x, w = jax.ShapeDtypeStruct((2, 8, 128), jnp.bfloat16), jax.ShapeDtypeStruct((128, 384), jnp.bfloat16)
    found = inspect_cuda.inspect(inspect_cuda.lower_for_cuda(jax.jit(fused), x, w), patch_size=16, grid=14)
    assert found.attention_calls == 1 and found.direct_inputs == 0
    assert len(found.copied_inputs) == 3 and not found.ok


def test_profile_reads_kernels_from_the_device_streams_of_a_perfetto_trace():
    import profile_step

    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
    ]
    kernels = [("gemm", 7, 30.0), ("gemm", 7, 20.0), ("cudnn_fmha", 7, 5.0), ("fusion.3", 8, 99.0)]
    events = meta + [{"ph": "X", "pid": 1, "tid": t, "name": n, "dur": d} for n, t, d in kernels]
    where, times = profile_step.kernel_times(events)
    assert where == "device streams"
    assert times == {"gemm": [30.0, 20.0], "cudnn_fmha": [5.0]}
