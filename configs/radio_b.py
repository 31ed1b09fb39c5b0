r"""Agglomerative ViT-B/16 (RADIOv2.5-B's recipe where known) from OpenAI CLIP ViT-L/14-336, SigLIP
So400m/14-384, DINOv2 ViT-L/14 with registers and SAM ViT-H, on ImageNet-1K.

Convert the four official checkpoints once (README "Teachers"; CPU is enough), prepare ImageNet (README
"ImageNet-1K"), then run:

    dmt-convert ViT-L-14-336px.pt                 teachers/clip_l14_336
    dmt-convert siglip_so400m14_384.npz           teachers/siglip_so400m_384
    dmt-convert dinov2_vitl14_reg4_pretrain.pth   teachers/dinov2_l14_reg_378 --img-size 378
    dmt-convert sam_vit_h_4b8939.pth              teachers/sam_h
    python -m dmt_jax.main --config=configs/radio_b.py --workdir=/path/to/radio_b \
        --config.data.tfds_data_dir=/path/to/tensorflow_datasets

Memory (bench/RESULTS.md: XLA's buffer assignment of this step compiled on a CPU, an upper bound for a
GPU): 17.4 GiB per device at 2 images per device in the 432 px stage, plus 4.6 GiB per image, 3.1 of
which SAM-H at 1024 px adds over SAM-H at 512 (its global attention; it also costs 6.0 TFLOP per image).
That is 15 images per H100 80 GB, 28 per H200 (the global batch of 1024: 128 H100s at 8 each, or 64
H200s at 16), 2 per TPU v5e chip with `--config.mesh.fsdp=8`; remat does not lower it (the peak is
in the teachers' forward). SAM-H therefore stays at its full 1024 px. Where memory is short, convert
it at 512 px instead (`dmt-convert sam_vit_h_4b8939.pth teachers/sam_h_512 --img-size 512`, a 32 x 32
grid, 1.5 GiB per image in all; `--config.teachers` naming sam=teachers/sam_h_512).

Where each value comes from (RADIO: NVlabs/RADIO's code and its maintainers' answers in its issues;
AM-RADIO: CVPR 2024; RADIOv2.5: "Improved Baselines for Agglomerative Vision Foundation Models";
PHI-S: Ranzinger et al. 2024; UNIC: naver/unic's main_unic.py defaults) and what is our choice:

- Teachers. RADIOv2.5: DFN CLIP ViT-H/14-378, SigLIP So400m/14-384, DINOv2-g/14 with registers, SAM ViT-H
  (1024 px). Ours (issue 16): OpenAI CLIP L/14-336 at 336 px, SigLIP So400m/14 at 384 (a 27 x 27 grid: 378
  px), DINOv2 L/14-reg at 378 px (27 x 27: the student's grid at 432 px; our choice, RADIO's DINOv2
  resolution is not stated in what we read), SAM-H at 1024 px (its native size).
- Targets. Summary: CLIP's projected image embedding (usable with CLIP's text tower), SigLIP's MAP-head
  vector, DINOv2's CLS; SAM has none (RADIO's per-teacher `use_summary` switch; SAM gives no image
  vector). Dense: every teacher's final patch tokens (SAM: its neck's 64 x 64 x 256), each on its own
  grid.
- Student. ViT-B/16 (RADIOv2.5-B); one summary token per teacher with a summary (RADIO's
  cls_token_per_teacher): CLS for clip, then registers for dinov2 and siglip (name order), and 5 own
  registers, which pads the 3 summary tokens to 8 as RADIO's ClsToken does (registers = multiple - tokens
  % multiple; RADIOv2.5-B has 4 summary tokens + 4 registers, METHOD.md). Learned position table (RADIO
  learns its CPE table; ours is sized for the last stage, 432 px, and resized bilinearly for the first, as
  RADIO's is for each input size). Final norm kept (RADIO drops it, METHOD.md; ours is the ViT's, which
  the exported heads expect). drop_path 0.1: UNIC's (RADIO's unknown).
- Heads. RADIO's MLP v2 (fc1, residual LayerNorm-GELU-Linear blocks, LayerNorm-GELU-Linear) for summary
  and dense, as RADIOv2.5's adaptors; hidden width the student's (768) and one residual block: our choice
  (the released adaptors' sizes were not read).
- Normalization: PHI-S on every teacher's dense features (RADIOv2.5: PHI-S was "one of the major algorithm
  updates behind the version 2.5 releases", RADIO's README; RADIO's feature normalizer acts on the spatial
  features), statistics from the first 100 steps, then frozen (ours; PHI-S estimates them once). Summary
  targets as the teachers give them (summary_norm none): their loss is a cosine, and CLIP's and SigLIP's
  vectors keep the geometry their text towers expect.
- Loss. Summary: cosine (AM-RADIO). Dense: 0.9 cosine + 0.1 smooth-L1 (AM-RADIO, Theia); PHI-S studies its
  normalizations under an MSE feature loss, and smooth-L1 (beta 1) on PHI-S's unit-variance targets is MSE
  / 2 where the error is below 1. Every teacher weighted 1 (PHI-S balances them). The student's adapted
  features are resampled bilinearly to each teacher's grid (RADIO). No masking (RADIO encodes every
  patch), no teacher dropping (RADIO has none; UNIC drops with 0.5).
- Resolution stages. RADIOv2.5 (maintainer, NVlabs/RADIO issue 135): stage 1 at 256 px, stage 2 at 432 px,
  stage 3 at 432 and 1024 px at once (two GPU partitions, every teacher on both, issue 113). AM-RADIO:
  600k steps, 300k at 256 px then 300k at 432 px (as its readers report it, issue 125). Ours: 256 px for
  300k steps, then 432 px to 600k; the mixed third stage is not an option of this objective (one student
  size per step): instead SAM sees every view at its own 1024 px from step 0, its 64 x 64 features
  compared with the student's upsampled ones (RADIO trains 1024 in stage 3 against the "mode switching"
  between low and high resolution it reports; a third stage can be added, e.g.
  `--config.stages="((0,256),(300000,432),(500000,1024))"`, at about 6x the student's cost per image).
- Optimization (RADIO's optimizer, lr and batch are not stated in what we read): UNIC's AdamW, lr 3e-4 x
  batch / 256, betas (0.9, 0.99), weight decay 0.03, cosine to 1e-6, warmup 5% of the run (UNIC: 10 of 200
  epochs); global batch 1024 (ours); bf16 student matmuls and teachers, float32 parameters.
- Data: RADIO distils on DataComp-1B; ours ImageNet-1K's 1.28M training images (tfds), views of 1024 px
  (the largest teacher's size) with DMT's RandomResizedCrop(0.2, 1) and flip, resized for each teacher and
  for the student.
"""

