"""ViT encoder (Flax linen) whose numerics equal timm's VisionTransformer.forward_features.

Parameter names follow timm (patch_embed/proj, cls_token, reg_token, pos_embed, blocks_{i}/norm1,
attn/qkv, attn/proj, ls1/gamma, norm2, mlp/fc1, mlp/fc2, norm) so conversion and export are a
name table (dmt_jax/formats/names_vit.py). Variants are strings in big_vision's style: "Ti/16", "S/16",
"B/14", ..., built by `ViT.from_variant`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dmt_jax.models.family import FamilyConfig
from dmt_jax.models.features import Features

# name -> (width, depth, num_heads, mlp_dim); "mu" is a test-sized model for mechanics.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "mu": (64, 2, 2, 256),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}

LN_EPS = 1e-6  # timm / the official SSL repos / big_vision; CLIP uses 1e-5 (ViTConfig.ln_eps)


# torch's LayerNorm subtracts the mean before squaring; Flax's default E[x^2] - E[x]^2 loses precision on
# tokens with a large mean (DINOv2's high-norm tokens), so use the two-pass variance as torch does.
LayerNorm = functools.partial(nn.LayerNorm, epsilon=LN_EPS, use_fast_variance=False)


def quick_gelu(x):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


# What shapes cannot tell, so a config field: exact GELU (timm, the SSL repos, OpenCLIP), the tanh
# approximation (big_vision's nn.gelu default: SigLIP), QuickGELU (OpenAI CLIP).
ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "quick_gelu": quick_gelu,
}
# The image-level vector a teacher's `summary` returns (before ViTConfig.proj_dim's projection): the
# final-norm CLS token, the attention-pool (MAP) head over all final tokens (SigLIP), or none.
POOLS = ("cls", "map", "none")


def parse_variant(variant: str) -> dict[str, int]:
    """'S/16' -> dict(width=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=16)."""
    name, _, patch = variant.partition("/")
    if name not in VARIANTS or not patch.isdigit():
        raise ValueError(
            f"unknown ViT variant {variant!r}: use NAME/PATCH with NAME in {sorted(VARIANTS)}, e.g. 'S/16'"
        )
    width, depth, num_heads, mlp_dim = VARIANTS[name]
    return dict(width=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim, patch_size=int(patch))


def num_heads_for_width(width: int) -> int:
    """Heads of the standard ViT of this width (ViT-H: 16 heads of 80); otherwise 64 channels per head."""
    for w, _, heads, _ in VARIANTS.values():
        if w == width:
            return heads
    heads = max(1, width // 64)
    while width % heads:  # heads must divide the width; the tensors do not say how many there were
        heads -= 1
    return heads


def variant_name(width: int, depth: int, mlp_dim: int, patch_size: int) -> str:
    """'B/16' for a standard shape; otherwise a name that says the shape, e.g. 'w768-d2-m3072/16'."""
    for name, (w, d, _, m) in VARIANTS.items():
        if (w, d, m) == (width, depth, mlp_dim):
            return f"{name}/{patch_size}"
    return f"w{width}-d{depth}-m{mlp_dim}/{patch_size}"


@dataclasses.dataclass(frozen=True)
class ViTConfig(FamilyConfig):
    """The single description of a ViT teacher (MAE, MoCo v3, DINO, iBOT, DINOv2, CLIP, OpenCLIP, SigLIP).

    The defaults are timm's plain ViT; each family's difference is a field: CLIP's ln_pre (pre_norm),
    bias-free patch projection, QuickGELU, eps 1e-5 and projection (proj_dim); SigLIP's missing CLS
    token, tanh GELU and MAP head (pool="map"). What shapes cannot tell (act, ln_eps, num_heads where
    not width/64) is recorded here by the converter, never guessed at load.
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int = 16
    img_size: int = 224
    num_reg_tokens: int = 0
    no_embed_class: bool = False  # prefix tokens get no position embedding (timm's DINOv2 + registers)
    layerscale: bool = False
    class_token: bool = True
    pre_norm: bool = False  # a LayerNorm after the position embedding (CLIP's ln_pre, timm's norm_pre)
    patch_bias: bool = True
    act: str = "gelu"  # a key of ACTIVATIONS
    ln_eps: float = LN_EPS
    pool: str = "cls"  # a key of POOLS: what `summary` pools
    proj_dim: int = 0  # > 0: a bias-free projection of the pooled vector (CLIP's proj, timm's head)

    POSITIVE = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "img_size")

    def __post_init__(self):
        self.check()

    def range_problems(self) -> list[str]:
        problems = []
        if self.act not in ACTIVATIONS:
            problems.append(f"act must be one of {', '.join(ACTIVATIONS)}, got {self.act!r}")
        if self.pool not in POOLS:
            problems.append(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        elif self.pool == "cls" and not self.class_token:
            problems.append("pool 'cls' needs class_token true")
        if self.proj_dim and self.pool == "none":
            problems.append("proj_dim needs a pool ('cls' or 'map') to project")
        if not 0 < self.ln_eps < 1:
            problems.append(f"ln_eps must be in (0, 1), got {self.ln_eps!r}")
        if self.width % self.num_heads:
            problems.append(f"num_heads {self.num_heads} does not divide width {self.width}")
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        return problems

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in `features`: CLS (if any), then registers."""
        return int(self.class_token) + self.num_reg_tokens

    @property
    def num_pos_prefix(self) -> int:
        """Rows of pos_embed before the patch grid."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid**2

    @property
    def summary_dim(self) -> int:
        return 0 if self.pool == "none" else self.proj_dim or self.width

    @property
    def layerscale_init(self) -> float | None:
        return 1.0 if self.layerscale else None  # any value: the checkpoint overwrites it

    @property
    def variant(self) -> str:
        return variant_name(self.width, self.depth, self.mlp_dim, self.patch_size)

    def describe(self) -> str:
        return (f"{self.variant} (width {self.width}, depth {self.depth}, mlp {self.mlp_dim}, "
                f"patch {self.patch_size}, grid {self.grid}, registers {self.num_reg_tokens})")  # fmt: skip

    def module(self, dtype: Any = jnp.float32, attention: str = "auto", output: str = "features") -> ViT:
        """The ViT of this config; output 'features' returns Features, 'tokens' the token array."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layerscale"}
        return ViT(
            **fields, layerscale_init=self.layerscale_init, dtype=dtype, attention=attention, output=output
        )


def sincos_pos_embed_2d(width: int, grid: int, num_prefix: int = 1) -> np.ndarray:
    """MAE's fixed 2-D sin-cos table [1, num_prefix + grid*grid, width]; prefix rows are zeros."""
    assert width % 4 == 0, "sin-cos position embeddings need width divisible by 4"
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def embed_1d(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # MAE puts the w-coordinate first (its meshgrid is (w, h)).
    table = np.concatenate([embed_1d(gw), embed_1d(gh)], axis=1)
    table = np.concatenate([np.zeros((num_prefix, width)), table], axis=0)
    return table[None].astype(np.float32)


def attention_implementation(requested: str, dtype: Any) -> str | None:
    """'auto' picks cuDNN flash attention on GPU for 16-bit inputs, XLA elsewhere."""
    if requested == "auto":
        low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if jax.default_backend() == "gpu" and low_precision else "xla"
    if requested not in ("xla", "cudnn"):
        raise ValueError(f"attention must be 'auto', 'xla' or 'cudnn', got {requested!r}")
    return requested


dense_init = nn.initializers.xavier_uniform()  # MAE's init for Linear layers
# MAE initializes the patch projection as a Linear on the flattened patch.
patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)


class PatchProjection(nn.Module):
    """timm's stride-p patch conv (kernel [p, p, C, width]) computed as one GEMM on the flattened
    patches: exact for stride = kernel with VALID padding, and under the teachers' vmap a plain
    batched GEMM instead of a grouped convolution."""

    width: int
    patch_size: int
    dtype: Any = jnp.float32
    use_bias: bool = True  # CLIP's conv1 has none

    @nn.compact
    def __call__(self, images):
        p = self.patch_size
        b, h, w, c = images.shape
        kernel = self.param("kernel", patch_init, (p, p, c, self.width))
        bias = self.param("bias", nn.initializers.zeros, (self.width,)) if self.use_bias else None
        images, kernel, bias = nn.dtypes.promote_dtype(images, kernel, bias, dtype=self.dtype)
        gh, gw = h // p, w // p  # VALID: a remainder is dropped, as the conv drops it
        # Patchify (a transpose the compiler fuses into the producer of `images`), then one GEMM.
        patches = images[:, : gh * p, : gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, gh, gw, p * p * c)
        out = patches @ kernel.reshape(p * p * c, self.width)
        return out if bias is None else out + bias


class PatchEmbed(nn.Module):
    width: int
    patch_size: int
    dtype: Any = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, images):
        return PatchProjection(self.width, self.patch_size, self.dtype, self.use_bias, name="proj")(images)


