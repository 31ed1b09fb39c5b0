"""Input pipelines: sources, exact and process-count-independent training stream, eval pass, demo data."""

import os
import pathlib
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dmt_jax import data
from dmt_jax.config import data_config
from dmt_jax.data import augment

IMG = 24  # tiny outputs keep the file fast


def _write_image(path, rng, size=None):
    height, width = size or rng.integers(20, 48, size=2)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    encode = tf.io.encode_jpeg if str(path).endswith(".jpg") else tf.io.encode_png
    path.write_bytes(encode(pixels).numpy())


def _make_folder(root, per_class=(4, 5, 6), corrupt=()):
    """Class folders b_cls, a_cls, c_cls (unsorted on purpose); `corrupt` adds broken files to a_cls."""
    rng = np.random.default_rng(0)
    for name, count in zip(["b_cls", "a_cls", "c_cls"], per_class, strict=True):
        (root / name).mkdir(parents=True)
        for i in range(count):
            _write_image(root / name / f"img{i:02d}.{'jpg' if i % 2 else 'png'}", rng)
    for filename, content in corrupt:
        (root / "a_cls" / filename).write_bytes(content)
    (root / "a_cls" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def clean_folder(tmp_path_factory):
    return data.FolderSource(_make_folder(tmp_path_factory.mktemp("clean")))


@pytest.fixture(scope="module")
def corrupt_folder(tmp_path_factory):
    good = tf.io.encode_png(np.zeros((30, 30, 3), np.uint8)).numpy()
    corrupt = [("img90_garbage.jpg", b"this is not an image"), ("img91_truncated.png", good[:40])]
    return data.FolderSource(_make_folder(tmp_path_factory.mktemp("corrupt"), corrupt=corrupt))


def _take(pipeline, steps):
    return [next(pipeline) for _ in range(steps)]


def _train(source, **kwargs):
    kwargs = {"global_batch": 8, "img_size": IMG, "seed": 3, "threads": 2, **kwargs}
    return data.TrainInput(source, **kwargs)


def test_folder_source_labels_and_order(clean_folder):
    assert clean_folder.class_names == ["a_cls", "b_cls", "c_cls"]
    assert len(clean_folder) == 15 and clean_folder.num_classes == 3
    np.testing.assert_array_equal(clean_folder.labels, [0] * 5 + [1] * 4 + [2] * 6)
    names = [os.path.relpath(p, clean_folder.root) for p in clean_folder.paths]
    assert names[:2] == ["a_cls/img00.png", "a_cls/img01.jpg"] and names == sorted(names)
    encoded, label = clean_folder[6]
    assert label == 1 and encoded == pathlib.Path(clean_folder.paths[6]).read_bytes()


def test_folder_missing_or_empty_is_one_line_error(tmp_path):
    for root in [tmp_path / "absent", tmp_path]:
        with pytest.raises(data.DataError) as error:
            data.FolderSource(root)
        assert "\n" not in str(error.value) and str(root) in str(error.value)


def test_train_stream_follows_the_global_definition(clean_folder):
    n, batch, seed = len(clean_folder), 8, 3
    batches = _take(_train(clean_folder, seed=seed), 4)  # 32 positions: more than two epochs
    positions = np.arange(4 * batch)
    expected = [np.random.default_rng([seed, g // n]).permutation(n)[g % n] for g in positions]
    np.testing.assert_array_equal(np.concatenate([b["id"] for b in batches]), expected)
    image = batches[0]["image"]
    assert (
        image.shape == (batch, IMG, IMG, 3) and image.dtype == np.uint8 and batches[0]["id"].dtype == np.int64
    )


def test_train_is_deterministic_and_seeded(clean_folder):
    first, again = _take(_train(clean_folder), 3), _take(_train(clean_folder, num_parallel=1, prefetch=1), 3)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["id"], b["id"])
    other_seed = _take(_train(clean_folder, seed=4), 1)[0]
    assert not np.array_equal(other_seed["image"], first[0]["image"])


def test_two_processes_make_the_same_global_batch_as_one(clean_folder):
    single = _take(_train(clean_folder), 4)
    halves = [_take(_train(clean_folder, process_index=p, process_count=2), 4) for p in range(2)]
    for step in range(4):
        for key in ("image", "id"):
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_array_equal(joined, single[step][key])


def test_corrupt_images_are_skipped_and_counted(corrupt_folder):
    corrupt_ids = {i for i, p in enumerate(corrupt_folder.paths) if "img9" in p}
    assert len(corrupt_folder) == 17 and len(corrupt_ids) == 2
    pipeline = _train(corrupt_folder, global_batch=6)
    seen = np.concatenate([b["id"] for b in _take(pipeline, 6)])
    state = pipeline.state()
    n = len(corrupt_folder)
    stream = [np.random.default_rng([3, g // n]).permutation(n)[g % n] for g in range(state["next_index"])]
    assert state["bad_images"] == sum(i in corrupt_ids for i in stream) > 0
    np.testing.assert_array_equal(seen, [i for i in stream if i not in corrupt_ids])


def test_resume_from_state_continues_the_same_stream(corrupt_folder):
    uninterrupted = _train(corrupt_folder, process_index=1, process_count=2)
    expected = _take(uninterrupted, 7)
    interrupted = _train(corrupt_folder, process_index=1, process_count=2)
    _take(interrupted, 3)
    saved = interrupted.state()
    start, bad = data.TrainInput.resume_position(saved, step=3, global_batch=8, process_count=2)
    resumed = _train(corrupt_folder, process_index=1, process_count=2, start=start, bad_so_far=bad)
    for a, b in zip(expected[3:], _take(resumed, 4), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["id"], b["id"])
    assert resumed.state() == uninterrupted.state() and resumed.state()["bad_images"] > 0


def test_state_counts_only_delivered_batches_and_step_fallback(clean_folder):
    pipeline = _train(clean_folder, prefetch=4)
    next(pipeline)
    time.sleep(0.2)  # let the prefetch run ahead
    assert pipeline.state()["next_index"] == 8 and pipeline.state()["bad_images"] == 0
    assert data.TrainInput.start_for_step(5, global_batch=8, process_count=2) == 20
    saved = {"next_index": 40, "bad_images": 1, "process_count": 1, "global_batch": 8}
    assert data.TrainInput.resume_position(saved, step=5, global_batch=8, process_count=2) == (20, 0)
    assert data.TrainInput.resume_position(None, step=5, global_batch=8, process_count=1) == (40, 0)


@pytest.mark.parametrize(
    "in_hw, out_hw, resized_hw, offset_hw",
    [
        ((300, 280), (224, 224), None, (0, 0)),  # downscale
        ((37, 41), (56, 48), None, (0, 0)),  # upscale, not square
        ((20, 500), (24, 24), None, (0, 0)),  # extreme aspect
        ((1, 7), (24, 24), None, (0, 0)),  # a single row
        ((64, 128), (28, 28), (32, 64), (2, 18)),  # a window of a resized image (eval)
        ((90, 61), (32, 32), (53, 36), (10, 2)),
    ],
)
def test_banded_resize_equals_tf_antialiased_resize(in_hw, out_hw, resized_hw, offset_hw):
    image = np.random.default_rng(0).integers(0, 256, (*in_hw, 3), dtype=np.uint8)
    reference = tf.image.resize(image, resized_hw or out_hw, method="bilinear", antialias=True).numpy()
    reference = reference[offset_hw[0] : offset_hw[0] + out_hw[0], offset_hw[1] : offset_hw[1] + out_hw[1]]
    ours = augment.resize_window(tf.constant(image), *out_hw, resized_hw, offset_hw).numpy()
    np.testing.assert_allclose(ours, reference, atol=0.02)


def test_full_scale_crop_is_the_resized_image_or_its_mirror():
    pixels = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for encode in (tf.io.encode_png, tf.io.encode_jpeg):
        encoded = encode(pixels).numpy()
        expected = tf.image.resize(
            tf.io.decode_image(encoded, channels=3), [IMG, IMG], antialias=True
        ).numpy()
        flips = []
        for g in range(16):
            seed = tf.constant([7, g], tf.int64)
            view = augment.train_transform(encoded, seed, IMG, scale=(1.0, 1.0), ratio=(1.0, 1.0)).numpy()
            flipped = np.abs(view - expected[:, ::-1]).max() <= 0.51
            assert flipped or np.abs(view - expected).max() <= 0.51
            flips.append(flipped)
        assert 0 < sum(flips) < 16


def test_eval_pads_the_tail_and_shards_contiguously(clean_folder):
    single = list(data.EvalInput(clean_folder, global_batch=4, img_size=IMG, threads=2))
    assert len(single) == 4 and [b["valid"].sum() for b in single] == [4, 4, 4, 3]
    assert single[0]["image"].shape == (4, IMG, IMG, 3) and single[0]["label"].dtype == np.int32
    labels = np.concatenate([b["label"] for b in single])
    np.testing.assert_array_equal(labels[:15], clean_folder.labels)
    assert labels[15] == -1 and not single[-1]["image"][-1].any()

    shards = [
        data.EvalInput(clean_folder, global_batch=4, img_size=IMG, process_index=p, process_count=2)
        for p in (0, 1)
    ]
    assert [(s.begin, s.end, len(s)) for s in shards] == [(0, 7, 4), (7, 15, 4)]
    batches = [list(shard) for shard in shards]
    assert [b[-1]["valid"].tolist() for b in batches] == [[True, False], [True, True]]
    valid = [np.concatenate([b["label"][b["valid"]] for b in shard]) for shard in batches]
    np.testing.assert_array_equal(np.concatenate(valid), clean_folder.labels)


def test_eval_resizes_shorter_side_and_crops_the_centre(tmp_path):
    # A horizontal ramp 64 x 128 at img_size 28: shorter side -> 32 (factor 1/2), image 32 x 64, centre
    # crop columns 18..45. Bilinear-antialiased resizing keeps a ramp a ramp, so output column c must
    # show the source x of its centre: (18 + c + 0.5) * 2 - 0.5.
    ramp = np.broadcast_to(np.arange(128, dtype=np.uint8)[None, :, None], (64, 128, 3))
    assert augment.eval_resize_size(28, 0.875) == 32 and augment.eval_resize_size(224, 0.875) == 256
    out = augment.eval_transform(tf.io.encode_png(np.ascontiguousarray(ramp)).numpy(), 28).numpy()
    assert out.shape == (28, 28, 3)
    np.testing.assert_allclose(out[14, :, 0], (18 + np.arange(28) + 0.5) * 2 - 0.5, atol=1.0)


def _spectral_features(images):
    """Translation- and colour-insensitive texture descriptor: spectrum energy in polar bins."""
    centred = images - images.mean(axis=(1, 2), keepdims=True)
    spectrum = np.fft.fftshift(np.abs(np.fft.fft2(centred, axes=(1, 2))).sum(-1), axes=(1, 2))
    size = images.shape[1]
    y, x = np.mgrid[0:size, 0:size] - size // 2
    radius_bin = np.minimum((np.hypot(y, x) / (size / 2) * 8).astype(int), 7)
    angle_bin = np.minimum((np.mod(np.arctan2(y, x), np.pi) / np.pi * 8).astype(int), 7)
    bins = (radius_bin * 8 + angle_bin).ravel()
    features = np.log1p(np.stack([np.bincount(bins, s.ravel(), minlength=64) for s in spectrum]))
    return features - features.mean(1, keepdims=True)


def _nearest_neighbour_accuracy(train_x, train_y, query_x, query_y):
    normalize = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)
    train_x, query_x = (
        normalize(train_x.reshape(len(train_x), -1)),
        normalize(query_x.reshape(len(query_x), -1)),
    )
    return np.mean(train_y[np.argmax(query_x @ train_x.T, axis=1)] == query_y)


def test_demo_dataset_is_idempotent_mixed_and_separable(tmp_path, monkeypatch, capsys):
    sizes = {"num_classes": 10, "per_class_train": 16, "per_class_val": 8, "img_size": 32}
    monkeypatch.setenv("DMT_PROGRESS", "lines")  # as in a log file
    root = data.make_demo_dataset(tmp_path / "demo", **sizes)
    said = capsys.readouterr().err.splitlines()
    assert said[0] == f"generating the demo dataset in {root}: started (240 images)", said
    assert said[-1].startswith(f"generating the demo dataset in {root}: done, 240 images in "), said
    marker_time = os.stat(root / "demo.json").st_mtime_ns
    assert data.make_demo_dataset(tmp_path / "demo", **sizes) == root
    assert not capsys.readouterr().err  # made already: nothing to report
    assert os.stat(root / "demo.json").st_mtime_ns == marker_time
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary folder left behind
    with pytest.raises(data.DataError):
        data.make_demo_dataset(tmp_path / "demo", **{**sizes, "per_class_val": 9})
    train, val = data.FolderSource(root / "train"), data.FolderSource(root / "val")
    assert (len(train), len(val), train.num_classes) == (160, 80, 10)
    assert {os.path.splitext(p)[1] for p in train.paths} == {".jpg", ".png"}

    def load(source):
        return np.stack([tf.io.decode_image(source[i][0]).numpy() for i in range(len(source))]).astype(float)

    train_x, val_x = load(train), load(val)
    raw = _nearest_neighbour_accuracy(train_x, train.labels, val_x, val.labels)
    textured = _nearest_neighbour_accuracy(
        _spectral_features(train_x), train.labels, _spectral_features(val_x), val.labels
    )
    assert textured >= 0.85 and raw <= 0.5, (textured, raw)


def test_make_source_by_role(tmp_path, clean_folder):
    config = data_config()
    config.demo_root, config.demo_per_class_train, config.demo_per_class_val = str(tmp_path), 2, 1
    config.demo_img_size = 16
    lengths = {role: len(data.make_source(config, role)) for role in data.SPLIT_ROLES}
    assert lengths == {"train": 20, "knn_train": 20, "knn_eval": 10}
    config.source, config.folder_train, config.folder_eval = (
        "folder",
        str(clean_folder.root),
        str(clean_folder.root),
    )
    assert len(data.make_source(config, "knn_train")) == 15
    with pytest.raises(ValueError):
        data.make_source(config, "test")
    train = data.make_train_input(config, clean_folder, global_batch=4, img_size=IMG, seed=0, step=2)
    assert train.state()["next_index"] == 8 and next(train)["image"].shape == (4, IMG, IMG, 3)


class DmtTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A 12-image dataset built by tfds's own tooling; read back by name from its data_dir."""

    VERSION = tfds.core.Version("1.0.0")
    pkg_dir_path = pathlib.Path(__file__).parent  # tests/ is not a package; tfds would look for one

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=3),
            }
        )
        return self.dataset_info_from_configs(features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12), "test": self._generate_examples(5)}

    def _generate_examples(self, count):
        rng = np.random.default_rng(count)
        for i in range(count):
            image = rng.integers(0, 256, (rng.integers(20, 40), rng.integers(20, 40), 3), dtype=np.uint8)
            yield i, {"image": image, "label": i % 3}


@pytest.fixture(scope="module")
def tfds_dirs(tmp_path_factory):
    dirs = {}
    for file_format in ("array_record", "tfrecord"):
        dirs[file_format] = str(tmp_path_factory.mktemp(file_format))
        DmtTinyImages(data_dir=dirs[file_format], file_format=file_format).download_and_prepare()
    return dirs


def test_tfds_source_reads_array_record(tfds_dirs):
    source = data.TfdsSource("dmt_tiny_images", "train", tfds_dirs["array_record"])
    assert len(source) == 12 and source.num_classes == 3
    assert sorted(source[i][1] for i in range(12)) == [0] * 4 + [1] * 4 + [2] * 4
    assert tf.io.is_jpeg(source[4][0]).numpy()
    batch = next(_train(source, global_batch=4))
    assert batch["image"].shape == (4, IMG, IMG, 3)
    # the graph-side read (raw record + tfds parsing in tf.data) agrees with the Python one
    test = data.TfdsSource("dmt_tiny_images", "test", tfds_dirs["array_record"])
    labels = np.concatenate([b["label"] for b in data.EvalInput(test, global_batch=4, img_size=IMG)])
    np.testing.assert_array_equal(labels, [test[i][1] for i in range(5)] + [-1] * 3)


def test_tfds_errors_name_the_command_that_fixes_them(tfds_dirs, tmp_path):
    with pytest.raises(data.DataError) as tfrecord_only:
        data.TfdsSource("dmt_tiny_images", "train", tfds_dirs["tfrecord"])
    message = str(tfrecord_only.value)
    assert (
        "\n" not in message
        and "tfds convert_format" in message
        and "--out_file_format=array_record" in message
    )
    with pytest.raises(data.DataError) as missing:
        data.TfdsSource("imagenet2012", "train", str(tmp_path))
    message = str(missing.value)
    assert "\n" not in message
    assert (
        f"tfds build imagenet2012 --file_format=array_record --data_dir={tmp_path} --manual_dir=DIR"
        in message
    )
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
