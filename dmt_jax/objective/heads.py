"""Adaptor heads of the agglomerative student, keyed by teacher name.

Per teacher, a summary head on its summary token and a dense head on the patch tokens. Kinds:
- linear, ln_linear, mlp: DMT's heads (objective/dmt.py `Heads`: LayerNorm eps 1e-6, exact GELU).
- mlp_v1: RADIO's `MLP` (NVlabs/RADIO radio/adaptor_mlp.py): fc1, LayerNorm, ReLU, then num_inner times
  (Linear, LayerNorm, ReLU), then fc2.
- mlp_v2: RADIO's `MLP2`: fc1, then num_inner residual blocks x + (LayerNorm, GELU, Linear)(x), then
  (LayerNorm, GELU, Linear).
RADIO's heads are PyTorch modules with torch's defaults: LayerNorm eps 1e-5, exact GELU. Module names
mirror the PyTorch parameter names ('/' for '.', '_' before a Sequential index: `inner_0` is
`inner.0`, `final_2` is `final.2`), so an export is a table of renames. Parameter paths are
`{teacher}_summary/...` and `{teacher}_dense/...`: reordering the teachers renames nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dmt_jax.models.vit import dense_init

KINDS = ("linear", "ln_linear", "mlp", "mlp_v1", "mlp_v2")
TORCH_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, RADIO's heads
DMT_LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """One teacher's heads: its name, the kinds (None: no such head) and output widths, and which of the
    student's prefix tokens feeds its summary head."""

    name: str
    summary_kind: str | None
    summary_dim: int
    dense_kind: str | None
    dense_dim: int
    token_slot: int = 0


class Head(nn.Module):
    """One adaptor: [..., D] -> [..., out_dim]."""

    kind: str
    out_dim: int
    hidden_dim: int  # mlp_v1 / mlp_v2; DMT's mlp uses mlp_ratio * D
    num_inner: int = 0
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=dense_init)
        norm = functools.partial(nn.LayerNorm, dtype=self.dtype, use_fast_variance=False)
        if self.kind == "linear":
            return dense(self.out_dim, name="out")(x)
        if self.kind in ("ln_linear", "mlp"):  # DMT's heads, the same layers as dmt.Heads
            y = norm(epsilon=DMT_LN_EPS, name="norm")(x)
            if self.kind == "mlp":
                y = nn.gelu(dense(int(x.shape[-1] * self.mlp_ratio), name="fc1")(y), approximate=False)
            return dense(self.out_dim, name="out")(y)
        if self.kind == "mlp_v1":
            y = nn.relu(norm(epsilon=TORCH_LN_EPS, name="norm")(dense(self.hidden_dim, name="fc1")(x)))
            for i in range(self.num_inner):
                y = dense(self.hidden_dim, name=f"inner_{3 * i}")(y)
                y = nn.relu(norm(epsilon=TORCH_LN_EPS, name=f"inner_{3 * i + 1}")(y))
            return dense(self.out_dim, name="fc2")(y)
        if self.kind == "mlp_v2":
            y = dense(self.hidden_dim, name="fc1")(x)
            for i in range(self.num_inner):
                h = nn.gelu(norm(epsilon=TORCH_LN_EPS, name=f"blocks_{i}_0")(y), approximate=False)
                y = y + dense(self.hidden_dim, name=f"blocks_{i}_2")(h)
            y = nn.gelu(norm(epsilon=TORCH_LN_EPS, name="final_0")(y), approximate=False)
            return dense(self.out_dim, name="final_2")(y)
        raise ValueError(f"head kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


class TeacherHeads(nn.Module):
    """Every teacher's heads on the student's final tokens.

    prefix [B, P, D] (the summary tokens, then registers), patches [B, n, D] ->
    {teacher: {"summary": [B, S_t] (if it has a summary head), "dense": [B, n, D_t] (if a dense head)}}.
    """

    specs: tuple[HeadSpec, ...]
    hidden_dim: int
    num_inner: int = 1
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, prefix, patches):
        head = functools.partial(
            Head,
            hidden_dim=self.hidden_dim,
            num_inner=self.num_inner,
            mlp_ratio=self.mlp_ratio,
            dtype=self.dtype,
        )
        out = {}
        for s in self.specs:
            one = {}
            if s.summary_kind:
                one["summary"] = head(s.summary_kind, s.summary_dim, name=f"{s.name}_summary")(
                    prefix[:, s.token_slot]
                )
            if s.dense_kind:
                one["dense"] = head(s.dense_kind, s.dense_dim, name=f"{s.name}_dense")(patches)
            out[s.name] = one
        return out


def torch_name(flax_path: str) -> str:
    """'clip_summary/final_2/kernel' -> 'final.2.weight' within the head (the teacher part dropped):
    the PyTorch module's own parameter name (RADIO's MLP / MLP2, or DMT's head)."""
    parts = flax_path.split("/")[1:]
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[parts[-1]]
    modules = [p.replace("_", ".") if p.rsplit("_", 1)[-1].isdigit() else p for p in parts[:-1]]
    return ".".join([*modules, leaf])