class QKVProjection(nn.Module):
    """timm's fused qkv Linear (kernel [D, 3D], columns [q; k; v]), applied as three dots.

    Each of q, k, v is its own GEMM with a contiguous output, so the attention kernel reads them
    without a copy (slices of one fused [.., 3D] output are strided). The parameters keep timm's
    fused layout and name, so conversion and export are unchanged."""

    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, part: int):
        """x [..., D] -> the q (part 0), k (1) or v (2) projection [..., D]."""
        d = self.width
        kernel = self.param("kernel", dense_init, (x.shape[-1], 3 * d))
        bias = self.param("bias", nn.initializers.zeros, (3 * d,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        cols = slice(part * d, (part + 1) * d)
        return x @ kernel[:, cols] + bias[cols]


class Attention(nn.Module):
    num_heads: int
    dtype: Any = jnp.float32
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x, queries=None):
        """x [B, T, D] -> [B, T, D]. queries: optional [B, Tq, D] tokens at which to compute the output
        (keys and values still come from every token of x); the output is then [B, Tq, D]."""
        d = x.shape[-1]
        queries = x if queries is None else queries
        qkv = QKVProjection(d, self.dtype, name="qkv")
        heads = lambda y: y.reshape(y.shape[:2] + (self.num_heads, d // self.num_heads))
        q, k, v = heads(qkv(queries, 0)), heads(qkv(x, 1)), heads(qkv(x, 2))
        impl = attention_implementation(self.implementation, q.dtype)
        try:
            out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        except Exception as e:  # cuDNN refused this shape, dtype or transform (checked while tracing)
            if self.implementation != "auto" or impl == "xla":
                raise
            logging.warning("cuDNN attention unavailable for %s (%s); using XLA's", q.shape, str(e)[:200])
            out = jax.nn.dot_product_attention(q, k, v, implementation="xla")
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=dense_init)
        return dense(d, name="proj")(out.reshape(queries.shape))


class Mlp(nn.Module):
    hidden: int
    dtype: Any = jnp.float32
    act: str = "gelu"  # timm's exact (erf) GELU; see ACTIVATIONS

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=dense_init, name="fc1")(x)
        x = ACTIVATIONS[self.act](x)
        return nn.Dense(d, dtype=self.dtype, kernel_init=dense_init, name="fc2")(x)


class LayerScale(nn.Module):
    init_value: float

    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
        return x * gamma.astype(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per example."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Block(nn.Module):
    num_heads: int
    mlp_dim: int
    layerscale_init: float | None = None
    drop_path: float = 0.0
    dtype: Any = jnp.float32
    attention: str = "auto"
    act: str = "gelu"
    ln_eps: float = LN_EPS

    @nn.compact
    def __call__(self, x, deterministic: bool = True, out_index=None):
        """out_index: optional int [B, n] token positions; the block's output is then [B, n, D], its
        queries, projection and MLP computed only there (keys and values from every token)."""
        norm = functools.partial(LayerNorm, epsilon=self.ln_eps, dtype=self.dtype)

        def scaled(name, y):
            return LayerScale(self.layerscale_init, name=name)(y) if self.layerscale_init is not None else y

        h = norm(name="norm1")(x)
        if out_index is not None:
            take = lambda a: jnp.take_along_axis(a, out_index[:, :, None], axis=1)
            x, queries = take(x), take(h)
        else:
            queries = None
        y = Attention(self.num_heads, self.dtype, self.attention, name="attn")(h, queries)
        x = x + DropPath(self.drop_path)(scaled("ls1", y), deterministic)
        y = Mlp(self.mlp_dim, self.dtype, self.act, name="mlp")(norm(name="norm2")(x))
        return x + DropPath(self.drop_path)(scaled("ls2", y), deterministic)


class AttentionPool(nn.Module):
    """timm's AttentionPoolLatent = big_vision's MAPHead (SigLIP): one learned query (`latent`) attends
    over all tokens (q, fused kv, proj), then a residual MLP on its LayerNorm. [B, T, D] -> [B, D]."""

    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32
    act: str = "gelu"
    ln_eps: float = LN_EPS

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=dense_init)
        latent = self.param("latent", nn.initializers.normal(d**-0.5), (1, 1, d))
        heads = lambda y: y.reshape(y.shape[:2] + (self.num_heads, d // self.num_heads))
        q = dense(d, name="q")(jnp.broadcast_to(latent, (b, 1, d)).astype(x.dtype))
        kv = dense(2 * d, name="kv")(x)  # columns [k; v], each head-major, as timm's kv Linear
        out = jax.nn.dot_product_attention(
            heads(q), heads(kv[..., :d]), heads(kv[..., d:]), implementation="xla"
        )
        out = dense(d, name="proj")(out.reshape(b, 1, d))
        norm = LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm")
        out = out + Mlp(self.mlp_dim, self.dtype, self.act, name="mlp")(norm(out))
        return out[:, 0]


class ViT(nn.Module):
    """ViT encoder. `__call__(images, keep)` returns the final-norm tokens [B, P + n, D] (output
    'tokens': the student's and DMT's path), or `Features` (output 'features': a teacher's contract).

    images: normalized NHWC float images. keep: optional int [B, n] indices of the patches to
    encode (after position embeddings are added), for the masked student. Token order is
    [CLS, registers, patches], as in the checkpoints. A teacher is built from its ViTConfig
    (`ViTConfig.module`); the fields below from `class_token` on are that config's family options.
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int = 16
    img_size: int = 224  # sets the position-embedding grid
    num_reg_tokens: int = 0
    no_embed_class: bool = False  # True: prefix tokens get no position embedding (timm's DINOv2-reg)
    layerscale_init: float | None = None
    pos_embed: str = "learned"  # 'learned' or 'sincos' (initialized to MAE's fixed table)
    drop_path: float = 0.0
    dtype: Any = jnp.float32  # matmul / activation dtype; parameters stay float32
    residual_dtype: Any = None  # dtype of the residual stream (and position embeddings); None: `dtype`
    attention: str = "auto"
    remat: bool = False
    final_norm: bool = True  # False: no final norm (a classifier pools the tokens, then applies fc_norm)
    class_token: bool = True
    pre_norm: bool = False  # LayerNorm `norm_pre` after the position embedding (CLIP's ln_pre)
    patch_bias: bool = True
    act: str = "gelu"
    ln_eps: float = LN_EPS
    pool: str = "cls"  # what Features.summary pools: 'cls', 'map' (AttentionPool over all tokens), 'none'
    proj_dim: int = 0  # > 0: summary = pooled @ head/kernel (CLIP's proj)
    output: str = "tokens"  # 'tokens': the token array; 'features': Features(prefix, patches, summary)

    @classmethod
    def from_variant(cls, variant: str, **kwargs) -> ViT:
        return cls(**{**parse_variant(variant), **kwargs})

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.num_reg_tokens

    @property
    def config(self) -> ViTConfig:
        """This module's teacher description (the training-only fields are not part of it)."""
        names = [f.name for f in dataclasses.fields(ViTConfig) if f.name != "layerscale"]
        return ViTConfig(**{n: getattr(self, n) for n in names}, layerscale=self.layerscale_init is not None)

    @nn.compact
    def __call__(
        self,
        images,
        keep=None,
        *,
        train: bool = False,
        return_layers: Sequence[int] = (),
        output_patches=None,
    ):
        """output_patches: optional int [B, n] patch indices (a frozen teacher's use). The output is then
        [B, 1 + n, D]: CLS and those patches (registers dropped; no CLS without a class token), and the
        last block computes its queries, projection, MLP and the final norm only there (exact: keys and
        values still see every token)."""
        b = images.shape[0]
        if keep is not None and output_patches is not None:
            raise ValueError("pass keep (the student's masking) or output_patches (a teacher's), not both")
        if self.output not in ("tokens", "features"):
            raise ValueError(f"output must be 'tokens' or 'features', got {self.output!r}")
        x = PatchEmbed(self.width, self.patch_size, self.dtype, self.patch_bias, name="patch_embed")(images)
        gh, gw = x.shape[1], x.shape[2]
        if (gh, gw) != (self.grid, self.grid):
            raise ValueError(
                f"images of {images.shape[1]}x{images.shape[2]} px give a {gh}x{gw} patch grid, but this "
                f"ViT's position embeddings are for {self.grid}x{self.grid} (img_size={self.img_size}); feed "
                f"{self.img_size}px images or convert the checkpoint with --img-size"
            )
        # The residual stream's dtype: each block's branches add their `dtype` outputs into it.
        x = x.reshape(b, gh * gw, self.width).astype(self.residual_dtype or self.dtype)

        n_pos_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        if self.pos_embed == "sincos":
            pos_init = lambda *_: jnp.asarray(sincos_pos_embed_2d(self.width, self.grid, n_pos_prefix))
        elif self.pos_embed == "learned":
            pos_init = nn.initializers.truncated_normal(0.02)
        else:
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {self.pos_embed!r}")
        pos = self.param("pos_embed", pos_init, (1, n_pos_prefix + gh * gw, self.width))
        prefix = []
        if self.class_token:
            prefix.append(self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.width)))
        if self.num_reg_tokens:
            prefix.append(
                self.param("reg_token", nn.initializers.normal(1e-6), (1, self.num_reg_tokens, self.width))
            )
        x = x + pos[:, n_pos_prefix:].astype(x.dtype)
        if keep is not None:
            x = jnp.take_along_axis(x, keep[:, :, None], axis=1)
        if prefix:
            prefix = jnp.concatenate(prefix, axis=1)
            prefix = prefix + pos[:, :n_pos_prefix] if n_pos_prefix else prefix
            x = jnp.concatenate(
                [jnp.broadcast_to(prefix, (b,) + prefix.shape[1:]).astype(x.dtype), x], axis=1
            )
        if self.pre_norm:
            x = LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm_pre")(x).astype(x.dtype)

        out_index = None
        if output_patches is not None:  # token positions of CLS (if any) and the wanted patches
            out_index = output_patches + self.num_prefix_tokens
            if self.class_token:
                out_index = jnp.concatenate([jnp.zeros((b, 1), output_patches.dtype), out_index], axis=1)
        block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        layers = []
        for i in range(self.depth):
            x = block_cls(
                self.num_heads,
                self.mlp_dim,
                self.layerscale_init,
                self.drop_path * i / max(self.depth - 1, 1),  # linear drop-path decay, as timm
                self.dtype,
                self.attention,
                self.act,
                self.ln_eps,
                name=f"blocks_{i}",
            )(x, not train, out_index if i == self.depth - 1 else None)
            if i in return_layers:
                layers.append(x)
        if self.final_norm:
            x = LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm")(x)
        if self.output == "tokens":
            return (x, layers) if return_layers else x
        if keep is not None or output_patches is not None or return_layers:
            raise ValueError("output 'features' takes whole images: no keep, output_patches or return_layers")
        return self.features(x)

    def features(self, tokens) -> Features:
        """The final tokens split into prefix and patches, and the summary (pooled, then projected)."""
        p = self.num_prefix_tokens
        if self.pool == "cls":
            summary = tokens[:, 0]
        elif self.pool == "map":
            summary = AttentionPool(
                self.num_heads, self.mlp_dim, self.dtype, self.act, self.ln_eps, name="attn_pool"
            )(tokens)
        else:
            summary = None
        if summary is not None and self.proj_dim:
            summary = nn.Dense(
                self.proj_dim, use_bias=False, dtype=self.dtype, kernel_init=dense_init, name="head"
            )(summary)
        return Features(tokens[:, :p], tokens[:, p:], summary)
