"""Fine-tune a ViT-Ti/16 on ImageNet-1K: MAE-Lite's ViT-Tiny recipe (Wang et al., "A Closer Look at
Self-Supervised Lightweight Vision Transformers", ICML 2023; github.com/wangsr126/MAE-Lite,
projects/eval_tools/finetuning_mae_exp.py). TinyMIM reports 75.8% top-1 for its distilled ViT-T
(their figure, not measured here).

    python -m dmt_jax.finetune --config=configs/finetune_vit_t.py --workdir=DIR --config.init=SRC \
        --config.data.tfds_data_dir=/path/to/tensorflow_datasets

Defaults (MAE-Lite): base lr 1e-3 x batch / 256, batch 1024, layer decay 0.85, 100 epochs with 5 of
warmup, cosine to 1e-6, AdamW (0.9, 0.999), weight decay 0.05, drop path 0.1, mean pooling +
fc_norm, Mixup 0.8 / CutMix 1.0, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, label
smoothing 0.1. (MAE-Lite also uses color jitter 0.4 and bicubic crops; not implemented here.)
"""

from dmt_jax.config import finetune_imagenet_recipe


def get_config():
    return finetune_imagenet_recipe("Ti/16", base_lr=1e-3, layer_decay=0.85, epochs=100, drop_path=0.1)
