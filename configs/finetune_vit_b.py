"""Fine-tune a ViT-B/16 on ImageNet-1K: MAE's recipe, the one behind MAE's ViT-B figure, 83.6% top-1
(He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022; their FINETUNE.md reports
4 seeds: 83.63, 83.66, 83.52, 83.46; from MAE's own pre-trained ViT-B, not measured here).

    python -m dmt_jax.finetune --config=configs/finetune_vit_b.py --workdir=DIR --config.init=SRC \
        --config.data.tfds_data_dir=/path/to/tensorflow_datasets

Where every value comes from (github.com/facebookresearch/mae):
- FINETUNE.md's command: batch 1024 (32 per GPU x 32 GPUs), 100 epochs, blr 5e-4 (lr = blr x
  batch / 256), layer decay 0.65, weight decay 0.05, drop path 0.1, random erasing 0.25, Mixup 0.8,
  CutMix 1.0.
- main_finetune.py's defaults for everything the command leaves out: 5 warmup epochs, min lr 1e-6,
  label smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1, Mixup prob 1.0 and switch prob 0.5 in
  'batch' mode, no gradient clipping, global pooling (mean of the patch tokens + fc_norm), 224 px,
  head initialized with std 2e-5, AdamW (torch defaults: betas 0.9, 0.999, eps 1e-8), no EMA.
- util/lr_sched.py: linear warmup, then half-cycle cosine to min lr, set every iteration.
- util/datasets.py: training crops by timm's RandomResizedCrop (scale 0.08-1, log-uniform ratio
  3/4-4/3) and flip, resized bicubic; evaluation resized bicubic to 256 then centre-cropped to 224
  (crop 0.875); random erasing in 'pixel' mode, one box. Colour jitter: off (timm turns it off under
  RandAugment).
- Their training runs under torch.cuda.amp (fp16 matmuls, float32 parameters and residual stream);
  here the matmuls are bfloat16 and the residual stream follows model.residual_dtype.
"""

from dmt_jax.config import finetune_imagenet_recipe


def get_config():
    c = finetune_imagenet_recipe("B/16", base_lr=5e-4, layer_decay=0.65, epochs=100, drop_path=0.1)
    c.batch_size = 1024
    c.warmup_epochs, c.min_lr, c.weight_decay = 5.0, 1e-6, 0.05
    c.label_smoothing = 0.1
    c.mixup_alpha, c.cutmix_alpha, c.mixup_prob, c.mixup_switch_prob = 0.8, 1.0, 1.0, 0.5
    c.grad_clip = 0.0
    c.model.global_pool, c.model.head_init_std = "avg", 2e-5
    c.data.randaugment, c.data.random_erasing = "rand-m9-mstd0.5-inc1", 0.25
    c.data.crop_scale, c.data.interpolation, c.data.eval_crop_fraction = (0.08, 1.0), "bicubic", 0.875
    return c
