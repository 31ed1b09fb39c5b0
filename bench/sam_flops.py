"""Forward FLOPs per image of SAM's image encoders (B, L, H) at 1024 px, from XLA's cost analysis.

    python bench/sam_flops.py          # one JSON line per size; nothing is allocated or run

Parameters are abstract (jax.eval_shape) and the forward is only lowered, so this runs anywhere in
seconds. XLA counts 2 FLOPs per multiply-add plus the elementwise work (softmax, LayerNorm, GELU).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dmt_jax.models.sam import SamConfig, SamEncoder  # noqa: E402

# segment-anything's build_sam_vit_{b,l,h}: width, depth, heads, global blocks.
SIZES = {
    "B": (768, 12, 12, (2, 5, 8, 11)),
    "L": (1024, 24, 16, (5, 11, 17, 23)),
    "H": (1280, 32, 16, (7, 15, 23, 31)),
}


def main():
    for name, (width, depth, heads, global_blocks) in SIZES.items():
        config = SamConfig(width, depth, heads, 4 * width, global_attn_indexes=global_blocks)
        model = SamEncoder(config, attention="xla")
        images = jax.ShapeDtypeStruct((1, config.img_size, config.img_size, 3), jnp.float32)
        params = jax.eval_shape(model.init, jax.random.key(0), images)
        cost = jax.jit(lambda p, x, m=model: m.apply(p, x).patches).lower(params, images).cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        n_params = sum(a.size for a in jax.tree.leaves(params))
        row = dict(model=f"SAM {name}", img_size=config.img_size, params_m=round(n_params / 1e6, 1))
        print(json.dumps(row | dict(gflop_per_image=round(cost["flops"] / 1e9, 1))))


if __name__ == "__main__":
    main()
