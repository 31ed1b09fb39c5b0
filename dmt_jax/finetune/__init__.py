"""Fine-tuning a distilled student (or a teacher, or a random ViT) as an image classifier.

    python -m dmt_jax.finetune --config=configs/finetune_vit_s.py --workdir=DIR --config.init=SRC

SRC is a distillation workdir (its newest checkpoint's student encoder), a student_timm.safetensors,
a converted teacher directory, or '' (random init). The recipe is MAE/BEiT's (every part a field of
config.FINETUNE_SCHEMA): AdamW with layer-wise lr decay, mean-pooled tokens + fc_norm (or CLS),
label smoothing, Mixup/CutMix on the device inside the step, RandAugment and random erasing in the
tf.data pipeline, optional EMA. Everything else is the distillation's: mesh and partition rules,
the sharded init and step (train.sharded_init, train.guarded_update), the input pipelines, orbax
checkpoints with exact resume, the flag parsing, and runner.py: the workdir lock, the resume check (a
resume with another init or changed training fields is refused unless resume_allow_changes),
preemption (also while waiting for input), the books, the progress line and the step loop.

The workdir gets checkpoints/, TensorBoard events, config.json, eval.jsonl (top-1/top-5 per
evaluation, and the best top-1 with its step) and classifier_timm.safetensors (timm loads it
strictly; its kwargs and pretrained_cfg are in the file's metadata).

Modules: model (the classifier and its export), pretrained (init sources), recipe (layer decay, AdamW,
label smoothing, Mixup/CutMix), build (sharded state, step, predict), loop, cli (validation and
command line; __main__ runs it).
"""

from dmt_jax.finetune.build import FinetuneSetup, build
from dmt_jax.finetune.cli import check_run, run
from dmt_jax.finetune.loop import finetune, top1_top5
from dmt_jax.finetune.model import (
    EXPORT_NAME,
    HEAD_NAMES,
    Classifier,
    FinetuneState,
    build_model,
    classifier_state_dict,
    export_classifier,
)
from dmt_jax.finetune.pretrained import Pretrained, load_pretrained
from dmt_jax.finetune.recipe import (
    layer_id,
    layer_lr_scales,
    make_optimizer,
    smooth_one_hot,
)

__all__ = [
    "EXPORT_NAME",
    "HEAD_NAMES",
    "Classifier",
    "FinetuneSetup",
    "FinetuneState",
    "Pretrained",
    "build",
    "build_model",
    "check_run",
    "classifier_state_dict",
    "export_classifier",
    "finetune",
    "layer_id",
    "layer_lr_scales",
    "load_pretrained",
    "make_optimizer",
    "run",
    "smooth_one_hot",
    "top1_top5",
]
