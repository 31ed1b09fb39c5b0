"""Fine-tune a ViT-Ti/16 on ImageNet-1K: MAE-Lite's "impr." recipe (Wang et al., "A Closer Look at
Self-Supervised Lightweight Vision Transformers", ICML 2023; github.com/wangsr126/MAE-Lite), the one
behind their ViT-Tiny figures: 78.0% top-1 from MAE-Tiny (their 400-epoch MAE-Lite pre-training),
78.4 and 78.7 from their distilled pre-trainings, and 75.8 from random init (their README, "Main
Results"; not measured here). Their command: `ssl_train -b 1024 -d 0-7 -e 300 -f finetuning_exp.py --amp`.

    python -m dmt_jax.finetune --config=configs/finetune_vit_t.py --workdir=DIR --config.init=SRC \
        --config.data.tfds_data_dir=/path/to/tensorflow_datasets

Where every value comes from (projects/eval_tools/finetuning_exp.py, which overrides
finetuning_mae_exp.py, which overrides mae_lite/exps/timm_imagenet_exp.py):
- the command: batch 1024, 300 epochs.
- finetuning_exp.py: RandAugment rand-m10-mstd0.5-inc1, Mixup 0.2, no CutMix, no label smoothing, no
  random erasing, drop path 0, no gradient clipping, colour jitter 0.3 (inactive: timm turns colour
  jitter off under RandAugment, so it is not implemented here).
- finetuning_mae_exp.py: lr 1e-3 x batch / 256, layer decay 0.85, AdamW (0.9, 0.999, eps 1e-8),
  weight decay 0.05, 5 warmup epochs from lr 0, cosine to min lr 1e-6 ("warmcos_scale", every
  iteration), global pooling + fc_norm, bicubic training crops, 224 px.
- timm_imagenet_exp.py: crop scale 0.08-1, ratio 3/4-4/3, flip 0.5, Mixup prob 1.0 and switch prob
  0.5 in 'batch' mode, no EMA; evaluation with timm's defaults (bicubic resize, crop 0.875).
MAE-Lite's ViT-Tiny has 12 heads of 16 channels (mae_lite/models/models_vit.py), not the 3 of 64 of
"Ti/16": an init's own head count is used (a distilled student or a converted teacher); a random
init gets "Ti/16"'s 3 heads. Head init: truncated normal, std 0.02 (their VisionTransformer calls
timm's init_weights(''): in timm 0.4.12, the version timm_imagenet_exp.py names, every Linear,
the head included, gets std 0.02; MAE's fine-tuning re-initializes its head with std 2e-5).
"""

from dmt_jax.config import finetune_imagenet_recipe


def get_config():
    c = finetune_imagenet_recipe("Ti/16", base_lr=1e-3, layer_decay=0.85, epochs=300, drop_path=0.0)
    c.batch_size = 1024
    c.warmup_epochs, c.min_lr, c.weight_decay = 5.0, 1e-6, 0.05
    c.label_smoothing = 0.0
    c.mixup_alpha, c.cutmix_alpha, c.mixup_prob, c.mixup_switch_prob = 0.2, 0.0, 1.0, 0.5
    c.grad_clip = 0.0
    c.model.global_pool, c.model.head_init_std = "avg", 0.02
    c.data.randaugment, c.data.random_erasing = "rand-m10-mstd0.5-inc1", 0.0
    c.data.crop_scale, c.data.interpolation, c.data.eval_crop_fraction = (0.08, 1.0), "bicubic", 0.875
    return c
