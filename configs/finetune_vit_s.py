"""Fine-tune a ViT-S/16 on ImageNet-1K: TinyMIM's fine-tuning command (Ren et al., "TinyMIM: An
Empirical Study of Distilling MIM Pre-trained Models", CVPR 2023; github.com/OliverRensu/TinyMIM
README, Finetuning), whose paper reports 83.0% top-1 for its distilled ViT-S (their figure, not
measured here).

    python -m dmt_jax.finetune --config=configs/finetune_vit_s.py --workdir=DIR --config.init=SRC \
        --config.data.tfds_data_dir=/path/to/tensorflow_datasets

Defaults: TinyMIM's command (MAE's main_finetune.py): base lr 5e-4 x batch / 256, batch 1024, layer
decay 0.6, 100 epochs with 5 of warmup, weight decay 0.05, drop path 0.1, Mixup 0.8 / CutMix 1.0,
random erasing 0.25, RandAugment rand-m9-mstd0.5-inc1, label smoothing 0.1, mean pooling + fc_norm.
The README states that command for ViT-B; it is used here unchanged for ViT-S.
"""

from dmt_jax.config import finetune_imagenet_recipe


def get_config():
    return finetune_imagenet_recipe("S/16", base_lr=5e-4, layer_decay=0.6, epochs=100, drop_path=0.1)
