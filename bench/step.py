"""Times dmt_jax's real training step (the code the trainer runs) on synthetic on-device data.

Prints one JSON line with the fields of bench/torch_reference.py (img_per_s, step_ms,
model_tflops, mfu_vs_989), so the two compare side by side; run both in the same device call
(bench/gpu_check.sh). Imports no TensorFlow. Teachers are ViT-B/16s with random weights: speed
does not depend on the values.

    python bench/step.py --student s --batch 256 --mask-ratio 0.75
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dmt_jax import parallel, train  # noqa: E402
from dmt_jax.config import base_config  # noqa: E402

STUDENTS = {"ti": "Ti/16", "s": "S/16", "b": "B/16"}


def make_config(args):
    c = base_config()
    c.student.variant = STUDENTS[args.student]
    c.img_size = args.img_size
    c.teachers = tuple(f"random:{args.teacher}@{args.img_size}:{k}" for k in range(args.teachers))
    c.batch_size = args.batch
    c.mask_ratio = args.mask_ratio
    c.total_steps = 10_000
    c.dtype = args.dtype
    c.teacher_dtype = args.dtype
    c.attention = args.attention
    c.remat = args.remat
    c.mesh.fsdp = args.fsdp
    return c


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--student", default="s", help="ti, s or b; a comma-separated list runs each in turn")
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--teacher", default="B/16", help="teacher variant")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
    p.add_argument("--remat", action="store_true")
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--profile-top", type=int, default=0, help="then the top N kernels of 3 traced steps")
    p.add_argument(
        "--xla-flags",
        default="",
        help="extra XLA flags, opt-in (none by default): --xla-flags='--xla_gpu_triton_gemm_any=true'",
    )
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = p.parse_args(argv)
    for student in args.student.split(","):
        if student not in STUDENTS:
            p.error(f"--student {student!r}: choose from {sorted(STUDENTS)}")
    # Read when JAX starts its backend (the first device use), not at import.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    return args


def main(argv=None):
    args = parse(parser(), argv)
    for student in args.student.split(","):
        run(argparse.Namespace(**{**vars(args), "student": student}))


def prepare(args):
    """(setup, state, batches): the trainer's step, its initial state, four uint8 batches on device."""
    config = make_config(args)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    setup = train.build(config, mesh)
    state = setup.init_state(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    sharding = parallel.batch_sharding(mesh)
    shape = (args.batch, args.img_size, args.img_size, 3)
    batches = [  # a few fresh uint8 batches already on device, as the input pipeline delivers them
        {"image": jax.device_put(rng.integers(0, 256, shape, dtype=np.uint8), sharding)} for _ in range(4)
    ]
    return setup, state, batches


def run(args):
    setup, state, batches = prepare(args)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        state, metrics = setup.step(state, setup.teacher_params, batches[i % 4])
    jax.block_until_ready(state)
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for i in range(args.steps):
            state, metrics = setup.step(state, setup.teacher_params, batches[i % 4])
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t0) / args.steps)
    ms = sorted(times)[len(times) // 2] * 1e3
    tflops = setup.flops_per_image() * args.batch / (ms / 1e3) / 1e12
    row = dict(impl="dmt_jax", student=args.student, teachers=args.teachers, batch=args.batch)
    row.update(mask_ratio=args.mask_ratio, step_ms=round(ms, 2), img_per_s=round(args.batch / (ms / 1e3), 1))
    row.update(model_tflops=round(tflops, 1), mfu_vs_989=round(tflops / 989.0, 3), warmup_s=round(warm_s, 1))
    row.update(loss=float(metrics["loss"]), device=jax.devices()[0].device_kind, jax=jax.__version__)
    row.update(attention=args.attention, dtype=args.dtype, xla_flags=args.xla_flags)
    print(json.dumps(row), flush=True)
    if args.profile_top:
        from profile_step import profile  # noqa: PLC0415 (profile_step imports this module)

        profile(setup, state, batches, label=args.student, top=args.profile_top)


if __name__ == "__main__":
    main()
