"""An agglomerative student's heads in PyTorch, built from its student_heads.safetensors.

This file imports only torch and safetensors (not dmt_jax, nor JAX): copy it beside your code.

    import json, timm, torch
    from safetensors import safe_open
    from safetensors.torch import load_file
    from export_heads_torch import load_heads

    with safe_open("student_timm.safetensors", "pt") as f:
        kwargs = json.loads(f.metadata()["timm_kwargs"])
    backbone = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs).eval()
    backbone.load_state_dict(load_file("student_timm.safetensors"), strict=True)
    heads = load_heads("student_heads.safetensors").eval()
    out = heads(backbone.forward_features(images))  # images: [B, 3, H, W], ImageNet-normalized
    out["clip"]["summary"]  # [B, S]: the teacher's image vector; out["sam"]["dense"]: [B, N, D]

Each head is the module the student trained (RADIO's MLP "mlp_v1" and MLP2 "mlp_v2", or DMT's linear,
ln_linear, mlp), under the same parameter names. A summary head reads its teacher's prefix token, a
dense head the patch tokens; `heads(tokens, teacher_grid=True)` resamples the dense outputs to each
teacher's own grid as training compared them (bilinear, align_corners=False).
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torch import nn

HEADS_FORMAT = "dmt_jax.heads/1"


class Head(nn.Sequential):
    """One adaptor, [..., in_dim] -> [..., out_dim]; `spec` is its entry of the file's "heads" metadata."""

    def __init__(self, spec: dict):
        kind, d_in, d_out, hidden, eps = (
            spec[k] for k in ("kind", "in_dim", "out_dim", "hidden_dim", "ln_eps")
        )
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.out = nn.Linear(d_in, d_out)
        elif kind in ("ln_linear", "mlp"):
            self.norm = nn.LayerNorm(d_in, eps=eps)
            if kind == "mlp":
                self.fc1 = nn.Linear(d_in, hidden)
                self.act = nn.GELU()
            self.out = nn.Linear(hidden if kind == "mlp" else d_in, d_out)
        elif kind == "mlp_v1":  # fc1, LayerNorm, ReLU, num_inner x (Linear, LayerNorm, ReLU), fc2
            self.fc1 = nn.Linear(d_in, hidden)
            self.norm = nn.LayerNorm(hidden, eps=eps)
            self.relu = nn.ReLU()
            inner = []
            for _ in range(spec["num_inner"]):
                inner += [nn.Linear(hidden, hidden), nn.LayerNorm(hidden, eps=eps), nn.ReLU()]
            self.inner = nn.Sequential(*inner)
            self.fc2 = nn.Linear(hidden, d_out)
        elif kind == "mlp_v2":  # fc1, num_inner residual (LayerNorm, GELU, Linear), (LayerNorm, GELU, Linear)
            self.fc1 = nn.Linear(d_in, hidden)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.LayerNorm(hidden, eps=eps), nn.GELU(), nn.Linear(hidden, hidden))
                for _ in range(spec["num_inner"])
            )
            self.final = nn.Sequential(nn.LayerNorm(hidden, eps=eps), nn.GELU(), nn.Linear(hidden, d_out))
        else:
            raise ValueError(f"unknown head kind {kind!r}")

    def forward(self, x):
        if self.kind != "mlp_v2":
            return super().forward(x)
        x = self.fc1(x)
        for block in self.blocks:
            x = x + block(x)
        return self.final(x)


class AgglomerativeHeads(nn.Module):
    """Every teacher's heads. forward(tokens [B, P + N, D]: the backbone's forward_features) ->
    {teacher: {"summary": [B, S] or absent, "dense": [B, N, D_t] or absent}}."""

    def __init__(self, heads: dict, student: dict):
        super().__init__()
        self.description, self.student = heads, student
        self.heads = nn.ModuleDict()
        for name, one in heads.items():
            self.heads[name] = nn.ModuleDict({k: Head(one[k]) for k in ("summary", "dense") if one.get(k)})

    def forward(self, tokens: torch.Tensor, teacher_grid: bool = False, grid: tuple[int, int] | None = None):
        prefix = self.student["num_prefix_tokens"]
        patches = tokens[:, prefix:]
        out = {}
        for name, heads in self.heads.items():
            one = {}
            if "summary" in heads:
                one["summary"] = heads["summary"](tokens[:, self.description[name]["summary"]["token"]])
            if "dense" in heads:
                dense = heads["dense"](patches)
                if teacher_grid:
                    dense = resample(
                        dense,
                        grid or square(patches.shape[1]),
                        self.description[name]["dense"]["teacher_grid"],
                    )
                one["dense"] = dense
            out[name] = one
        return out


def square(n: int) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} patch tokens are no square grid: pass grid=(rows, columns)")
    return side, side


def resample(tokens: torch.Tensor, grid, teacher_grid) -> torch.Tensor:
    """[B, h*w, D] on `grid` -> [B, h'*w', D] on `teacher_grid`, bilinear (align_corners=False)."""
    (h, w), (th, tw) = grid, teacher_grid
    if (h, w) == (th, tw):
        return tokens
    b, _, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, h, w)
    x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)
    return x.reshape(b, d, th * tw).transpose(1, 2)


def load_heads(path: str) -> AgglomerativeHeads:
    """The heads of a student_heads.safetensors, weights loaded (strict)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("heads_format") != HEADS_FORMAT:
        found = metadata.get("heads_format")
        raise ValueError(f"{path} is not a {HEADS_FORMAT} file (its heads_format: {found!r})")
    module = AgglomerativeHeads(json.loads(metadata["heads"]), json.loads(metadata["student"]))
    state = {f"heads.{k}": v for k, v in load_file(str(path)).items()}
    module.load_state_dict(state, strict=True)
    return module
