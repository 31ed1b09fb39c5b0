"""Student -> timm: a Flax ViT's params as a timm VisionTransformer state dict, saved as safetensors.

The name table in dmt_jax/formats/names_vit.py is read Flax -> timm (Linear kernels transposed back, conv
HWIO -> OIHW, LayerNorm scale -> weight). The file loads with

    model = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)  # any vit_* name
    model.load_state_dict(safetensors.torch.load_file(path), strict=True)

where `kwargs` is what `export_timm` returns (also stored in the file's metadata as "timm_kwargs").
The metadata also holds "pretrained_cfg": timm's description of the expected input (input_size, mean,
std, interpolation, crop_pct, num_classes, ...), which `timm.data.resolve_data_config` and
`create_transform` turn into the matching preprocessing. Detection and segmentation frameworks that
build timm ViTs take the same file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import numpy as np

from dmt_jax import formats, parallel, storage
from dmt_jax.teachers import IMAGENET_MEAN, IMAGENET_STD, flatten_params

BACKBONE_NAME, HEADS_NAME = "student_timm.safetensors", "student_heads.safetensors"  # in a run's workdir


def timm_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """A ViT's 'params' tree (nested or flat) -> timm-named float32 arrays; FormatError on anything else."""
    flat = flatten_params(params) if any(isinstance(v, Mapping) for v in params.values()) else dict(params)
    state = {
        k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in formats.flax_to_timm(flat).items()
    }
    formats.check_backbone(state, formats.infer_architecture(state))
    return state


def timm_model_kwargs(state_dict: Mapping[str, np.ndarray], num_heads: int | None = None) -> dict:
    """Arguments for timm's VisionTransformer that give exactly these parameter names and shapes."""
    arch = formats.infer_architecture(state_dict)
    return dict(
        img_size=arch.grid * arch.patch_size,
        patch_size=arch.patch_size,
        embed_dim=arch.width,
        depth=arch.depth,
        num_heads=num_heads or arch.num_heads,
        mlp_ratio=arch.mlp_dim / arch.width,
        reg_tokens=arch.num_reg_tokens,
        no_embed_class=arch.no_embed_class,
        init_values=1.0 if arch.layerscale else None,  # any value: it only makes ls1/ls2 exist
        class_token=True,
        global_pool="token",
        num_classes=0,
    )


def timm_pretrained_cfg(
    img_size: int,
    *,
    num_classes: int = 0,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
    **extra,
) -> dict:
    """timm's pretrained_cfg for a ViT fed `img_size` px: what a timm user needs to preprocess its input.

    Defaults are what dmt_jax evaluates with: ImageNet mean/std on [0, 1] pixels, resize to
    img_size / crop_pct with antialiased bilinear interpolation, center crop. `extra` adds or
    overrides fields (e.g. label_names for a classifier).
    """
    return dict(
        input_size=[3, img_size, img_size],
        fixed_input_size=True,
        interpolation=interpolation,
        crop_pct=crop_pct,
        crop_mode="center",
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        num_classes=num_classes,
        first_conv="patch_embed.proj",
        classifier="head",
        **extra,
    )


def export_timm(
    params: Mapping,
    path: str | os.PathLike,
    *,
    num_heads: int | None = None,
    overwrite: bool = False,
    pretrained_cfg: Mapping | None = None,
    metadata: Mapping[str, str] | None = None,
) -> dict:
    """Writes the timm state dict of a student ViT to `path` (.safetensors), atomically; returns the
    timm kwargs. `num_heads`: only for a width whose head count is not the standard one.
    `pretrained_cfg`: stored in the metadata; default `timm_pretrained_cfg(the model's img_size)`.
    `metadata`: more string entries for the file's metadata (e.g. what the prefix tokens are)."""
    if storage.path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    state = timm_state_dict(params)
    kwargs = timm_model_kwargs(state, num_heads)
    if pretrained_cfg is None:
        pretrained_cfg = timm_pretrained_cfg(kwargs["img_size"], num_classes=kwargs["num_classes"])
    save_timm_file(state, path, kwargs, pretrained_cfg, metadata)
    return kwargs


