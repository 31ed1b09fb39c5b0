"""Fine-tune a ViT-S/16 on ImageNet-1K with TinyMIM's published fine-tuning command (Ren et al., "TinyMIM:
An Empirical Study of Distilling MIM Pre-trained Models", CVPR 2023; github.com/OliverRensu/TinyMIM).

    python -m dmt_jax.finetune --config=configs/finetune_vit_s.py --workdir=DIR --config.init=SRC \
        --config.data.tfds_data_dir=/path/to/tensorflow_datasets

The figure this recipe is behind: TinyMIM's README gives one fine-tuning command, for ViT-B
(`--model vit_base_patch16`), behind their ViT-B figure, 85.0% top-1. Their ViT-S figure, 83.0%,
comes from fine-tuning settings their repository does not publish, so no published ViT-S figure
stands behind this recipe: it is that command, unchanged, on a ViT-S (for a ViT-S the neighbouring
figures are TinyMIM ViT-S 83.0 and MAE ViT-S 80.6, both from TinyMIM's README table; not measured here).

Where every value comes from:
- TinyMIM's README command: batch 1024 (128 per GPU x 8 GPUs), 100 epochs, blr 5e-4 (lr = blr x
  batch / 256), layer decay 0.65, weight decay 0.05, drop path 0.2, random erasing 0.25, Mixup 0.8,
  CutMix 1.0.
- The rest is MAE's main_finetune.py (TinyMIM is built on MAE's code; configs/finetune_vit_b.py lists
  it): 5 warmup epochs, min lr 1e-6, label smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1, Mixup
  prob 1.0 / switch prob 0.5, global pooling + fc_norm, head std 2e-5, AdamW (0.9, 0.999), no
  gradient clipping, bicubic crops (scale 0.08-1) and bicubic evaluation resize with crop 0.875.
"""

from dmt_jax.config import finetune_imagenet_recipe


def get_config():
    c = finetune_imagenet_recipe("S/16", base_lr=5e-4, layer_decay=0.65, epochs=100, drop_path=0.2)
    c.batch_size = 1024
    c.warmup_epochs, c.min_lr, c.weight_decay = 5.0, 1e-6, 0.05
    c.label_smoothing = 0.1
    c.mixup_alpha, c.cutmix_alpha, c.mixup_prob, c.mixup_switch_prob = 0.8, 1.0, 1.0, 0.5
    c.grad_clip = 0.0
    c.model.global_pool, c.model.head_init_std = "avg", 2e-5
    c.data.randaugment, c.data.random_erasing = "rand-m9-mstd0.5-inc1", 0.25
    c.data.crop_scale, c.data.interpolation, c.data.eval_crop_fraction = (0.08, 1.0), "bicubic", 0.875
    return c
