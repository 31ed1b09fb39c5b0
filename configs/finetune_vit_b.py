"""Fine-tune a ViT-B/16 on ImageNet-1K: MAE's recipe (He et al., "Masked Autoencoders Are Scalable
Vision Learners", CVPR 2022, Table 9 and its main_finetune.py), which reaches 83.6% top-1 from MAE's
own ViT-B (their figure, not measured here).

    python -m dmt_jax.finetune --config=configs/finetune_vit_b.py --workdir=DIR --config.init=SRC \
        --config.data.tfds_data_dir=/path/to/tensorflow_datasets

Defaults (all from MAE): AdamW (0.9, 0.999), weight decay 0.05, base lr 5e-4 x batch / 256 with
batch 1024, layer-wise lr decay 0.65, 100 epochs with 5 of warmup, cosine to 1e-6, drop path 0.1,
mean-pooled patch tokens + fc_norm, label smoothing 0.1, Mixup 0.8 + CutMix 1.0 (switch prob 0.5),
RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, random-resized crop (0.08, 1), no EMA.
"""

from dmt_jax.config import finetune_imagenet_recipe


def get_config():
    return finetune_imagenet_recipe("B/16", base_lr=5e-4, layer_decay=0.65, epochs=100, drop_path=0.1)