def save_timm_file(
    state: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    kwargs: Mapping,
    pretrained_cfg,
    extra: Mapping[str, str] | None = None,
):
    """Writes a timm state dict with its kwargs and pretrained_cfg in the metadata, atomically."""
    metadata = dict(format="pt", timm_kwargs=json.dumps(kwargs), pretrained_cfg=json.dumps(pretrained_cfg))
    save_safetensors(state, path, {**metadata, **(extra or {})})


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str]):
    """Writes numpy tensors and string metadata as one safetensors file: whole or not at all, never through
    a link; a failed write (a full disk) is an OSError naming `path` (storage.atomic_local)."""
    from safetensors.numpy import save, save_file

    state, metadata = dict(tensors), dict(metadata)
    if storage.is_remote(path):  # a bucket object appears whole or not at all: already atomic
        with storage.named_write_errors(path):
            storage.path(path).write_bytes(save(state, metadata=metadata))
        return
    with storage.atomic_local(path) as tmp:
        save_file(state, tmp, metadata=metadata)


def export_run(setup, state, workdir: str) -> None:
    """The end of a distillation (every process calls it): the student for timm, and for an agglomerative
    run its heads beside it (export_agglomerative), written by process 0 into the workdir."""
    config = setup.config
    # Every process gathers (shards may span hosts); process 0 writes.
    params = parallel.to_host(state.params if setup.targets else state.params["encoder"])
    stats = parallel.to_host(state.stats) if setup.targets else None
    if jax.process_index() != 0:
        return
    heads = setup.student.encoder.num_heads
    crop = config.data.eval_crop_fraction
    if not setup.targets:
        path = os.path.join(workdir, BACKBONE_NAME)
        cfg = timm_pretrained_cfg(config.img_size, crop_pct=crop)
        export_timm(params, path, num_heads=heads, overwrite=True, pretrained_cfg=cfg)
        print(f"student exported for timm/PyTorch: {path}", flush=True)
        return
    final_px = config.stages[-1][1] if config.stages else config.img_size
    paths = export_agglomerative(
        params, stats, setup.targets, workdir, table_img_size=config.img_size, img_size=final_px,
        num_heads=heads, norm_eps=config.target_norm_eps, crop_pct=crop,
    )  # fmt: skip
    print(f"student exported for timm/PyTorch: {paths[0]}, its heads: {paths[1]}", flush=True)


# ---------------------------------------------------------------- the agglomerative student's heads

HEADS_FORMAT = "dmt_jax.heads/1"
# The Linear each head kind ends with (objective/heads.py): where normalization statistics fold in.
LAST_LINEAR = {"linear": "out", "ln_linear": "out", "mlp": "out", "mlp_v1": "fc2", "mlp_v2": "final_2"}


def prefix_tokens(targets, num_prefix: int) -> list[str]:
    """What each of the student's prefix tokens is (timm: CLS, then reg_token rows): 'summary:NAME' for
    the teachers with a summary, in name order (objective/agglomerative.py's slots), then 'register'."""
    from dmt_jax.objective import agglomerative as agg

    names = [f"summary:{n}" for n in agg.summary_teachers(targets)] or ["cls"]  # a CLS no head reads
    return names + ["register"] * (num_prefix - len(names))


