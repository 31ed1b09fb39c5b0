"""Every config field, in one schema: its default (METHOD.md's recipe), one line of meaning, its range.

A schema is a nested dict of `Field(default, help, check)`; `to_config(schema)` gives the ConfigDict
of its defaults (`base_config()`), which recipe files in configs/ override by plain assignment. From
the same declaration come `--help` (`help_lines`) and the range checks (`field_problems`: one
'--config.FIELD=VALUE: what it must be' per bad field); checks between fields are in
`consistency_problems`, and dmt_jax/validate.py runs them all, with the checks of the dataset, the
teachers and the workdir, before anything is built or written. To add a field, add one `Field` line
(a check is one of the small functions below, or a lambda returning '' or what the value must be).

One schema for all recipes, so a typo in a recipe or on the command line is caught by the locked
ConfigDict and reported with the nearest valid field name.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_collections as mc

# ---------------------------------------------------------------- the mechanism


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: its default, one line of meaning (--help), and its range check.

    `entries`: a keyed block (e.g. per teacher name): the value maps names to blocks of these Fields,
    each field optional (absent: its default); checked, listed in --help and read through `entry`."""

    default: Any
    help: str
    check: Callable[[Any], str] = lambda value: ""  # value -> '' if fine, else what it must be
    entries: Mapping | None = None


def to_config(schema: Mapping) -> mc.ConfigDict:
    """A schema (nested dicts of Fields) -> the ConfigDict of its defaults."""
    return mc.ConfigDict(
        {k: to_config(v) if isinstance(v, Mapping) else v.default for k, v in schema.items()}
    )


