"""Random-access image sources: integer index -> (encoded image bytes, integer label).

Every source also offers `tf_lookup(index)`, the same read expressed for tf.data, so the input
pipelines stay inside TensorFlow's threads wherever the storage allows (image folders: pure graph
ops; tfds array_record: one small Python call for the raw record, the parsing in graph).
"""

from __future__ import annotations

import abc
import os
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Every module of dmt_jax.data imports this one first. The accelerators belong to JAX: keep TF (a full
# `tensorflow` build, as on non-x86 hosts, sees GPUs) from starting them and reserving their memory.
try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):  # TF already started its devices, or knows no such device type
    pass


class DataError(ValueError):
    """A dataset is missing or unusable; the message is one line saying how to fix it."""


class Source(abc.ABC):
    """Base class: subclasses define __len__, __getitem__ and, where they can, a graph-side read."""

    num_classes: int

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __getitem__(self, index: int) -> tuple[bytes, int]: ...

    def tf_lookup(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(encoded bytes: tf.string scalar, label: tf.int32 scalar) for an int64 scalar index."""

        def read(i):
            encoded, label = self[int(i)]
            return np.bytes_(encoded), np.int32(label)

        encoded, label = tf.numpy_function(read, [index], [tf.string, tf.int32], stateful=False)
        encoded.set_shape([])
        label.set_shape([])
        return encoded, label


class FolderSource(Source):
    """`root/<class>/<image>`: classes are the sorted subfolder names, files sorted within each."""

    def __init__(self, root: str | os.PathLike):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist: expected {root}/<class_name>/<image>.jpg")
        self.root = root
        self.class_names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        paths, labels = [], []
        for label, class_name in enumerate(self.class_names):
            files = sorted(_image_files(root / class_name))
            paths += files
            labels += [label] * len(files)
        if not paths:
            raise DataError(
                f"image folder {root} holds no JPEG/PNG files in class subfolders "
                f"(expected {root}/<class_name>/<image>.jpg)"
            )
        self.paths = paths
        self.labels = np.asarray(labels, np.int32)
        self.num_classes = len(self.class_names)
        # Eager tensors are captured by reference by tf.data functions, not copied into each graph.
        self._tf_paths = tf.constant(paths)
        self._tf_labels = tf.constant(self.labels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[bytes, int]:
        return Path(self.paths[index]).read_bytes(), int(self.labels[index])

    def tf_lookup(self, index):
        return tf.io.read_file(tf.gather(self._tf_paths, index)), tf.gather(self._tf_labels, index)


def _image_files(folder: Path) -> list[str]:
    found = []
    for dirpath, _, filenames in os.walk(folder):
        found += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


class TfdsSource(Source):
    """A split of a tfds image dataset prepared in array_record format (random access)."""

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None = None,
        image_key: str = "image",
        label_key: str = "label",
    ):
        data_dir = os.fspath(Path(data_dir).expanduser()) if data_dir else None
        _check_prepared_for_random_access(name, data_dir)
        self._decoders = {image_key: tfds.decode.SkipDecoding()}
        self.data_source = tfds.data_source(
            name, split=split, data_dir=data_dir, download=False, decoders=self._decoders
        )
        self.name, self.split = name, split
        self.image_key, self.label_key = image_key, label_key
        self.features = self.data_source.dataset_info.features
        self.num_classes = self.features[label_key].num_classes

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int) -> tuple[bytes, int]:
        example = self.data_source[index]
        return bytes(example[self.image_key]), int(example[self.label_key])

    def tf_lookup(self, index):
        # Only the raw record read is Python; the tf.Example parsing runs in tf.data's threads.
        raw_records = self.data_source.data_source

        def read_raw(i):
            return np.bytes_(raw_records[int(i)])

        record = tf.numpy_function(read_raw, [index], tf.string, stateful=False)
        record.set_shape([])
        example = self.features.deserialize_example(record, decoders=self._decoders)
        return example[self.image_key], tf.cast(example[self.label_key], tf.int32)


def _check_prepared_for_random_access(name: str, data_dir: str | None) -> None:
    """Raise one line with the command that provides the dataset, when it is not readable by index."""
    builder = tfds.builder(name, data_dir=data_dir)
    where = data_dir or tfds.core.constants.get_default_data_dir()
    manual = ""
    if name.split("/")[0].split(":")[0] == "imagenet2012":
        manual = " --manual_dir=DIR, after placing ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in DIR"
    elif builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        manual = f" --manual_dir=DIR, after placing in DIR the files that `tfds build {name}` asks for"
    if not builder.is_prepared():
        raise DataError(
            f"tfds dataset {name} is not prepared in {where}; run: "
            f"tfds build {name} --file_format=array_record --data_dir={where}{manual}"
        )
    formats = {f.value for f in builder.info.available_file_formats()}
    if "array_record" not in formats:
        raise DataError(
            f"tfds dataset {name} in {where} is prepared as {'/'.join(sorted(formats))} only, which has no "
            f"random access; convert it with: tfds convert_format --dataset_version_dir={builder.data_dir} "
            f"--out_file_format=array_record"
        )
