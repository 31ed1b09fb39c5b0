"""Host-side input: sources (tfds, image folder, generated demo), the training and eval pipelines.

The only package that imports TensorFlow; the jitted step receives uint8 pixels only.

    source = make_source(config.data, "train")
    train = make_train_input(config.data, source, global_batch=..., img_size=..., seed=...,
                             process_index=..., process_count=..., step=step, saved_state=saved)
    batch = next(train)        # {'image': uint8 [B_local, H, W, 3], 'label': int32, 'id': int64}
    train.state()              # save with the checkpoint; pass back as saved_state
"""

from dmt_jax.data.config import (
    SPLIT_ROLES,
    dataset_problems,
    demo_dataset_root,
    make_eval_input,
    make_source,
    make_train_input,
)
from dmt_jax.data.demo import make_demo_dataset
from dmt_jax.data.guard import StopRequested, UnreadableInput
from dmt_jax.data.pipeline import AUTOTUNE, EvalInput, TrainInput
from dmt_jax.data.sources import DataError, FolderSource, Source, TfdsSource

__all__ = [
    "AUTOTUNE",
    "SPLIT_ROLES",
    "DataError",
    "EvalInput",
    "FolderSource",
    "Source",
    "StopRequested",
    "TfdsSource",
    "TrainInput",
    "UnreadableInput",
    "dataset_problems",
    "demo_dataset_root",
    "make_demo_dataset",
    "make_eval_input",
    "make_source",
    "make_train_input",
]