def schema_fields(schema: Mapping, prefix: str = "") -> Iterator[tuple[str, Field]]:
    """('data.source', Field) for every field of a schema, in declaration order."""
    for key, value in schema.items():
        if isinstance(value, Mapping):
            yield from schema_fields(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def field_problems(config: mc.ConfigDict, schema: Mapping) -> list[str]:
    """'--config.FIELD=VALUE: what it must be' for every field of config that fails its check."""
    problems = []
    for name, spec in schema_fields(schema):
        value = _get(config, name)
        if spec.entries is not None:
            problems += _entry_problems(name, value, spec.entries)
            continue
        if why := _check(spec, value):
            problems.append(f"--config.{name}={_show(value)}: {why}")
    return problems


def help_lines(schema: Mapping) -> list[str]:
    """One line per field, 'name = default  meaning' (for --help); a keyed block's fields as NAME.field."""
    rows = []
    for name, spec in schema_fields(schema):
        rows.append((name, _show(spec.default), spec.help))
        for sub_name, sub_spec in schema_fields(spec.entries or {}):
            rows.append((f"{name}.NAME.{sub_name}", _show(sub_spec.default), sub_spec.help))
    width = max(len(f"{name} = {default}") for name, default, _ in rows)
    return [f"  {f'{name} = {default}':<{width}}  {meaning}" for name, default, meaning in rows]


KEY_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def _entry_problems(name: str, value, entries: Mapping) -> list[str]:
    """Problems of a keyed block: names that are no identifiers, unknown fields, values out of range."""
    if not isinstance(value, Mapping | mc.ConfigDict):
        return [f"--config.{name}={_show(value)}: must be a dict of {{NAME: {{field: value}}}}"]
    problems = []
    known = dict(schema_fields(entries))
    for key, block in value.items():
        where = f"{name}.{key}"
        if not KEY_NAME.fullmatch(str(key)):
            problems.append(f"--config.{where}: {key!r} must be a name (letters, digits, _)")
        if not isinstance(block, Mapping | mc.ConfigDict):
            problems.append(f"--config.{where}={_show(block)}: must be a dict of fields")
            continue
        for field in block:
            if field not in known:
                near = difflib.get_close_matches(field, list(known), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f" (fields: {', '.join(known)})"
                problems.append(f"config field {where}.{field!r} does not exist{hint}")
        for field, spec in known.items():
            if field in block and (why := _check(spec, block[field])):
                problems.append(f"--config.{where}.{field}={_show(block[field])}: {why}")
    return problems


def _check(spec: Field, value) -> str:
    try:
        return spec.check(value)
    except (TypeError, ValueError) as e:  # a value of another type than the check expects
        return f"not a valid value ({e})"


def entry(config_block, key: str, entries: Mapping) -> mc.ConfigDict:
    """One block of a keyed field with every field filled in (the schema's default where absent)."""
    given = config_block[key] if config_block is not None and key in config_block else {}
    return mc.ConfigDict({f: given.get(f, spec.default) for f, spec in schema_fields(entries)})


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def _show(value) -> str:
    return repr(tuple(value)) if isinstance(value, list | tuple) else repr(value)


# Checks: each returns '' for a good value, else what the value must be.
def _finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def boolean(v) -> str:
    return "" if isinstance(v, bool) else "must be True or False"


def text(v) -> str:
    return "" if isinstance(v, str) else "must be a string"


def nonempty_text(v) -> str:
    return "" if isinstance(v, str) and v.strip() else "must be a non-empty string"


def at_least(low, *, exclusive: bool = False, or_: tuple = ()) -> Callable[[Any], str]:
    """A finite number >= low (> low when exclusive); the values in `or_` are allowed too (sentinels)."""

    def check(v):
        if v in or_ and not isinstance(v, bool):
            return ""
        if _finite(v) and (v > low if exclusive else v >= low):
            return ""
        rule = f"a number {'>' if exclusive else '>='} {low}"
        return "must be " + " or ".join([rule, *map(repr, or_)])

    return check


def between(low, high, *, high_open: bool = False) -> Callable[[Any], str]:
    def check(v):
        if _finite(v) and low <= v and (v < high if high_open else v <= high):
            return ""
        return f"must be in [{low}, {high}{')' if high_open else ']'}"

    return check


def integer(check: Callable[[Any], str]) -> Callable[[Any], str]:
    """`check`, and the value must be an integer."""
    return lambda v: (
        check(v) or ("" if isinstance(v, int) and not isinstance(v, bool) else "must be an integer")
    )


def one_of(*choices) -> Callable[[Any], str]:
    return lambda v: "" if v in choices else f"must be one of {', '.join(map(repr, choices))}"


def finite(v) -> str:
    return "" if _finite(v) else "must be a finite number"


def vit_variant(v) -> str:
    from dmt_jax.models.vit import parse_variant

    try:
        parse_variant(v)
        return ""
    except (ValueError, AttributeError, TypeError):
        return "must be NAME/PATCH (e.g. 'S/16', 'mu/4') with NAME one of mu, Ti, S, M, B, L, H"


def range_pair(low: float, high: float | None) -> Callable[[Any], str]:
    """(a, b) with low < a <= b (<= high when given): crop scales and ratios."""

    def check(v):
        ok = isinstance(v, list | tuple) and len(v) == 2 and all(_finite(x) for x in v)
        ok = ok and low < v[0] <= v[1] and (high is None or v[1] <= high)
        return (
            "" if ok else f"must be (a, b) with {low} < a <= b" + (f" <= {high}" if high is not None else "")
        )

    return check


def step_range(v) -> str:
    """profile_steps: () or (first, last) with 0 <= first < last."""
    ok = isinstance(v, list | tuple) and len(v) in (0, 2) and all(isinstance(x, int) for x in v)
    return "" if ok and (not v or 0 <= v[0] < v[1]) else "must be () or (first, last) with 0 <= first < last"


def weights(v) -> str:
    if not isinstance(v, list | tuple) or not all(_finite(w) and w >= 0 for w in v):
        return "must be () or non-negative finite numbers, one per teacher"
    return "" if not v or sum(v) > 0 else "must not sum to 0"


def strings(v) -> str:
    ok = isinstance(v, list | tuple) and all(isinstance(x, str) for x in v)
    return "" if ok else "must be a tuple of strings, e.g. \"('teachers/mae_vit_b16',)\""


def randaugment_spec(v) -> str:
    """'' or timm's RandAugment string of the increasing op set (dmt_jax/data/randaugment.py)."""
    ok = isinstance(v, str) and (not v or re.fullmatch(r"rand(-(m[0-9.]+|n[0-9]+|mstd[0-9.]+|inc1))*", v))
    return "" if ok else "must be '' or timm's RandAugment string, e.g. 'rand-m9-mstd0.5-inc1'"


def weight_pair(v) -> str:
    """(cosine, smooth-L1) loss weights: two non-negative numbers, not both 0."""
    ok = isinstance(v, list | tuple) and len(v) == 2 and all(_finite(w) and w >= 0 for w in v)
    return "" if ok and sum(v) > 0 else "must be (cosine weight, smooth-L1 weight), >= 0, not both 0"


def momentum_pair(v) -> str:
    ok = isinstance(v, list | tuple) and len(v) == 2 and all(_finite(m) and 0 <= m <= 1 for m in v)
    return "" if ok else "must be (start, end), each in [0, 1]"


def stage_list(v) -> str:
    """() or ((0, px), (step, px), ...): steps increasing from 0, sizes positive integers."""
    ok = isinstance(v, list | tuple) and all(
        isinstance(s, list | tuple) and len(s) == 2 and all(_is_int(x) for x in s) for s in v
    )
    ok = ok and (not v or (v[0][0] == 0 and all(a[0] < b[0] for a, b in zip(v, v[1:], strict=False))))
    ok = ok and all(px > 0 for _, px in v)
    return "" if ok else "must be () or ((0, px), (step, px), ...) with increasing steps, the first 0"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


positive = at_least(0, exclusive=True)
non_negative = at_least(0)
DTYPES = one_of("float32", "bfloat16", "float16")
HEAD_KINDS = ("mlp_v2", "mlp_v1", "mlp", "ln_linear", "linear")  # objective/heads.py


# ---------------------------------------------------------------- the distillation schema


BASE_SCHEMA = {
    "seed": Field(0, "seed of initialization, masks and the data order", integer(non_negative)),
    "img_size": Field(
        224, "student input resolution in pixels (a multiple of its patch size)", integer(positive)
    ),
    # Student (METHOD.md 5): fixed sin-cos position embeddings by default, as in MAE.
    "student": {
        "variant": Field("S/16", "student ViT: NAME/PATCH, NAME in mu, Ti, S, M, B, L, H", vit_variant),
        "pos_embed": Field(
            "sincos", "position embeddings: sincos (fixed, as MAE) | learned", one_of("sincos", "learned")
        ),
        "drop_path": Field(0.0, "stochastic depth rate of the student", between(0, 1, high_open=True)),
        "num_reg_tokens": Field(0, "register tokens of the student", integer(non_negative)),
        "layerscale_init": Field(-1.0, "LayerScale initial value; <= 0: no LayerScale", finite),
    },
    # Teachers (METHOD.md 2).
    "teachers": Field(
        ("",),
        "teacher directories (dmt-convert), or 'random:VARIANT@PX:SEED' / "
        "'demo:VARIANT@PX:SEED' for small in-process teachers (a ViT; 'demo:FAMILY:VARIANT@PX:SEED' "
        "with FAMILY clip, siglip, eva or sam for one of that family, e.g. 'demo:clip:mu/4@32:1'); "
        "agglomerative: NAME=ENTRY",
        strings,
    ),
    "teacher_weights": Field((), "loss weight per teacher (normalized to sum 1); (): equal weights", weights),
    "allow_duplicate_teachers": Field(
        False,
        "allow one teacher named twice (it then weighs double; teacher_weights says so openly)",
        boolean,
    ),
    "teacher_dtype": Field("bfloat16", "dtype of the frozen teachers' weights and matmuls", DTYPES),
    # Objective (METHOD.md 3-7).
    "mask_ratio": Field(0.75, "fraction of the student's patches masked out", between(0, 1, high_open=True)),
    "head": Field(
        "ln_linear",
        "projection head per teacher: linear | ln_linear | mlp",
        one_of("linear", "ln_linear", "mlp"),
    ),
    "head_mlp_ratio": Field(4.0, "hidden width / teacher width of the 'mlp' head", positive),
    "loss": Field(
        "smooth_l1",
        "distance to the teachers' tokens: smooth_l1 | mse | cosine",
        one_of("smooth_l1", "mse", "cosine"),
    ),
    "smooth_l1_beta": Field(1.0, "beta of the smooth-L1 loss", positive),
    "cls_weight": Field(
        -1.0,
        "< 0: CLS is one token among the others; else loss = w * CLS + (1 - w) * patches",
        lambda v: "" if _finite(v) and v <= 1 else "must be < 0, or in [0, 1]",
    ),
    "target_norm_eps": Field(
        1e-6, "epsilon of the per-token normalization of the teachers' targets", positive
    ),
    # The agglomerative objective (issue 16; METHOD.md "Beyond DMT"): options of the one objective.
    "objective": Field(
        "dmt",
        "dmt (METHOD.md 3-7) | agglomerative (per teacher NAME=ENTRY: summary and dense targets on its "
        "own grid, the agglomerative.* fields; RADIO, UNIC, Theia)",
        one_of("dmt", "agglomerative"),
    ),
    "stages": Field(
        (),
        "agglomerative: ((0, px), (step, px), ...) the student's input size from each step on, its "
        "position table (img_size's grid) resized per stage, one compile each; (): img_size throughout",
        stage_list,
    ),
    "agglomerative": {
        "resample": Field(
            "student_to_teacher",
            "grid matching: student_to_teacher (the student's adapted features, bilinear, RADIO) | "
            "teacher_to_student (required with mask_ratio > 0: compared at the visible patches)",
            one_of("student_to_teacher", "teacher_to_student"),
        ),
        "summary_loss": Field(
            (1.0, 0.0),
            "(cosine, smooth-L1) weights of the summary loss (RADIO: (1, 0); UNIC: (0.5, 0.5))",
            weight_pair,
        ),
        "dense_loss": Field(
            (0.9, 0.1),
            "(cosine, smooth-L1) weights of the dense loss (AM-RADIO, Theia: (0.9, 0.1); UNIC: (0.5, 0.5))",
            weight_pair,
        ),
        "teacher_drop": Field(
            0.0,
            "per image, each teacher but its highest-loss one is dropped with this probability (UNIC: 0.5)",
            between(0, 1, high_open=True),
        ),
        "phi_s_steps": Field(
            100,
            "norm=phi_s: steps whose features estimate mean and covariance, then frozen",
            integer(positive),
        ),
        "standardize_momentum": Field(
            (1.0, 0.001),
            "norm=standardize: (start, end) weight of each batch in the running statistics, cosine (UNIC)",
            momentum_pair,
        ),
        "head_hidden_dim": Field(
            -1,
            "hidden width of the mlp_v1 / mlp_v2 heads; -1: the student's width",
            integer(at_least(1, or_=(-1,))),
        ),
        "head_num_inner": Field(
            1, "inner layers (mlp_v1) or residual blocks (mlp_v2) of the MLP heads", integer(non_negative)
        ),
        "per_teacher": Field(
            {},
            "options of teacher NAME (NAME=ENTRY in teachers; a teacher absent here gets the defaults)",
            entries={
                "summary_head": Field(
                    "mlp_v2",
                    "summary adaptor on the teacher's summary token | none (no summary target, e.g. SAM)",
                    one_of(*HEAD_KINDS, "none"),
                ),
                "dense_head": Field(
                    "mlp_v2",
                    "dense adaptor on the student's patch tokens | none",
                    one_of(*HEAD_KINDS, "none"),
                ),
                "norm": Field(
                    "layernorm",
                    "dense targets' normalization: none | layernorm (DMT) | standardize (UNIC) | phi_s",
                    one_of("none", "layernorm", "standardize", "phi_s"),
                ),
                "summary_norm": Field(
                    "none",
                    "summary target's normalization, the same kinds (phi_s: needs phi_s_steps x batch_size "
                    "above its width)",
                    one_of("none", "layernorm", "standardize", "phi_s"),
                ),
                "summary_weight": Field(1.0, "weight of this teacher's summary loss", non_negative),
                "dense_weight": Field(1.0, "weight of this teacher's dense loss", non_negative),
                "follow_stages": Field(
                    False,
                    "run the teacher at the student's size of each stage (img_size without stages), cut to "
                    "a multiple of its patch size, its position tables resized in the step as its own code "
                    "resizes them; False: at its converted size throughout",
                    boolean,
                ),
            },
        ),
    },
    # Optimization (METHOD.md 8).
    "batch_size": Field(4096, "global batch size (a multiple of the device count)", integer(positive)),
    "epochs": Field(
        300.0, "length of the run in epochs of the training set (unless total_steps > 0)", positive
    ),
    "total_steps": Field(
        -1, "> 0: length of the run in steps, overriding epochs", integer(at_least(1, or_=(-1,)))
    ),
    "warmup_epochs": Field(
        20.0,
        "linear lr warmup in epochs; with total_steps, the same fraction warmup_epochs / epochs of the run",
        non_negative,
    ),
    "warmup_steps": Field(
        -1,
        ">= 0: warmup in steps, overriding warmup_epochs (a warmup ends a step before the run at the latest)",
        integer(at_least(0, or_=(-1,))),
    ),
    "base_lr": Field(
        1.5e-4, "peak learning rate = base_lr * batch_size / 256 (cosine decay after warmup)", positive
    ),
    "min_lr": Field(0.0, "learning rate at the end of the cosine decay", non_negative),
    "b1": Field(0.9, "AdamW beta1", between(0, 1, high_open=True)),
    "b2": Field(0.95, "AdamW beta2", between(0, 1, high_open=True)),
    "weight_decay": Field(
        0.05, "AdamW weight decay (not on biases, norms, position embeddings, tokens)", non_negative
    ),
    "grad_clip": Field(-1.0, "> 0: clip gradients to this global norm; <= 0: no clipping", finite),
    "dtype": Field("bfloat16", "dtype of the student's matmuls (its parameters stay float32)", DTYPES),
    "attention": Field(
        "auto",
        "attention kernel: auto (cuDNN where it applies) | xla | cudnn",
        one_of("auto", "xla", "cudnn"),
    ),
    "remat": Field(False, "recompute the student's blocks in the backward pass (saves memory)", boolean),
    "nonfinite": Field(
        "stop",
        "after a non-finite loss (its update is never applied): stop | skip (go on)",
        one_of("stop", "skip"),
    ),
    # Scale (parallel.py): mesh axes (data, fsdp).
    "mesh": {
        "data": Field(
            -1,
            "data-parallel size of the device mesh; -1: the remaining devices",
            integer(at_least(1, or_=(-1,))),
        ),
        "fsdp": Field(
            1,
            "fsdp size (parameters sharded over it); -1: the remaining devices",
            integer(at_least(1, or_=(-1,))),
        ),
    },
    "fsdp_min_size": Field(
        2**18, "parameters smaller than this stay replicated under fsdp", integer(non_negative)
    ),
    "distributed": {
        "coordinator_address": Field(
            "",
            "host:port of process 0 for an explicit multi-process start; '': none (or detected, see auto)",
            text,
        ),
        "num_processes": Field(
            -1, "processes of an explicit multi-process start", integer(at_least(1, or_=(-1,)))
        ),
        "process_id": Field(
            -1, "this process's index in an explicit multi-process start", integer(at_least(0, or_=(-1,)))
        ),
        "auto": Field(True, "detect a Cloud TPU VM, SLURM or Open MPI multi-process launch", boolean),
    },
    # Input: see DATA_SCHEMA.
    # Checkpoints, logs, evaluation.
    "checkpoint_every": Field(1000, "steps between checkpoints", integer(positive)),
    "keep_checkpoints": Field(3, "newest checkpoints kept", integer(at_least(1))),
    "async_checkpoints": Field(
        True,
        "write periodic checkpoints in the background while training goes on (one at a time; the last "
        "and a preemption's are waited for); False: every save blocks until it is on disk",
        boolean,
    ),
    "resume_allow_changes": Field(
        False,
        "resume even if the teachers or a training field (model, objective, data, schedule) differ from "
        "the checkpoint's record",
        boolean,
    ),
    "log_every": Field(50, "steps between console / TensorBoard logs", integer(positive)),
    "eval_every": Field(
        5000, "steps between evaluations; <= 0: only before and after training", integer(finite)
    ),
    "evaluate": Field(True, "False: no k-NN / probe / alignment at all, not even at the end", boolean),
    "knn_k": Field(20, "neighbours of the k-NN classifier", integer(at_least(1))),
    "knn_temperature": Field(0.07, "temperature of the k-NN vote weights", positive),
    "linear_probe_epochs": Field(
        150,
        "epochs of the softmax probe (minibatch AdamW, lr 1e-2, cosine) on the k-NN bank; 0: no probe. "
        "150 x batch 256 matches a 300-step full-batch probe within 0.5 points on the demo",
        integer(non_negative),
    ),
    "linear_probe_batch_size": Field(
        256, "bank rows per linear-probe step, all devices together (at most the bank)", integer(positive)
    ),
    "eval_batch_size": Field(
        256, "images per evaluation batch, rounded up to a multiple of the device count", integer(positive)
    ),
    "pca_pictures": Field(
        8,
        "evaluation images shown as PCA feature maps at each evaluation (workdir/pictures/, TensorBoard "
        "images); 0: none. CKA is measured on the first evaluation batch either way",
        integer(non_negative),
    ),
    "log_example_ids": Field(
        False, "write every step's example ids to workdir/example_ids.p<process>.jsonl", boolean
    ),
    "export_at_end": Field(True, "write the student as a timm state dict (safetensors) at the end", boolean),
    "profile_steps": Field(
        (), "(first, last): a JAX profiler trace of those steps in workdir/profile", step_range
    ),
    "compilation_cache_dir": Field(
        "",
        "persistent JAX compilation cache (a later run of the same programs skips compiling); '': off",
        text,
    ),
}

DATA_SCHEMA = {
    "source": Field(
        "demo", "dataset kind: demo (generated) | tfds | folder", one_of("demo", "tfds", "folder")
    ),
    # tfds (array_record format; e.g. imagenet2012, see TfdsSource for the build command)
    "tfds_name": Field("imagenet2012", "tfds dataset name", nonempty_text),
    "tfds_data_dir": Field("", "tfds data directory; '': $TFDS_DATA_DIR or ~/tensorflow_datasets", text),
    "train_split": Field("train", "tfds split distilled on", nonempty_text),
    "knn_train_split": Field("train", "tfds split of the k-NN / probe memory bank", nonempty_text),
    "knn_eval_split": Field("validation", "tfds split of the k-NN / probe queries", nonempty_text),
    "image_key": Field("image", "tfds feature holding the image", nonempty_text),
    "label_key": Field("label", "tfds feature holding the class label", nonempty_text),
    # image folders: <dir>/<class>/<image>.{jpg,jpeg,png}
    "folder_train": Field("", "folder of class subfolders distilled on (source=folder)", text),
    "folder_knn_train": Field("", "folder of the k-NN / probe memory bank; '': folder_train", text),
    "folder_eval": Field("", "folder of the k-NN / probe queries (source=folder)", text),
    # generated demo dataset, written on first use under demo_root/<a name made of its parameters>
    "demo_root": Field("~/.cache/dmt_jax/demo", "where the generated demo dataset is cached", nonempty_text),
    "demo_num_classes": Field(10, "classes of the demo dataset", integer(at_least(1))),
    "demo_per_class_train": Field(64, "demo training images per class", integer(at_least(1))),
    "demo_per_class_val": Field(16, "demo validation images per class", integer(at_least(1))),
    "demo_img_size": Field(64, "side of the demo images in pixels", integer(at_least(8))),
    # pipelines
    "threads": Field(
        0, "tf.data private thread pool size; 0: the cores this process may run on", integer(non_negative)
    ),
    "num_parallel": Field(
        -1, "parallel decodes; -1: tf.data.AUTOTUNE (bounded by threads)", integer(at_least(1, or_=(-1,)))
    ),
    "prefetch": Field(2, "batches prefetched", integer(non_negative)),
    "max_image_pixels": Field(
        89_478_485,
        "images whose header claims more pixels are skipped as unreadable, never decoded; 0: no limit",
        integer(non_negative),
    ),
    "max_unreadable_in_a_row": Field(
        1000,
        "training stops (exit 2) when about this many images in a row cannot be read; 0: never",
        integer(non_negative),
    ),
    "crop_scale": Field(
        (0.2, 1.0), "random-resized-crop area range (fractions of the image)", range_pair(0, 1)
    ),
    "crop_ratio": Field(
        (3 / 4, 4 / 3), "random-resized-crop aspect-ratio range (sampled log-uniform)", range_pair(0, None)
    ),
    "interpolation": Field(
        "bilinear",
        "resizing of training crops and evaluation images, antialiased as PIL's: bilinear | bicubic",
        one_of("bilinear", "bicubic"),
    ),
    "eval_crop_fraction": Field(
        0.875,
        "center crop of evaluation images (resize to img_size / it, then crop)",
        lambda v: "" if _finite(v) and 0 < v <= 1 else "must be in (0, 1]",
    ),
    # fine-tuning only (dmt_jax/data/randaugment.py); distillation's one view is crop + flip
    "randaugment": Field(
        "", "timm RandAugment string (MAE fine-tuning: 'rand-m9-mstd0.5-inc1'); '': off", randaugment_spec
    ),
    "random_erasing": Field(
        0.0, "probability of erasing one random box per image (MAE: 0.25)", between(0, 1)
    ),
}
BASE_SCHEMA["data"] = DATA_SCHEMA


def base_config() -> mc.ConfigDict:
    return to_config(BASE_SCHEMA)


def data_config() -> mc.ConfigDict:
    """Every data field (read by dmt_jax/data/config.py). The shuffle seed is the run's `seed`."""
    return to_config(DATA_SCHEMA)


TEACHER_BLOCK = BASE_SCHEMA["agglomerative"]["per_teacher"].entries


def teacher_options(**overrides) -> dict:
    """A recipe's block for one teacher of agglomerative.per_teacher: every field (so each can be set
    with --config.agglomerative.per_teacher.NAME.FIELD=...), the schema's defaults unless overridden."""
    if unknown := sorted(set(overrides) - set(TEACHER_BLOCK)):
        raise ValueError(f"unknown per-teacher fields {unknown}; fields: {', '.join(TEACHER_BLOCK)}")
    return {name: overrides.get(name, spec.default) for name, spec in TEACHER_BLOCK.items()}


def split_teacher_name(entry: str) -> tuple[str | None, str]:
    """'clip=teachers/clip_l14' -> ('clip', 'teachers/clip_l14'); an entry without a name -> (None, entry)."""
    m = re.fullmatch(r"([A-Za-z][A-Za-z0-9_]*)=(.+)", entry)
    return (m.group(1), m.group(2)) if m else (None, entry)


def agglomerative_problems(c: mc.ConfigDict, entries: list[str]) -> list[str]:
    """Problems of the agglomerative fields against the rest (every field alone passed its check)."""
    problems = []
    names = [split_teacher_name(e)[0] for e in entries]
    if c.objective != "agglomerative":
        if c.stages:
            problems.append("--config.stages needs --config.objective=agglomerative (DMT: one grid)")
        if c.agglomerative.per_teacher:
            problems.append(
                "--config.agglomerative.per_teacher is read only with --config.objective=agglomerative"
            )
        return problems
    if unnamed := [e for e, n in zip(entries, names, strict=True) if n is None]:
        problems.append(
            f"--config.teachers: name every teacher of an agglomerative run, NAME=ENTRY (e.g. "
            f"'clip=teachers/clip_l14'): {', '.join(map(repr, unnamed))} has no name"
        )
    named = [n for n in names if n]
    if dup := sorted({n for n in named if named.count(n) > 1}):
        problems.append(f"--config.teachers: teacher names must be unique, {', '.join(dup)} repeated")
    if stray := sorted(set(c.agglomerative.per_teacher) - set(named)):
        problems.append(
            f"--config.agglomerative.per_teacher names {', '.join(stray)}, which no teacher entry has "
            f"(teachers: {', '.join(named) or 'none named'})"
        )
    if c.teacher_weights:
        problems.append(
            "--config.teacher_weights is DMT's: an agglomerative run weighs each teacher with "
            "agglomerative.per_teacher.NAME.summary_weight and dense_weight"
        )
    if c.mask_ratio > 0 and c.agglomerative.resample != "teacher_to_student":
        problems.append(
            f"--config.mask_ratio={c.mask_ratio} masks the student's patches: its dense features exist only "
            "at the visible ones, so set --config.agglomerative.resample=teacher_to_student (or mask_ratio=0)"
        )
    return problems


def consistency_problems(c: mc.ConfigDict) -> list[str]:
    """Problems between fields of a distillation config (each field alone passed its own check)."""
    problems = []
    entries = [e for e in c.teachers if e]
    if not entries:
        problems.append("--config.teachers names no teacher: give converted teacher directories")
    problems += agglomerative_problems(c, entries)
    if duplicates := [] if c.allow_duplicate_teachers else duplicate_teachers(entries):
        problems.append(
            f"--config.teachers names one teacher twice ({'; '.join(duplicates)}): it would silently weigh "
            "double; give each once (teacher_weights sets weights), or pass "
            "--config.allow_duplicate_teachers=True"
        )
    if c.teacher_weights and len(c.teacher_weights) != len(entries):
        problems.append(
            f"--config.teacher_weights has {len(c.teacher_weights)} entries for "
            f"{len(entries)} teachers: give one per teacher, or () for equal weights"
        )
    return problems + shared_consistency_problems(c, "student.variant", c.evaluate, stages=c.stages)


def shared_consistency_problems(
    c: mc.ConfigDict, variant_field: str, needs_eval: bool, stages=()
) -> list[str]:
    """The checks between fields both entry points have: image size (and resolution `stages`) and patch,
    min_lr and the peak, the distributed fields, the profile window, the folders a folder dataset needs."""
    from dmt_jax.models.vit import parse_variant

    problems = []
    variant = _get(c, variant_field)
    if not vit_variant(variant):
        patch = parse_variant(variant)["patch_size"]
        if c.img_size % patch:
            problems.append(
                f"--config.img_size={c.img_size} is not a multiple of the {variant_field.split('.')[0]}'s "
                f"patch size {patch} ({variant})"
            )
        if bad := [px for _, px in stages if px % patch]:
            problems.append(
                f"--config.stages: student sizes {bad} are not multiples of its patch size {patch} "
                f"({variant})"
            )
    if c.batch_size > 0 and c.base_lr > 0 and c.min_lr > c.base_lr * c.batch_size / 256:
        problems.append(f"--config.min_lr={c.min_lr} is above the peak lr base_lr * batch_size / 256")
    d = c.distributed
    if d.coordinator_address and (d.num_processes < 1 or not 0 <= d.process_id < d.num_processes):
        problems.append(
            f"--config.distributed.coordinator_address={d.coordinator_address!r} also needs "
            f"distributed.num_processes >= 1 and 0 <= distributed.process_id < num_processes "
            f"(got {d.num_processes} and {d.process_id})"
        )
    if len(c.profile_steps) == 2 and c.total_steps > 0 and c.profile_steps[1] > c.total_steps:
        problems.append(
            f"--config.profile_steps={tuple(c.profile_steps)} ends after total_steps={c.total_steps}"
        )
    if c.data.source == "folder":
        needed = ["folder_train"] + (["folder_eval"] if needs_eval else [])
        if missing := [f"data.{n}" for n in needed if not c.data[n]]:
            problems.append(
                f"--config.data.source='folder' needs {' and '.join(missing)}: folders of class folders"
            )
    return problems


def finetune_consistency_problems(c: mc.ConfigDict) -> list[str]:
    """Problems between fields of a fine-tuning config (it always evaluates on the validation split)."""
    return shared_consistency_problems(c, "model.variant", needs_eval=True)


def duplicate_teachers(entries) -> list[str]:
    """'ENTRY (entries i and j)' for each teacher named more than once: directories by their resolved
    path (~, links and .. resolved: storage.resolve), generated teachers by their entry."""
    from dmt_jax import storage
    from dmt_jax.errors import UserError

    seen, found = {}, []
    for i, named in enumerate(entries):
        entry = split_teacher_name(named)[1]  # two names for one teacher are one teacher twice
        try:
            key = entry if entry.startswith(("random:", "demo:")) else storage.resolve(entry)
        except UserError:  # an unusable path: check_teacher_dir names it
            continue
        if key in seen:
            found.append(f"{named!r} (entries {seen[key]} and {i})")
        seen.setdefault(key, i)
    return found


# ---------------------------------------------------------------- fine-tuning (dmt_jax/finetune/)


def _default(name: str, value, schema: Mapping = BASE_SCHEMA) -> Field:
    """A distillation field with another default: the fields both loops share keep one meaning and check."""
    return dataclasses.replace(schema[name], default=value)


def _reworded(name: str, meaning: str) -> Field:
    """A data field with the fine-tuning's own meaning in --help (same default and check)."""
    return dataclasses.replace(DATA_SCHEMA[name], help=meaning)


# What the data fields mean to a fine-tuning (it trains on the training split and measures top-1/top-5 on
# the validation split; the k-NN memory-bank fields are not read).
FINETUNE_DATA_HELP = {
    "train_split": "tfds split fine-tuned on",
    "knn_train_split": "not read by fine-tuning (the distillation's k-NN memory bank)",
    "knn_eval_split": "tfds validation split (top-1/top-5, center crop)",
    "folder_train": "folder of class subfolders fine-tuned on (source=folder)",
    "folder_knn_train": "not read by fine-tuning (the distillation's k-NN memory bank)",
    "folder_eval": "folder of class subfolders of the validation split (source=folder)",
}


# Defaults: MAE's ViT-B/16 fine-tuning recipe (He et al. 2022, Table 9 / main_finetune.py); the
# configs/finetune_*.py recipes name their sources.
FINETUNE_SCHEMA = {
    "seed": BASE_SCHEMA["seed"],
    "img_size": BASE_SCHEMA["img_size"],
    "init": Field(
        "",
        "weights to start from: a distillation workdir (its newest checkpoint's student), a "
        "student_timm.safetensors, or a converted teacher directory; '': random init",
        text,
    ),
    "model": {
        "variant": Field("B/16", "ViT NAME/PATCH; must match the init's shape when init is set", vit_variant),
        "pos_embed": BASE_SCHEMA["student"]["pos_embed"],
        "num_reg_tokens": BASE_SCHEMA["student"]["num_reg_tokens"],
        "layerscale_init": BASE_SCHEMA["student"]["layerscale_init"],
        "drop_path": Field(0.1, "stochastic depth rate (MAE ViT-B: 0.1)", between(0, 1, high_open=True)),
        "global_pool": Field(
            "avg",
            "classifier input: avg (mean of patch tokens, then fc_norm; MAE) | token (CLS)",
            one_of("avg", "token"),
        ),
        "head_init_std": Field(2e-5, "std of the classifier's initial weights (MAE: 2e-5)", positive),
        "residual_dtype": Field(
            "float32",
            "dtype of the residual stream (and position embeddings); '': the matmuls' `dtype`. float32, "
            "as MAE's autocast keeps it, fine-tuned the demo as well as bfloat16 (bench/RESULTS.md)",
            one_of("", "float32", "bfloat16"),
        ),
    },
    "num_classes": Field(
        -1, "classes of the classifier; -1: those of the training set", integer(at_least(1, or_=(-1,)))
    ),
    "batch_size": _default("batch_size", 1024),
    "epochs": _default("epochs", 100.0),
    "total_steps": BASE_SCHEMA["total_steps"],
    "warmup_epochs": _default("warmup_epochs", 5.0),
    "warmup_steps": BASE_SCHEMA["warmup_steps"],
    "base_lr": _default("base_lr", 5e-4),
    "min_lr": _default("min_lr", 1e-6),
    "layer_decay": Field(
        0.65, "layer-wise lr decay: block i of depth d trains at lr * decay^(d + 1 - (i + 1))", between(0, 1)
    ),
    "b1": BASE_SCHEMA["b1"],
    "b2": _default("b2", 0.999),
    "weight_decay": BASE_SCHEMA["weight_decay"],
    "grad_clip": BASE_SCHEMA["grad_clip"],
    "label_smoothing": Field(0.1, "label smoothing of the targets", between(0, 1, high_open=True)),
    "mixup_alpha": Field(0.8, "Mixup beta(alpha, alpha); 0: off", non_negative),
    "cutmix_alpha": Field(1.0, "CutMix beta(alpha, alpha); 0: off", non_negative),
    "mixup_prob": Field(1.0, "probability that a batch is mixed at all", between(0, 1)),
    "mixup_switch_prob": Field(
        0.5, "probability of CutMix rather than Mixup when both are on", between(0, 1)
    ),
    "ema_decay": Field(
        0.0, "> 0: also keep and evaluate an EMA of the weights (e.g. 0.9999)", between(0, 1, high_open=True)
    ),
    "dtype": BASE_SCHEMA["dtype"],
    "attention": BASE_SCHEMA["attention"],
    "remat": BASE_SCHEMA["remat"],
    "nonfinite": BASE_SCHEMA["nonfinite"],
    "mesh": BASE_SCHEMA["mesh"],
    "fsdp_min_size": BASE_SCHEMA["fsdp_min_size"],
    "distributed": BASE_SCHEMA["distributed"],
    # Input: the distillation's data fields; train_split / folder_train is trained on, knn_eval_split /
    # folder_eval is the validation split (center crop).
    "data": {
        **DATA_SCHEMA,
        **{name: _reworded(name, meaning) for name, meaning in FINETUNE_DATA_HELP.items()},
        "crop_scale": _default("crop_scale", (0.08, 1.0), DATA_SCHEMA),
        "randaugment": _default("randaugment", "rand-m9-mstd0.5-inc1", DATA_SCHEMA),
        "random_erasing": _default("random_erasing", 0.25, DATA_SCHEMA),
        "interpolation": _default("interpolation", "bicubic", DATA_SCHEMA),
    },
    "checkpoint_every": BASE_SCHEMA["checkpoint_every"],
    "keep_checkpoints": BASE_SCHEMA["keep_checkpoints"],
    "async_checkpoints": BASE_SCHEMA["async_checkpoints"],
    "resume_allow_changes": Field(
        False,
        "resume even if the init or a training field (model, recipe, data, schedule) differ from the "
        "checkpoint's record",
        boolean,
    ),
    "log_every": BASE_SCHEMA["log_every"],
    "eval_every": Field(
        5000, "steps between top-1/top-5 evaluations; <= 0: only at the end", integer(finite)
    ),
    "eval_batch_size": BASE_SCHEMA["eval_batch_size"],
    "export_at_end": Field(
        True, "write the classifier as a timm state dict (safetensors) at the end", boolean
    ),
    "profile_steps": BASE_SCHEMA["profile_steps"],
}


def finetune_base_config() -> mc.ConfigDict:
    return to_config(FINETUNE_SCHEMA)


def finetune_imagenet_recipe(
    variant: str, *, base_lr: float, layer_decay: float, epochs: float, drop_path: float
) -> mc.ConfigDict:
    """Fine-tuning on ImageNet-1K from tfds at 224 px, batch 1024: the finetune_vit_*.py recipes."""
    c = finetune_base_config()
    c.model.variant = variant
    c.model.drop_path = drop_path
    c.base_lr, c.layer_decay, c.epochs = base_lr, layer_decay, float(epochs)
    c.data.source = "tfds"
    c.data.tfds_name = "imagenet2012"
    c.data.train_split = "train"
    c.data.knn_eval_split = "validation"
    return c


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


# Other trainers' names for a word of ours (PyTorch's optimizers say learning_rate / lr).
_WORD_SYNONYMS = {"learning_rate": "lr", "learningrate": "lr"}


def nearest_names(name: str, options) -> list[str]:
    """The valid names a mistyped `name` most likely meant, at most three, in schema order: a near spelling
    ('batchsize' -> batch_size, 'teacher' -> teachers), else those holding every word of it ('lr' ->
    base_lr, min_lr; 'warmup' -> warmup_epochs, warmup_steps), else a looser spelling, else those
    containing it ('root' -> demo_root)."""
    options = list(options)
    name = _WORD_SYNONYMS.get(name.lower(), name)
    words = set(name.lower().split("_")) - {""}
    found = difflib.get_close_matches(name, options, n=1, cutoff=0.8)
    found = found or [o for o in options if words and words <= set(o.lower().split("_"))]
    found = found or difflib.get_close_matches(name, options, n=1)
    found = found or [o for o in options if len(name) >= 2 and name.lower() in o.lower()]
    return found[:3]


def _either(names: list[str]) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def unknown_field_message(config: mc.ConfigDict, dotted: str) -> str:
    """'config field X does not exist; did you mean Y?' for a dotted name; '' if X exists."""
    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, mc.ConfigDict) and part in node:
            node = node[part]
            continue
        options = list(node.keys()) if isinstance(node, mc.ConfigDict) else []
        near = nearest_names(part, options)
        if not near:
            return f"config field {dotted!r} does not exist"
        if len(near) > 1:  # several fit: name them all, each as a whole dotted name
            names = [".".join(parts[:i] + [n]) for n in near]
            return f"config field {dotted!r} does not exist; did you mean {_either(names)}?"
        guess = parts[:i] + near + parts[i + 1 :]
        if unknown_field_message(config, ".".join(guess)):  # the rest is wrong too: offer the part that fits
            guess = parts[:i] + near
        return f"config field {dotted!r} does not exist; did you mean {'.'.join(guess)!r}?"
    return ""


def keyed_fields(schema: Mapping) -> set[str]:
    """Dotted names of the keyed blocks of a schema (their entries are checked by field_problems)."""
    return {name for name, spec in schema_fields(schema) if spec.entries is not None}


def unknown_fields(config: mc.ConfigDict, schema: mc.ConfigDict, keyed=None) -> list[str]:
    """One unknown_field_message per field of config that schema lacks (a typo in a recipe file)."""
    keyed = keyed_fields(BASE_SCHEMA) if keyed is None else keyed

    def walk(node, schema_node, prefix):
        for key, value in node.items():
            if key not in schema_node:
                yield unknown_field_message(schema, prefix + key)
            elif prefix + key in keyed:
                continue  # names of the user's choosing, checked by field_problems
            elif isinstance(value, mc.ConfigDict) and isinstance(schema_node[key], mc.ConfigDict):
                yield from walk(value, schema_node[key], prefix + key + ".")

    return list(walk(config, schema, ""))
