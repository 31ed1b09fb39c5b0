"""Random-access image sources: integer index -> (encoded image bytes, integer label).

Every source also offers `tf_lookup(index)`, the same read expressed for tf.data, so the input
pipelines stay inside TensorFlow's threads wherever the storage allows (image folders: pure graph
ops; tfds array_record: one small Python call for the raw record, the parsing in graph). The training
stream reads in two steps, `tf_fetch(indices)` on a chunk of indices then `tf_decode` per example, so
a source read from Python (tfds array_record) takes Python's lock once per chunk, not per image.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dmt_jax import storage
from dmt_jax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Every module of dmt_jax.data imports this one first. The accelerators belong to JAX: keep TF (a full
# `tensorflow` build, as on non-x86 hosts, sees GPUs) from starting them and reserving their memory.
try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):  # TF already started its devices, or knows no such device type
    pass


class DataError(UserError, ValueError):
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

    def tf_fetch(self, indices: tf.Tensor) -> dict[str, tf.Tensor]:
        """int64 [n] indices -> a dict of [n] tensors that `tf_decode` turns, one element at a time, into
        (encoded, label). The default defers everything to `tf_lookup`."""
        return {"index": indices}

    def tf_decode(self, fetched: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        return self.tf_lookup(fetched["index"])


def class_folders(root: str | os.PathLike) -> list[str]:
    """Sorted names of the subfolders of `root` that hold at least one image (empty ones get no label)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and _has_image(Path(e.path)))


def shared_class_names(roots) -> list[str]:
    """One class list for every split of a folder dataset: the union of the splits' non-empty class
    folders, so a class folder that is missing or empty in one split cannot shift the others' labels."""
    return sorted(set().union(*(class_folders(r) for r in roots if r)))


class FolderSource(Source):
    """`root/<class>/<image>`: label = index of the class folder's name in `class_names` (default: this
    folder's own non-empty class folders, sorted); files sorted within each class."""

    def __init__(self, root: str | os.PathLike, class_names: list[str] | None = None):
        root = Path(root).expanduser()
        layout = f"expected {root}/<class_name>/<image>.jpg"
        if root.exists() and not root.is_dir():
            raise DataError(f"image folder {root} is a file, not a folder: {layout}")
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist: {layout}")
        self.root = root
        self.class_names = list(class_folders(root) if class_names is None else class_names)
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

    def __str__(self) -> str:
        return f"image folder {self.root}"

    def tf_lookup(self, index):
        return tf.io.read_file(tf.gather(self._tf_paths, index)), tf.gather(self._tf_labels, index)


def _walk_images(folder: Path):
    """Paths of the image files under `folder`: regular files (or links to them) only, since reading a
    FIFO or a device named x.jpg would block the pipeline forever; linked folders are not followed."""
    pending = [os.fspath(folder)]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:  # unreadable or vanished subfolder: its images cannot be read either
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and (entry.is_file() or _dangling(entry)):
                yield entry.path  # a dangling link stays listed: it is then skipped and counted


def _dangling(entry: os.DirEntry) -> bool:
    return entry.is_symlink() and not os.path.exists(entry.path)


def _has_image(folder: Path) -> bool:
    return next(_walk_images(folder), None) is not None


def _image_files(folder: Path) -> list[str]:
    return list(_walk_images(folder))


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
        data_dir = os.fspath(storage.path(data_dir)) if data_dir else None  # gs://... stays as it is
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

    def __str__(self) -> str:
        return f"tfds {self.name} split {self.split}"

    def __getitem__(self, index: int) -> tuple[bytes, int]:
        example = self.data_source[index]
        return bytes(example[self.image_key]), int(example[self.label_key])

    def tf_lookup(self, index):
        return self.tf_decode({"record": self.tf_fetch(index[None])["record"][0]})

    def tf_fetch(self, indices):
        # Only the raw record reads are Python (one call for the whole chunk); parsing runs in graph.
        raw_records = self.data_source.data_source

        def read_raw(chunk):
            return np.array([raw_records[int(i)] for i in chunk], dtype=object)

        records = tf.numpy_function(read_raw, [indices], tf.string, stateful=False)
        return {"record": tf.ensure_shape(records, indices.shape)}

    def tf_decode(self, fetched):
        example = self.features.deserialize_example(fetched["record"], decoders=self._decoders)
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


def check_tfds_dataset(name: str, data_dir: str | None) -> list[str]:
    """The split names of a tfds dataset prepared for random access; DataError (one line) otherwise."""
    from absl import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # tfds warns about the folders it looks in; the error says it all
    try:
        _check_prepared_for_random_access(name, data_dir)
        return list(tfds.builder(name, data_dir=data_dir).info.splits.keys())
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(f"tfds has no dataset {name!r}: check --config.data.tfds_name") from e
    finally:
        logging.set_verbosity(verbosity)
