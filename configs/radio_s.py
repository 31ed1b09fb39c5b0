r"""Agglomerative ViT-S/16 from OpenAI CLIP ViT-B/16, SigLIP B/16-224, DINOv2 ViT-B/14 with registers and
SAM ViT-B at 512 px, on ImageNet-1K: configs/radio_b.py's recipe (every value and its source are there)
at about a tenth of its cost.

    dmt-convert ViT-B-16.pt                        teachers/clip_b16
    dmt-convert webli_en_b16_224_63724782.npz      teachers/siglip_b16_224
    dmt-convert dinov2_vitb14_reg4_pretrain.pth    teachers/dinov2_b14_reg_224 --img-size 224
    dmt-convert sam_vit_b_01ec64.pth               teachers/sam_b_512 --img-size 512
    python -m dmt_jax.main --config=configs/radio_s.py --workdir=/path/to/radio_s \
        --config.data.tfds_data_dir=/path/to/tensorflow_datasets

What differs from radio_b.py (all our choices: RADIO released no ViT-S): the student is ViT-S/16 with
the same 3 summary tokens + 5 registers; the teachers are the B-sized models of the same four families
(CLIP's summary is its 512-d projection; DINOv2 B/14 at 224 px gives a 16 x 16 grid; SAM B at 512 px a
32 x 32 grid, a fifth of its 1024 px cost); the stages are 224 px for 200k steps then 384 px to 300k
(the S student's grid 14 x 14, then 24 x 24); the rest (PHI-S, MLP v2 heads, losses, optimizer, batch
1024, data) is radio_b.py's.
"""

import os
import runpy

TEACHERS = (
    "clip=teachers/clip_b16",
    "siglip=teachers/siglip_b16_224",
    "dinov2=teachers/dinov2_b14_reg_224",
    "sam=teachers/sam_b_512",
)


def get_config():
    radio_b = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "radio_b.py"))
    return radio_b["radio_recipe"]("S/16", TEACHERS, ((0, 224), (200_000, 384)), 300_000, own_registers=5)