from dmt_jax.config import base_config, teacher_options

TEACHERS = (
    "clip=teachers/clip_l14_336",
    "siglip=teachers/siglip_so400m_384",
    "dinov2=teachers/dinov2_l14_reg_378",
    "sam=teachers/sam_h",
)


def radio_recipe(student: str, teachers, stages, total_steps: int, own_registers: int):
    """The agglomerative ImageNet recipe shared by radio_b.py and radio_s.py (the values above)."""
    c = base_config()
    c.objective = "agglomerative"
    c.student.variant = student
    c.student.pos_embed = "learned"
    c.student.num_reg_tokens = own_registers
    c.student.drop_path = 0.1
    c.img_size = stages[-1][1]  # the position table's grid: the last stage's
    c.stages = stages
    c.total_steps = total_steps
    c.warmup_steps = total_steps // 20
    c.mask_ratio = 0.0
    c.teachers = teachers
    a = c.agglomerative
    a.resample = "student_to_teacher"
    a.summary_loss = (1.0, 0.0)
    a.dense_loss = (0.9, 0.1)
    a.teacher_drop = 0.0
    a.phi_s_steps = 100
    a.head_hidden_dim = -1
    a.head_num_inner = 1
    a.per_teacher = {
        name: teacher_options(
            norm="phi_s",
            summary_norm="none",
            summary_head="none" if name == "sam" else "mlp_v2",
            dense_head="mlp_v2",
        )
        for name in (entry.split("=", 1)[0] for entry in teachers)
    }
    c.batch_size = 1024
    c.base_lr = 3e-4
    c.min_lr = 1e-6
    c.b1, c.b2 = 0.9, 0.99
    c.weight_decay = 0.03
    c.dtype = c.teacher_dtype = "bfloat16"
    c.data.source = "tfds"
    c.data.tfds_name = "imagenet2012"
    c.data.train_split = "train"
    c.data.knn_train_split = "train[:10%]"
    c.data.knn_eval_split = "validation"
    return c


def get_config():
    return radio_recipe("B/16", TEACHERS, ((0, 256), (300_000, 432)), 600_000, own_registers=5)
