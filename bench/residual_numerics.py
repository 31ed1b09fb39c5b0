"""bf16 vs float32 residual stream of a DINOv2-like teacher, on high-norm tokens.

DINOv2 (with or without registers) carries a few tokens whose norm is tens of times the others'
(registers, "artifact" patches). In a bf16 residual stream a token of norm 500 has a rounding step of
about 2 per channel, so the small LayerScale'd updates of later blocks are partly rounded away.
This runs one teacher (B/14 shape at 224 px, 4 registers, LayerScale, random weights; the
registers and a few patches lifted to norms of several hundred) three ways:

  float32   float32 matmuls and residual at highest precision: the reference
  bf16      bf16 matmuls, bf16 residual (position embeddings and prefix cast to bf16)
  bf16+f32  bf16 matmuls, float32 residual (the branches' bf16 outputs added into float32)

and reports, against the reference, the cosine and relative error of the final-norm tokens and of
the distillation targets (CLS + patches after the parameter-free LayerNorm), for ordinary and
high-norm tokens separately.

    python bench/residual_numerics.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dmt_jax import objective  # noqa: E402
from dmt_jax.teachers import make_random_teacher  # noqa: E402


def lift_tokens(params, high_patches, reg_norm: float, patch_norm: float, seed: int = 0):
    """Registers (all) and the listed patches' position embeddings set to random directions of the
    given norms, so these tokens carry high norms through the residual stream, as in DINOv2."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(np.array, params)

    def directions(n, d, norm):
        v = rng.standard_normal((n, d)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True) * norm

    reg = params["reg_token"]
    reg[0] = directions(reg.shape[1], reg.shape[2], reg_norm)
    pos = params["pos_embed"]  # no_embed_class: rows are the patches only
    pos[0, high_patches] = directions(len(high_patches), pos.shape[2], patch_norm)
    return params


def compare(ours, reference, rows) -> tuple[float, float, float]:
    """(mean cosine, min cosine, relative error) over the tokens `rows` of [B, T, D] arrays."""
    a = np.asarray(ours, np.float64)[:, rows].reshape(-1, ours.shape[-1])
    r = np.asarray(reference, np.float64)[:, rows].reshape(-1, reference.shape[-1])
    cos = (a * r).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(r, axis=-1))
    return float(cos.mean()), float(cos.min()), float(np.linalg.norm(a - r) / np.linalg.norm(r))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="B/14")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--layerscale", type=float, default=0.1, help="LayerScale gamma (DINOv2's are ~0.1)")
    p.add_argument("--reg-norm", type=float, default=300.0)
    p.add_argument("--patch-norm", type=float, default=500.0)
    p.add_argument("--high-patches", type=int, default=4, help="how many patches to lift")
    args = p.parse_args(argv)

    teacher = make_random_teacher(
        args.variant, args.img_size, seed=0, num_reg_tokens=4, no_embed_class=True,
        layerscale_init=args.layerscale,
    )  # fmt: skip
    spec, regs = teacher.spec, teacher.spec.num_reg_tokens
    n = spec.grid**2
    high_patches = np.linspace(0, n - 1, args.high_patches + 2).astype(int)[1:-1]
    params = lift_tokens(teacher.params, high_patches, args.reg_norm, args.patch_norm)
    images = jax.random.normal(jax.random.PRNGKey(0), (args.batch, args.img_size, args.img_size, 3))

    def run(dtype, residual_dtype, precision, final_norm=True):
        model = spec.model(dtype=dtype).clone(residual_dtype=residual_dtype, final_norm=final_norm)
        with jax.default_matmul_precision(precision):
            fn = jax.jit(lambda p, x: model.apply({"params": p}, x.astype(dtype)))
            return np.asarray(fn(params, images).astype(jnp.float32))

    reference = run(jnp.float32, jnp.float32, "highest")
    runs = {
        "bf16": run(jnp.bfloat16, jnp.bfloat16, "default"),
        "bf16+f32": run(jnp.bfloat16, jnp.float32, "default"),
    }
    prefix = 1 + regs
    high = sorted(set(range(1, prefix)) | {prefix + int(i) for i in high_patches})
    ordinary = [t for t in range(prefix + n) if t not in high]
    norms = np.linalg.norm(run(jnp.float32, jnp.float32, "highest", final_norm=False), axis=-1)
    print(
        f"{spec.variant} teacher, {args.img_size} px, {regs} registers, LayerScale {args.layerscale}; ",
        end="",
    )
    print(f"registers lifted to norm {args.reg_norm:g}, {len(high_patches)} patches to {args.patch_norm:g}")
    print(
        f"residual norm after the last block: ordinary tokens median {np.median(norms[:, ordinary]):.1f}, ",
        end="",
    )
    print(f"high-norm tokens median {np.median(norms[:, high]):.1f}\n")

    def targets(tokens):
        return np.asarray(objective.teacher_targets([jnp.asarray(tokens)], [regs], None, 1e-6))

    ref_targets = targets(reference)
    print(f"{'residual':10}{'tokens':16}{'cos mean':>10}{'cos min':>10}{'rel err':>10}")
    for name, tokens in runs.items():
        for label, rows in (("ordinary", ordinary), ("high-norm", high)):
            c_mean, c_min, rel = compare(tokens, reference, rows)
            print(f"{name:10}{label:16}{c_mean:>10.6f}{c_min:>10.6f}{rel:>10.2e}")
        c_mean, c_min, rel = compare(targets(tokens), ref_targets, slice(None))
        print(f"{name:10}{'targets':16}{c_mean:>10.6f}{c_min:>10.6f}{rel:>10.2e}")


if __name__ == "__main__":
    main()
