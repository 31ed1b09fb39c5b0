"""Peak device memory of an agglomerative recipe's training step, from the compiled step's memory analysis.

    python bench/recipe_memory.py --recipe configs/radio_b.py --batch 8,16,32 --fsdp 1,8

One JSON line per (resolution stage, per-device batch, fsdp size): the step of the recipe as the trainer
builds it (train.build: the student, the teachers of the recipe's shapes, the objective, the optimizer),
lowered from ShapeDtypeStructs and compiled for this machine's backend; nothing is allocated and no
weight is read: every teacher is abstract (its converted directory's shapes, TEACHER_SHAPES). The peak
per device is arguments + outputs - donated (aliased) + temporaries, as XLA's buffer assignment counts
them. `--sam 512` swaps each SAM teacher for the same encoder converted at 512 px.

On a CPU (no accelerator lent), XLA:CPU assigns the buffers: attention there is XLA's (scores
materialized, `attention` auto -> xla), so the temporaries are an upper bound for a GPU whose cuDNN
attention keeps no T x T scores; parameters, optimizer state and teacher weights are exact.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

if "--devices" in sys.argv:  # virtual CPU devices for the fsdp sizes: before jax is imported
    count = sys.argv[sys.argv.index("--devices") + 1]
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
    )

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dmt_jax import parallel, train  # noqa: E402
from dmt_jax.config import split_teacher_name  # noqa: E402
from dmt_jax.models import SamConfig, ViT, ViTConfig  # noqa: E402
from dmt_jax.models.family import HALF, IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD  # noqa: E402
from dmt_jax.teachers import Teacher, TeacherSpec  # noqa: E402

CLIP = dict(pre_norm=True, patch_bias=False, act="quick_gelu", ln_eps=1e-5, pool="cls")
SIGLIP = dict(class_token=False, act="gelu_tanh", ln_eps=1e-6, pool="map")
DINOV2_REG = dict(num_reg_tokens=4, no_embed_class=True, layerscale=True)
# What `dmt-convert` writes into each teacher directory the recipes name (formats/*.py infer the same
# from the official files): format, family, config, mean, std, input resize rule.
TEACHER_SHAPES = {
    "clip_l14_336": ("clip", "vit", ViTConfig(1024, 24, 16, 4096, 14, 336, proj_dim=768, **CLIP),
                     OPENAI_MEAN, OPENAI_STD, "bicubic"),
    "clip_b16": ("clip", "vit", ViTConfig(768, 12, 12, 3072, 16, 224, proj_dim=512, **CLIP),
                 OPENAI_MEAN, OPENAI_STD, "bicubic"),
    "siglip_so400m_384": ("siglip", "vit", ViTConfig(1152, 27, 16, 4304, 14, 378, **SIGLIP),
                          HALF, HALF, "squash"),
    "siglip_b16_224": ("siglip", "vit", ViTConfig(768, 12, 12, 3072, 16, 224, **SIGLIP),
                       HALF, HALF, "squash"),
    "dinov2_l14_reg_378": ("dinov2", "vit", ViTConfig(1024, 24, 16, 4096, 14, 378, **DINOV2_REG),
                           IMAGENET_MEAN, IMAGENET_STD, "bilinear"),
    "dinov2_b14_reg_224": ("dinov2", "vit", ViTConfig(768, 12, 12, 3072, 14, 224, **DINOV2_REG),
                           IMAGENET_MEAN, IMAGENET_STD, "bilinear"),
    "sam_h": ("sam", "sam", SamConfig.from_size("H"), IMAGENET_MEAN, IMAGENET_STD, "longest_pad"),
    "sam_b_512": ("sam", "sam", SamConfig.from_size("B", img_size=512), IMAGENET_MEAN, IMAGENET_STD,
                  "longest_pad"),
}  # fmt: skip


def abstract_teacher(entry: str, sam_px: int | None) -> Teacher:
    """A Teacher of the entry's shapes whose params are ShapeDtypeStructs (float32, as converted): a
    directory the recipes name (TEACHER_SHAPES), or 'random:[FAMILY:]VARIANT@PX:SEED'."""
    if generated := train.parse_teacher_entry(entry):
        _, family, variant, px, _ = generated
        if family == "vit":
            config = ViT.from_variant(variant, img_size=px).config
            fmt, mean, std, resize = "random", IMAGENET_MEAN, IMAGENET_STD, "bilinear"
        else:  # 'random:FAMILY:VARIANT@PX:SEED': a small teacher of that family (demo_teachers)
            from dmt_jax import demo_teachers

            s = demo_teachers.family_spec(family, variant, px)
            fmt, family, config, mean, std, resize = (
                s.format,
                s.family,
                s.config,
                s.mean,
                s.std,
                s.input_resize,
            )
    else:
        fmt, family, config, mean, std, resize = TEACHER_SHAPES[Path(entry).name]
    if family == "sam" and sam_px:
        config = dataclasses.replace(config, img_size=sam_px)
    spec = TeacherSpec(format=fmt, family=family, config=config, mean=mean, std=std, input_resize=resize)
    model = spec.features_model(jnp.float32, "xla")
    images = jax.ShapeDtypeStruct((1, config.img_size, config.img_size, 3), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x)["params"], images)
    return Teacher(spec, params)


def load_recipe(path: str):
    spec = importlib.util.spec_from_file_location("recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def megabytes(n: int) -> float:
    return round(n / 2**20, 1)


def measure(config, teachers, batch: int, fsdp: int, devices) -> list[dict]:
    """One record per stage of the recipe: the compiled step's memory per device at `batch` per device."""
    config.mesh.data, config.mesh.fsdp = len(devices) // fsdp, fsdp
    config.batch_size = batch * len(devices)
    mesh = parallel.make_mesh(config.mesh.data, fsdp, devices=devices)
    setup = train.build(config, mesh, num_train_examples=None, teachers=teachers)
    fns = setup.step.fns if isinstance(setup.step, train.StagedStep) else [setup.step]
    sizes = [px for _, px in config.stages] or [config.img_size]
    view = setup.view_size
    pixels = jax.ShapeDtypeStruct((config.batch_size, view, view, 3), jnp.uint8,
                                  sharding=parallel.batch_sharding(mesh))  # fmt: skip
    out = []
    for px, fn in zip(sizes, fns, strict=True):
        start = time.perf_counter()
        compiled = fn.lower(setup.abstract_state, setup.teacher_params, {"image": pixels}).compile()
        m = compiled.memory_analysis()
        peak = (
            m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        )
        out.append(dict(
            student=config.student.variant, student_px=px, view_px=view, batch_per_device=batch,
            devices=len(devices), fsdp=fsdp, remat=bool(config.remat), teacher_dtype=config.teacher_dtype,
            teachers={n: f"{t.spec.variant}@{t.spec.img_size}" for n, t in
                      zip(train.teacher_names(config), teachers, strict=True)},
            peak_mb=megabytes(peak), arguments_mb=megabytes(m.argument_size_in_bytes),
            outputs_mb=megabytes(m.output_size_in_bytes), donated_mb=megabytes(m.alias_size_in_bytes),
            temporaries_mb=megabytes(m.temp_size_in_bytes), compile_s=round(time.perf_counter() - start, 1),
            backend=jax.default_backend(),
        ))  # fmt: skip
        print(json.dumps(out[-1]), flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="configs/radio_b.py")
    p.add_argument("--batch", default="16", help="per-device batch sizes, comma-separated")
    p.add_argument("--fsdp", default="1", help="fsdp sizes, comma-separated (the mesh spans fsdp devices)")
    p.add_argument("--devices", type=int, default=1, help="virtual CPU devices (>= the largest fsdp)")
    p.add_argument("--sam", type=int, default=0, help="> 0: SAM teachers converted at this size")
    p.add_argument("--remat", choices=["recipe", "on", "off"], default="recipe")
    args = p.parse_args(argv)
    config = load_recipe(args.recipe)
    if args.remat != "recipe":
        config.remat = args.remat == "on"
    config.attention = "xla" if jax.default_backend() == "cpu" else config.attention
    teachers = [abstract_teacher(split_teacher_name(e)[1], args.sam) for e in config.teachers]
    for fsdp in (int(f) for f in args.fsdp.split(",")):
        for batch in (int(b) for b in args.batch.split(",")):
            measure(config, teachers, batch, fsdp, jax.devices()[:fsdp])


if __name__ == "__main__":
    main()
