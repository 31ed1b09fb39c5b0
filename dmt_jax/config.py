"""Every config field, with its default (METHOD.md's recipe); recipe files in configs/ override these.

One schema for all recipes, so a typo in a recipe or on the command line is caught by the locked
ConfigDict and reported with the nearest valid field name.
"""

from __future__ import annotations

import difflib

import ml_collections as mc


def base_config() -> mc.ConfigDict:
    c = mc.ConfigDict()
    c.seed = 0
    c.img_size = 224

    # Student (METHOD.md 5): fixed sin-cos position embeddings by default, as in MAE.
    c.student = mc.ConfigDict(
        dict(variant="S/16", pos_embed="sincos", drop_path=0.0, num_reg_tokens=0, layerscale_init=-1.0)
    )
    # Teachers (METHOD.md 2): converted teacher directories (`dmt-convert`), or 'random:VARIANT@PX:SEED'
    # for small in-process teachers with random weights (demo, benchmarks, tests).
    c.teachers = ("",)
    c.teacher_weights = ()  # empty: equal weights summing to 1
    c.teacher_dtype = "bfloat16"

    # Objective (METHOD.md 3-7).
    c.mask_ratio = 0.75
    c.head = "ln_linear"  # linear | ln_linear | mlp
    c.head_mlp_ratio = 4.0
    c.loss = "smooth_l1"  # smooth_l1 | mse | cosine
    c.smooth_l1_beta = 1.0
    c.cls_weight = -1.0  # < 0: CLS is one token among the others; else loss = w * CLS + (1 - w) * patches
    c.target_norm_eps = 1e-6

    # Optimization (METHOD.md 8).
    c.batch_size = 4096  # global
    c.epochs = 300.0
    c.total_steps = -1  # > 0 overrides epochs
    c.warmup_epochs = 20.0
    c.warmup_steps = -1  # >= 0 overrides warmup_epochs
    c.base_lr = 1.5e-4  # lr = base_lr * batch_size / 256
    c.min_lr = 0.0
    c.b1 = 0.9
    c.b2 = 0.95
    c.weight_decay = 0.05
    c.grad_clip = -1.0  # > 0: clip by global norm
    c.dtype = "bfloat16"  # matmuls; parameters are float32
    c.attention = "auto"  # auto | xla | cudnn
    c.remat = False
    c.nonfinite = "stop"  # a non-finite loss never updates the params; then: stop | skip (go on)

    # Scale (parallel.py): mesh axes (data, fsdp); -1 takes the remaining devices.
    c.mesh = mc.ConfigDict(dict(data=-1, fsdp=1))
    c.fsdp_min_size = 2**18  # parameters smaller than this stay replicated under fsdp
    c.distributed = mc.ConfigDict(dict(coordinator_address="", num_processes=-1, process_id=-1, auto=True))

    # Input.
    c.data = data_config()

    # Checkpoints, logs, evaluation.
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.log_every = 50
    c.eval_every = 5000  # <= 0: only before and after training
    c.evaluate = True  # False: no k-NN / alignment at all, not even at the end (tests, benchmarks)
    c.knn_k = 20
    c.knn_temperature = 0.07
    c.linear_probe_steps = 300  # full-batch steps of a softmax probe on the k-NN splits; 0: no probe
    c.eval_batch_size = 256
    c.log_example_ids = False  # write workdir/example_ids.jsonl (tests of exact resume)
    c.export_at_end = True  # the student as a timm state dict (safetensors)
    c.profile_steps = ()  # e.g. (100, 110): a jax profiler trace over those steps
    return c


def data_config() -> mc.ConfigDict:
    """Every data field (read by dmt_jax/data/config.py). The shuffle seed is the run's `seed`."""
    config = mc.ConfigDict()
    config.source = "demo"  # 'demo' | 'tfds' | 'folder'

    # tfds (array_record format; e.g. imagenet2012, see TfdsSource for the build command)
    config.tfds_name = "imagenet2012"
    config.tfds_data_dir = ""  # '' -> $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.train_split = "train"
    config.knn_train_split = "train"
    config.knn_eval_split = "validation"
    config.image_key = "image"
    config.label_key = "label"

    # image folders: <dir>/<class>/<image>.{jpg,jpeg,png}
    config.folder_train = ""
    config.folder_knn_train = ""  # '' -> folder_train
    config.folder_eval = ""

    # generated demo dataset, written on first use under demo_root/<a name made of its parameters>
    config.demo_root = "~/.cache/dmt_jax/demo"
    config.demo_num_classes = 10
    config.demo_per_class_train = 64
    config.demo_per_class_val = 16
    config.demo_img_size = 64

    # pipelines
    config.threads = 0  # tf.data private thread pool size; 0 -> the cores this process may run on
    config.num_parallel = -1  # parallel decodes; -1 -> tf.data.AUTOTUNE (bounded by threads)
    config.prefetch = 2  # batches
    config.crop_scale = (0.2, 1.0)
    config.crop_ratio = (3 / 4, 4 / 3)
    config.eval_crop_fraction = 0.875
    return config


# The paper's setting (METHOD.md): three ViT-B/16 teachers converted with `dmt-convert` into these
# directories (relative to the working directory unless overridden).
IMAGENET_TEACHERS = ("teachers/mae_vit_b16", "teachers/mocov3_vit_b16", "teachers/dino_vit_b16")


def imagenet_recipe(student: str, drop_path: float) -> mc.ConfigDict:
    """DMT on ImageNet-1K from tfds (array_record), 300 epochs, batch 4096: the vit_*.py recipes."""
    c = base_config()
    c.student.variant = student
    c.student.drop_path = drop_path
    c.teachers = IMAGENET_TEACHERS
    c.batch_size = 4096
    c.data.source = "tfds"
    c.data.tfds_name = "imagenet2012"
    c.data.train_split = "train"
    c.data.knn_train_split = "train[:10%]"  # k-NN memory bank: a tenth keeps evaluations short
    c.data.knn_eval_split = "validation"
    return c


def unknown_field_message(config: mc.ConfigDict, dotted: str) -> str:
    """'config field X does not exist; did you mean Y?' for a dotted name; '' if X exists."""
    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, mc.ConfigDict) and part in node:
            node = node[part]
            continue
        options = list(node.keys()) if isinstance(node, mc.ConfigDict) else []
        near = difflib.get_close_matches(part, options, n=1)
        if not near:
            return f"config field {dotted!r} does not exist"
        guess = parts[:i] + near + parts[i + 1 :]
        if unknown_field_message(config, ".".join(guess)):  # the rest is wrong too: offer the part that fits
            guess = parts[:i] + near
        return f"config field {dotted!r} does not exist; did you mean {'.'.join(guess)!r}?"
    return ""


def unknown_fields(config: mc.ConfigDict, schema: mc.ConfigDict) -> list[str]:
    """One unknown_field_message per field of config that schema lacks (a typo in a recipe file)."""

    def walk(node, schema_node, prefix):
        for key, value in node.items():
            if key not in schema_node:
                yield unknown_field_message(schema, prefix + key)
            elif isinstance(value, mc.ConfigDict) and isinstance(schema_node[key], mc.ConfigDict):
                yield from walk(value, schema_node[key], prefix + key + ".")

    return list(walk(config, schema, ""))
