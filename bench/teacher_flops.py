"""Forward FLOPs per image of each teacher family at its native size, from XLA's cost analysis.

    python bench/teacher_flops.py            # one JSON line per teacher

The figures the agglomerative recipes are sized from. Nothing is run or allocated: the forward
(`Teacher.forward`'s model: tokens and summary) is lowered with abstract float32 parameters and
compiled for this machine's backend, whose cost analysis counts the FLOPs (2 per multiply-add). The
analytic `flops.forward_flops` (each family's matrix products, summary head included; what the
training step's MFU counts) is printed beside it; `--analytic` prints it alone, without compiling.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parents[1]))

from dmt_jax import flops  # noqa: E402
from dmt_jax.models import EvaConfig, SamConfig, ViTConfig, build_model  # noqa: E402

# name -> (family, config): the released models' shapes (formats/clip.py, formats/siglip.py read the same
# from the files). So400m/14 at 384 px has a 27 x 27 grid: 378 px of the image are seen.
CLIP = dict(pre_norm=True, patch_bias=False, act="quick_gelu", ln_eps=1e-5, pool="cls")
SIGLIP = dict(class_token=False, act="gelu_tanh", ln_eps=1e-6, pool="map")
TEACHERS = {
    "clip_b16_224": ("vit", ViTConfig(768, 12, 12, 3072, 16, 224, proj_dim=512, **CLIP)),
    "clip_l14_336": ("vit", ViTConfig(1024, 24, 16, 4096, 14, 336, proj_dim=768, **CLIP)),
    "siglip_b16_224": ("vit", ViTConfig(768, 12, 12, 3072, 16, 224, **SIGLIP)),
    "siglip_so400m14_384": ("vit", ViTConfig(1152, 27, 16, 4304, 14, 378, **SIGLIP)),
    "eva02_b14_224": ("eva", EvaConfig.preset("B/14")),  # the MIM files (formats/eva02.py)
    "eva02_l14_224": ("eva", EvaConfig.preset("L/14")),
    "eva02_clip_l14_336": ("eva", EvaConfig.preset("CLIP-L/14-336")),
    "eva02_b14_448": ("eva", EvaConfig.preset("B/14", img_size=448)),  # the size of EVA-02's fine-tunes
    "eva02_l14_448": ("eva", EvaConfig.preset("L/14", img_size=448)),
    "sam_b_1024": ("sam", SamConfig.from_size("B")),
    "sam_l_1024": ("sam", SamConfig.from_size("L")),
    "sam_h_1024": ("sam", SamConfig.from_size("H")),
}


def xla_forward_flops(family: str, config) -> float:
    model = build_model(family, config, dtype=jnp.float32, attention="xla")
    images = jax.ShapeDtypeStruct((1, config.img_size, config.img_size, 3), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)["params"]
    compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, images).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(TEACHERS), help=f"default: {' '.join(TEACHERS)}")
    parser.add_argument("--analytic", action="store_true", help="the analytic count only (no compile)")
    args = parser.parse_args(argv)
    for name in args.names:
        family, config = TEACHERS[name]
        xla = None if args.analytic else xla_forward_flops(family, config)
        analytic = flops.forward_flops(family, config)
        row = dict(teacher=name, family=family, img_size=config.img_size, tokens=config.num_tokens,
                   gflops_per_image=None if xla is None else round(xla / 1e9, 2),
                   analytic_gflops=round(analytic / 1e9, 2),
                   backend=jax.default_backend(), jax=jax.__version__)  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
