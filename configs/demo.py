"""Demo: a complete distillation on this laptop-sized machine, no downloads, a few minutes on 2 CPU cores.

Three small teachers, trained in process from fixed seeds on a generated dataset of visually
distinct classes (dmt_jax/demo_teachers.py; cached for later runs; one of them /8, fed 64 px to
match the student's 8x8 grid, as DINOv2 /14 is fed 196 px in real runs), are distilled into a tiny
/4 student that never sees a label. It shows every part: progress, checkpoints,
TensorBoard events, k-NN of each teacher and of the student before and after, alignment, export.

    python -m dmt_jax.main --config=configs/demo.py --workdir=/tmp/dmt_demo
"""

from dmt_jax.config import base_config


def get_config():
    c = base_config()
    c.img_size = 32
    c.student.variant = "mu/4"
    c.teachers = ("demo:mu/4@32:1", "demo:mu/4@32:2", "demo:mu/8@64:3")
    c.teacher_dtype = "float32"
    c.dtype = "float32"
    # Batch 32, not 64: on a CPU this tiny step costs about a third of batch 64's (measured 36 vs
    # 100-130 ms of CPU; activations that fit the cache). 1500 steps, not 600: the student's k-NN went
    # from 38% to 58% for 22 s more, and only a student that strong pays off in fine-tuning
    # (configs/finetune_demo.py: 600 steps gave +0.4 points over random init, 1500 gave +17; with the
    # teachers of the torchvision crop box, 1500 steps give 51.9% and +13.7: README, Fine-tune).
    c.batch_size = 32
    c.total_steps = 1500
    c.warmup_steps = 40
    c.base_lr = 8e-3  # peak lr 1e-3 (= base_lr x 32 / 256)
    c.mask_ratio = 0.5
    c.cls_weight = 0.5  # k-NN reads the CLS token; with 32 patch tokens beside it, give it half the loss
    c.checkpoint_every = 750
    c.log_every = 50
    c.eval_every = 750  # before, halfway, after
    c.eval_batch_size = 128
    c.data.source = "demo"
    # Compiled programs are cached beside the demo data: a second run compiles (almost) nothing.
    c.compilation_cache_dir = "~/.cache/dmt_jax/compilation_cache"
    return c
