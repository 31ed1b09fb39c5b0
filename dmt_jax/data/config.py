"""Factories that turn the data config fields (dmt_jax/config.py, `data_config`) into sources and
pipelines, so callers never see source kinds."""

from __future__ import annotations

from pathlib import Path

from etils import epath

from dmt_jax import storage
from dmt_jax.data.demo import CLASSES, make_demo_dataset
from dmt_jax.data.pipeline import EvalInput, TrainInput
from dmt_jax.data.sources import (
    DataError,
    FolderSource,
    Source,
    TfdsSource,
    check_tfds_dataset,
    shared_class_names,
)

SPLIT_ROLES = ("train", "knn_train", "knn_eval")


def demo_dataset_root(data_config) -> Path:
    c = data_config
    name = f"c{c.demo_num_classes}_t{c.demo_per_class_train}_v{c.demo_per_class_val}_s{c.demo_img_size}"
    return Path(storage.resolve(c.demo_root, "--config.data.demo_root")) / name


def make_source(data_config, split_role: str) -> Source:
    """The source for 'train' (distillation), 'knn_train' (k-NN memory bank) or 'knn_eval' (queries)."""
    if split_role not in SPLIT_ROLES:
        raise ValueError(f"split_role must be one of {SPLIT_ROLES}, got {split_role!r}")
    c = data_config
    if c.source == "tfds":
        split = {"train": c.train_split, "knn_train": c.knn_train_split, "knn_eval": c.knn_eval_split}
        return TfdsSource(c.tfds_name, split[split_role], c.tfds_data_dir or None, c.image_key, c.label_key)
    if c.source == "folder":
        folder = {
            "train": c.folder_train,
            "knn_train": c.folder_knn_train or c.folder_train,
            "knn_eval": c.folder_eval,
        }[split_role]
        if not folder:
            raise DataError(f"data.source='folder' needs a folder for {split_role}: set data.folder_*")
        return FolderSource(folder, shared_class_names([c.folder_train, c.folder_knn_train, c.folder_eval]))
    if c.source == "demo":
        root = make_demo_dataset(
            demo_dataset_root(c),
            num_classes=c.demo_num_classes,
            per_class_train=c.demo_per_class_train,
            per_class_val=c.demo_per_class_val,
            img_size=c.demo_img_size,
        )
        classes = shared_class_names([root / "train", root / "val"])
        return FolderSource(root / ("val" if split_role == "knn_eval" else "train"), classes)
    raise DataError(f"data.source must be 'demo', 'tfds' or 'folder', got {c.source!r}")


def make_train_input(
    data_config,
    source: Source,
    *,
    global_batch: int,
    img_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    step: int = 0,
    saved_state: dict | None = None,
) -> TrainInput:
    """The training stream for this process, resumed from `saved_state` (TrainInput.state() of the
    checkpoint) when it fits this process layout, else from `step`."""
    start, bad_so_far = TrainInput.resume_position(
        saved_state, step=step, global_batch=global_batch, process_count=process_count
    )
    c = data_config
    return TrainInput(
        source,
        global_batch=global_batch,
        img_size=img_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        start=start,
        bad_so_far=bad_so_far,
        num_parallel=c.num_parallel,
        threads=c.threads,
        prefetch=c.prefetch,
        crop_scale=tuple(c.crop_scale),
        crop_ratio=tuple(c.crop_ratio),
        interpolation=c.interpolation,
        randaugment=c.randaugment,
        random_erasing=c.random_erasing,
        max_pixels=c.max_image_pixels,
        max_unreadable=c.max_unreadable_in_a_row,
    )


def make_eval_input(
    data_config,
    source: Source,
    *,
    global_batch: int,
    img_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> EvalInput:
    """One k-NN / probe pass over `source` for this process (see EvalInput)."""
    c = data_config
    return EvalInput(
        source,
        global_batch=global_batch,
        img_size=img_size,
        process_index=process_index,
        process_count=process_count,
        crop_fraction=c.eval_crop_fraction,
        interpolation=c.interpolation,
        num_parallel=c.num_parallel,
        threads=c.threads,
        prefetch=c.prefetch,
        max_pixels=c.max_image_pixels,
    )


def dataset_problems(data_config, split_roles=SPLIT_ROLES) -> list[str]:
    """Cheap checks that the dataset of these roles exists, one line per problem (validate.py): image
    folders are folders of class folders (no image is listed), tfds splits are prepared for random
    access. A problem found only while reading (an unreadable image) is the pipeline's to report."""
    c = data_config
    if c.source == "demo":
        problems = []
        if c.demo_num_classes > len(CLASSES):
            problems.append(
                f"--config.data.demo_num_classes={c.demo_num_classes}: must be at most {len(CLASSES)}"
            )
        if (root := epath.Path(c.demo_root).expanduser()).exists() and not root.is_dir():
            problems.append(
                f"--config.data.demo_root={c.demo_root} is a file: choose a directory for the demo data"
            )
        return problems
    if c.source == "folder":
        folders = {"train": c.folder_train, "knn_train": c.folder_knn_train or c.folder_train}
        folders["knn_eval"] = c.folder_eval
        problems = []
        for folder in dict.fromkeys(folders[role] for role in split_roles if folders[role]):
            path, layout = epath.Path(folder).expanduser(), f"expected {folder}/<class_name>/<image>.jpg"
            if not path.is_dir():
                problems.append(f"image folder {folder} does not exist: {layout}")
            elif not any(p.is_dir() for p in path.iterdir()):
                problems.append(f"image folder {folder} has no class folders: {layout}")
        return problems
    if c.source == "tfds":
        try:
            splits = check_tfds_dataset(c.tfds_name, c.tfds_data_dir or None)
        except DataError as e:
            return [str(e)]
        names = {"train": c.train_split, "knn_train": c.knn_train_split, "knn_eval": c.knn_eval_split}
        field = {"train": "train_split", "knn_train": "knn_train_split", "knn_eval": "knn_eval_split"}
        return [
            f"--config.data.{field[role]}={names[role]!r}: tfds dataset {c.tfds_name} has the splits "
            f"{', '.join(sorted(splits))}"
            for role in split_roles
            if names[role].split("[")[0] not in splits
        ]
    return [f"--config.data.source={c.source!r}: must be 'demo', 'tfds' or 'folder'"]