def export_agglomerative(
    params: Mapping,
    stats: Mapping,
    targets,
    directory: str,
    *,
    table_img_size: int,
    img_size: int,
    num_heads: int,
    norm_eps: float,
    crop_pct: float = 0.875,
) -> tuple[str, str]:
    """An agglomerative student -> (backbone, heads) files in `directory`; returns their paths.

    The backbone (student_timm.safetensors) loads in timm as a DMT student does; its summary tokens
    beyond the CLS token are timm register tokens, and the metadata's "prefix_tokens" says which teacher
    each prefix token serves. Its position table is the one of the last resolution stage (`img_size`):
    the stored table (at `table_img_size`'s grid) resized as training resized it, so timm at `img_size`
    computes what the student computed in that stage.

    The heads (student_heads.safetensors, HEADS_FORMAT) are every teacher's summary and dense adaptors
    under PyTorch names ('clip.summary.fc1.weight'); the metadata's "heads" describes each (kind, widths,
    token, teacher grid, LayerNorm eps). A teacher's standardize / PHI-S statistics are folded into the
    head's last Linear, so it predicts the teacher's own features ("target": "teacher"); with DMT's
    per-token LayerNorm it predicts normalized features ("target": "layernorm"), which no Linear can
    undo. dmt_jax/export_heads_torch.py builds them in PyTorch."""
    from dmt_jax import train

    encoder = jax.tree.map(np.asarray, dict(params["encoder"]))
    patch = int(encoder["patch_embed"]["proj"]["kernel"].shape[0])
    if img_size != table_img_size:
        resized = train.with_position_table({"encoder": encoder}, table_img_size // patch, img_size // patch)
        encoder = jax.tree.map(np.asarray, resized["encoder"])
    num_prefix = 1 + (encoder["reg_token"].shape[1] if "reg_token" in encoder else 0)
    tokens = prefix_tokens(targets, num_prefix)
    backbone = os.path.join(directory, BACKBONE_NAME)
    cfg = timm_pretrained_cfg(img_size, crop_pct=crop_pct)
    export_timm(encoder, backbone, num_heads=num_heads, overwrite=True, pretrained_cfg=cfg,
                metadata={"prefix_tokens": json.dumps(tokens)})  # fmt: skip

    width = int(encoder["patch_embed"]["proj"]["kernel"].shape[-1])
    flat = flatten_params(params["heads"])
    tensors, description = {}, {}
    for t in targets:
        one = {}
        for kind, dim in (("summary", t.summary_dim), ("dense", t.dense_dim)):
            one[kind] = None
            if dim:
                module = f"{t.name}_{kind}"
                weights = {k.removeprefix(module + "/"): np.asarray(v, np.float32)
                           for k, v in flat.items() if k.startswith(module + "/")}  # fmt: skip
                head_tensors, one[kind] = head_export(t, kind, weights, stats.get(t.name, {}), norm_eps)
                one[kind] |= dict(in_dim=width, out_dim=int(dim))
                if kind == "summary":
                    one[kind]["token"] = tokens.index(f"summary:{t.name}")
                else:
                    one[kind]["teacher_grid"] = list(t.grid)
                tensors.update({f"{t.name}.{kind}.{name}": v for name, v in head_tensors.items()})
        description[t.name] = one
    student = dict(width=width, patch_size=patch, img_size=img_size, num_prefix_tokens=num_prefix,
                   prefix_tokens=tokens, layernorm_target_eps=norm_eps)  # fmt: skip
    heads_path = os.path.join(directory, HEADS_NAME)
    metadata = dict(format="pt", heads_format=HEADS_FORMAT, heads=json.dumps(description))
    save_safetensors(tensors, heads_path, {**metadata, "student": json.dumps(student)})
    return backbone, heads_path


def head_export(target, kind: str, weights: dict, stats: Mapping, norm_eps: float) -> tuple[dict, dict]:
    """One head's Flax weights (paths within the head) -> (PyTorch-named tensors, its description),
    the teacher's normalization statistics folded into its last Linear where they can be."""
    from dmt_jax.objective import heads as heads_lib
    from dmt_jax.objective import normalize

    head_kind = target.summary_head if kind == "summary" else target.dense_head
    norm = target.summary_norm if kind == "summary" else target.norm
    foldable = norm != "layernorm"  # a per-token LayerNorm is no affine map: it cannot fold
    if foldable:
        last = LAST_LINEAR[head_kind]
        kernel, bias = normalize.fold_into_linear(
            norm, stats.get(kind, {}), weights[f"{last}/kernel"], weights[f"{last}/bias"], norm_eps
        )
        weights = {**weights, f"{last}/kernel": np.asarray(kernel), f"{last}/bias": np.asarray(bias)}
    tensors = {
        heads_lib.torch_name(f"head/{path}"): np.ascontiguousarray(
            value.T if path.endswith("/kernel") else value
        )
        for path, value in weights.items()
    }
    hidden = weights["fc1/kernel"].shape[1] if "fc1/kernel" in weights else None
    description = dict(
        kind=head_kind,
        hidden_dim=None if hidden is None else int(hidden),
        num_inner=sum(1 for p in weights if p.endswith("/kernel") and p.startswith(("inner_", "blocks_"))),
        ln_eps=heads_lib.TORCH_LN_EPS if head_kind in ("mlp_v1", "mlp_v2") else heads_lib.DMT_LN_EPS,
        norm=norm,
        target="teacher" if foldable else "layernorm",
    )
    return tensors, description
