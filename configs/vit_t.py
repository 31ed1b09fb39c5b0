"""DMT, ViT-Ti/16 student distilled from three ViT-B/16 teachers (MAE, MoCo v3, DINO) on ImageNet-1K.

300 epochs, global batch 4096, AdamW (base_lr 1.5e-4 x batch / 256), mask ratio 0.75, drop path 0.0
(METHOD.md, "What this project implements"). First convert the teachers and prepare ImageNet
(README: "Teachers", "ImageNet"), then:

    python -m dmt_jax.main --config=configs/vit_t.py --workdir=/path/to/dmt_vit_t \
        --config.data.tfds_data_dir=/path/to/tensorflow_datasets
"""

from dmt_jax.config import imagenet_recipe


def get_config():
    return imagenet_recipe("Ti/16", drop_path=0.0)
