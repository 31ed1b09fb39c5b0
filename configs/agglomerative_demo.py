"""Agglomerative demo: one student from teachers of four kinds, no downloads, a few minutes on 2 CPU cores.

Small teachers of four families, each trained in process from its own seed on the demo's generated
dataset (dmt_jax/demo_teachers.py, `demo:FAMILY:VARIANT@PX:SEED`; cached beside the dataset for later
runs): a CLIP-like ViT (ln_pre, QuickGELU, a projection: its summary is the projected CLS), a
SigLIP-like ViT without CLS whose summary is its MAP head's output, an EVA-like model (RoPE, SwiGLU)
and a SAM-like windowed encoder at twice the student's resolution (no summary: dense targets only).
A tiny /4 student that never sees a label learns them all at once, RADIO/UNIC style: one
summary token per teacher with a summary head (cosine loss on the teacher's summary) and a dense
head per teacher on its patch tokens, compared on the teacher's own grid (0.9 cosine + 0.1
smooth-L1). Each evaluation prints, per teacher, the cosine of the student's summary and dense
heads with the teacher, k-NN and linear probe on the student's summary token for that teacher, the
linear CKA of its encoder with the teacher, and draws the PCA pictures of every teacher and of the
student's adapted features; the last one prints each figure before -> after.

    python -m dmt_jax.main --config=configs/agglomerative_demo.py --workdir=/tmp/dmt_agglomerative_demo
"""

from dmt_jax.config import base_config


def get_config():
    c = base_config()
    c.objective = "agglomerative"
    c.img_size = 32
    c.student.variant = "mu/4"
    # NAME=ENTRY: heads, metrics and options are keyed by these names.
    c.teachers = (
        "clip=demo:clip:mu/4@32:1",
        "siglip=demo:siglip:mu/8@48:2",
        "eva=demo:eva:mu/8@48:3",
        "sam=demo:sam:mu/8@64:4",
    )
    # RADIO's recipe where the demo allows: the student whole (no masking), its adapted features
    # resampled to each teacher's grid, summary cosine, dense 0.9 cosine + 0.1 smooth-L1, RADIO's MLP v2
    # heads; targets normalized per token as DMT does (parameter-free LayerNorm, the default).
    c.mask_ratio = 0.0
    c.agglomerative.resample = "student_to_teacher"
    c.agglomerative.summary_loss = (1.0, 0.0)
    c.agglomerative.dense_loss = (0.9, 0.1)
    c.teacher_dtype = "float32"
    c.dtype = "float32"
    # Batch 8: on a CPU this student's step costs 2.5 ms of CPU per image at batch 8 against 3.1 at 16
    # and 32 (activations that fit the cache), and more updates help on 640 images.
    c.batch_size = 8
    c.total_steps = 1500
    c.warmup_steps = 100
    c.base_lr = 0.032  # peak lr 1e-3 (= base_lr x 8 / 256)
    c.checkpoint_every = 750
    c.log_every = 100
    c.eval_every = 750  # before, halfway, after
    c.eval_batch_size = 128
    c.data.source = "demo"
    # Compiled programs are cached beside the demo data: a second run compiles (almost) nothing.
    c.compilation_cache_dir = "~/.cache/dmt_jax/compilation_cache"
    return c
