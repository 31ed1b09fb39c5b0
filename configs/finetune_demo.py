"""Demo fine-tuning: the demo's distilled student (configs/demo.py) fine-tuned on the demo labels.

    python -m dmt_jax.main --config=configs/demo.py --workdir=/tmp/dmt_demo        # distill first
    python -m dmt_jax.finetune --config=configs/finetune_demo.py --workdir=/tmp/dmt_demo_ft

`--config.init=` (empty) starts from random weights instead, and `--config.init=DIR` from a demo
teacher (cached under ~/.cache/dmt_jax/demo/.../teachers/): the same steps and seed, so the three
top-1s compare the starting points (README, Fine-tune). The recipe is MAE's (config.FINETUNE_SCHEMA)
scaled to 640 tiny images: batch 64, 600 steps (60 epochs), base lr 1e-2 (MAE: 5e-4; at 2e-2 random
init failed to train in our runs), layer decay 0.75 for a 2-block ViT, RandAugment m5 and crops of at
least 20% for 32 px images. Everything else as MAE: Mixup 0.8 / CutMix 1.0, label smoothing 0.1,
random erasing 0.25, drop path 0.1, mean pooling + fc_norm, bicubic resizing.
"""

from dmt_jax.config import finetune_base_config


def get_config():
    c = finetune_base_config()
    c.init = "/tmp/dmt_demo"
    c.img_size = 32
    c.model.variant = "mu/4"
    c.model.drop_path = 0.1
    c.dtype = "float32"
    c.batch_size = 64
    c.total_steps = 600
    c.warmup_steps = 30
    c.base_lr = 1e-2  # peak lr 2.5e-3
    c.layer_decay = 0.75
    c.checkpoint_every = 200
    c.log_every = 50
    c.eval_every = 200
    c.eval_batch_size = 160
    c.data.source = "demo"
    c.data.randaugment = "rand-m5-mstd0.5-inc1"
    c.data.crop_scale = (0.2, 1.0)  # as the distillation: 0.08 of a 64 px image leaves too little
    return c
