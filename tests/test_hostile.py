"""Hostile and nonsense input (issue 9): nothing hangs, nothing is silently wrong, nothing is lost.

Each kind of input is probed with several of its members: unreadable and oversized images, lying
teacher specs and checkpoints, non-finite weights, split folders with different classes, a second run
on a busy workdir, a resume with other teachers or another config, an overwrite that would lose files.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# timm, torchvision, triton before TensorFlow: importing them after TF has run can crash the process.
from tests.checkpoint_layouts import TINY, random_timm_vit, timm_state  # isort: skip
from dmt_jax import convert, data, teachers
from dmt_jax.config import data_config
from dmt_jax.errors import UserError
from dmt_jax.workdir_lock import WorkdirLock, WorkdirLocked
from tests.helpers_run import Run, cli_args

# ---------------------------------------------------------------- images


def _png(side: int = 24, color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buffer, "PNG")
    return buffer.getvalue()


def _png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG header claiming width x height (a few hundred bytes; 1.2 GB once decoded)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compress(b"\0" * (1 + 3 * width) * 64)  # the first rows only: the decoder asks for more
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _folder(root: Path, classes: dict[str, list[bytes]]) -> Path:
    for name, files in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, content in enumerate(files):
            (root / name / f"{i}.png").write_bytes(content)
    return root


def _train_input(root: Path, **kwargs) -> data.TrainInput:
    kwargs = dict(global_batch=4, img_size=16, seed=0, threads=1, num_parallel=1) | kwargs
    return data.TrainInput(data.FolderSource(root), **kwargs)


UNREADABLE = {"empty file": b"", "text": b"not an image at all", "cut PNG": _png()[:40]}


def test_unreadable_folder_stops_with_its_name(tmp_path):
    root = _folder(tmp_path / "bad", {"a": list(UNREADABLE.values()), "b": [b"\xff\xd8\xff junk"]})
    stream = _train_input(root, max_unreadable=50)
    start = time.monotonic()
    with pytest.raises(data.UnreadableInput, match=f"image folder {root}.*in a row"):
        next(stream)
    assert time.monotonic() - start < 60


def test_stop_request_is_honoured_while_waiting_for_input(tmp_path):
    root = _folder(tmp_path / "bad", {"a": list(UNREADABLE.values())})
    stream = _train_input(root, max_unreadable=0)  # 0: never give up, so only the stop can end the wait
    asked = time.monotonic() + 1.0
    stream.stop_requested = lambda: time.monotonic() > asked
    with pytest.raises(data.StopRequested):
        next(stream)
    assert time.monotonic() - asked < 5
    assert stream.state()["next_index"] == 0  # nothing was handed out: the checkpoint's position is exact
    stream.close()


def test_decompression_bomb_is_refused_from_its_header():
    import tensorflow as tf

    from dmt_jax.data import augment

    assert int(augment.header_pixels(tf.constant(_png_bomb()))) == 20000 * 20000
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_image_pixels"):
        augment.check_pixels(tf.constant(_png_bomb()), augment.MAX_IMAGE_PIXELS)
    for fmt in ("JPEG", "GIF", "BMP"):
        buffer = io.BytesIO()
        Image.new("RGB", (300, 200)).save(buffer, fmt)
        assert int(augment.header_pixels(tf.constant(buffer.getvalue()))) == 300 * 200, fmt


def test_images_over_the_pixel_limit_are_skipped_and_counted(tmp_path):
    good = [_png(24, (20 * i, 100, 50)) for i in range(3)]
    root = _folder(tmp_path / "mixed", {"a": [good[0], _png(1200), good[1]], "b": [good[2], _png_bomb()]})
    big, bomb = 1, 4  # sorted: a/0 a/1 a/2 b/0 b/1

    def seen(max_pixels):
        stream = _train_input(root, global_batch=3, max_pixels=max_pixels)
        ids = {int(i) for _ in range(4) for i in next(stream)["id"]}
        return ids, stream.state()["bad_images"]

    ids, bad = seen(10**6)
    assert big not in ids and bomb not in ids and bad >= 2
    ids, bad = seen(2 * 10**6)  # the limit is a setting: the 1200 x 1200 image is read now
    assert big in ids and bomb not in ids
    source = data.FolderSource(root)
    evaluation = data.EvalInput(source, global_batch=5, img_size=16, threads=1, max_pixels=10**6)
    assert next(iter(evaluation))["valid"].sum() == 3  # the over-limit images' slots are padding


def test_one_class_list_for_every_split(tmp_path):
    img = _png()
    train = _folder(tmp_path / "train", {"a_empty": [], "cat": [img, img], "dog": [img], "only_train": [img]})
    (train / "a_empty" / "notes.txt").write_text("not an image")
    val = _folder(tmp_path / "val", {"cat": [img], "dog": [img]})
    config = data_config()
    config.source, config.folder_train, config.folder_eval = "folder", str(train), str(val)
    sources = {role: data.make_source(config, role) for role in ("train", "knn_eval")}
    for source in sources.values():
        assert source.class_names == ["cat", "dog", "only_train"]
    assert sources["knn_eval"][0][1] == 0 and sources["knn_eval"][1][1] == 1  # cat, dog as in train
    assert sorted(int(lbl) for lbl in sources["train"].labels) == [0, 0, 1, 2]


@pytest.mark.parametrize("kind", ["a file", "missing"])
def test_image_folder_that_is_not_a_folder(tmp_path, kind):
    path = tmp_path / "images"
    if kind == "a file":
        path.write_text("x")
    with pytest.raises(UserError, match=f"image folder {path} (is a file|does not exist)"):
        data.FolderSource(path)


# ---------------------------------------------------------------- converted teachers


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    teacher = teachers.make_random_teacher("mu/4", 32, 0)
    return teachers.save_teacher(tmp_path_factory.mktemp("teacher") / "t", teacher.spec, teacher.params)


def _copy_teacher(src: Path, dst: Path, spec_edit=None, params_edit=None) -> Path:
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    spec = json.loads((src / teachers.SPEC_FILE).read_text())
    flat = load_file(str(src / teachers.PARAMS_FILE))
    if spec_edit:
        spec_edit(spec)
    if params_edit:
        params_edit(flat)
    (dst / teachers.SPEC_FILE).write_text(json.dumps(spec))
    save_file(flat, str(dst / teachers.PARAMS_FILE))
    return dst


def _set(**fields):
    """Sets spec.json fields; a field of the model config goes into its "config" (spec /2)."""

    def edit(spec):
        for name, value in fields.items():
            (spec["config"] if name in spec.get("config", {}) else spec)[name] = value

    return edit


SPEC_EDITS = {
    "depth 99999999": (_set(depth=99999999), "depth is 99999999 but the file holds 2 blocks"),
    "depth a string": (_set(depth="2"), "depth must be a positive integer, got '2'"),
    "num_heads 0": (_set(num_heads=0), "num_heads must be a positive integer"),
    "num_heads not dividing": (_set(num_heads=3), "num_heads 3 does not divide width 64"),
    "width a bool": (_set(width=True), "width must be a positive integer"),
    "img_size huge": (_set(img_size=4 * 10**8), "pos_embed has shape"),
    "std 0": (_set(std=[0.2, 0.0, 0.2]), "std must be > 0"),
    "mean NaN": (_set(mean=[float("nan"), 0.4, 0.4]), "mean must be 3 finite numbers"),
    "std of 2 values": (_set(std=[0.2, 0.2]), "std must be 3 finite numbers"),
    "layerscale a string": (_set(layerscale="no"), "layerscale must be true or false"),
    "missing width": (lambda spec: spec["config"].pop("width"), r"lacks the fields \['width'\]"),
    "extra field": (_set(heads=12), r"unknown fields \['heads'\]"),
    "not a spec": (lambda spec: spec.clear(), "not a converted-teacher spec"),
}


@pytest.mark.parametrize("name", SPEC_EDITS)
def test_lying_spec_is_refused_naming_the_field(teacher_dir, tmp_path, name):
    edit, message = SPEC_EDITS[name]
    path = _copy_teacher(teacher_dir, tmp_path / "t", spec_edit=edit)
    start = time.monotonic()
    with pytest.raises(teachers.TeacherFileError, match=message) as error:
        teachers.load_teacher(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert time.monotonic() - start < 10


def _poison(value):
    def edit(flat):
        flat["blocks_1/mlp/fc1/bias"][3] = value

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_poison(np.nan), "NaN or Inf: blocks_1/mlp/fc1/bias"),
        (_poison(-np.inf), "NaN or Inf: blocks_1/mlp/fc1/bias"),
        (lambda f: f.update(norm_scale=f.pop("norm/scale").astype(np.float16)), "unexpected|float16"),
        (lambda f: f.update({"norm/scale": f["norm/scale"].astype(np.int32)}), "dtype int32"),
        (lambda f: f.pop("blocks_1/attn/qkv/kernel"), "missing blocks_1/attn/qkv/kernel"),
    ],
)
def test_bad_teacher_tensors_are_named(teacher_dir, tmp_path, edit, message):
    path = _copy_teacher(teacher_dir, tmp_path / "t", params_edit=edit)
    with pytest.raises(teachers.TeacherFileError, match=message) as error:
        teachers.load_teacher(path)
    assert str(path) in str(error.value)


def test_corrupt_params_file(teacher_dir, tmp_path):
    path = _copy_teacher(teacher_dir, tmp_path / "t")
    params = path / teachers.PARAMS_FILE
    params.write_bytes(params.read_bytes()[:1000])
    with pytest.raises(teachers.TeacherFileError, match=str(path)):
        teachers.load_teacher(path)


# ---------------------------------------------------------------- dmt-convert


@pytest.fixture(scope="module")
def tiny_backbone():
    return timm_state(random_timm_vit(TINY))


def _convert(tmp_path, state, *extra) -> tuple[int, str]:
    import contextlib

    src = tmp_path / "ckpt.pth"
    if isinstance(state, bytes):
        src.write_bytes(state)
    else:
        torch.save(state, src)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = convert.main([str(src), str(tmp_path / "out"), *extra])
    return rc, err.getvalue()


def test_block_number_beyond_the_blocks_is_refused(tmp_path, tiny_backbone):
    state = dict(tiny_backbone, **{"blocks.99999999.norm1.weight": tiny_backbone["blocks.0.norm1.weight"]})
    rc, err = _convert(tmp_path, state)
    assert rc == 2 and "blocks are not numbered 0..2" in err and "blocks 99999999 beyond them" in err


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_checkpoint_is_refused_naming_the_tensor(tmp_path, tiny_backbone, value):
    state = {k: v.clone() for k, v in tiny_backbone.items()}
    state["blocks.1.attn.proj.weight"][0, 0] = value
    rc, err = _convert(tmp_path, state)
    assert rc == 2 and "NaN or Inf: blocks.1.attn.proj.weight" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cut", [0, 100, 2000])
def test_truncated_checkpoint(tmp_path, tiny_backbone, cut):
    buffer = io.BytesIO()
    torch.save(tiny_backbone, buffer)
    rc, err = _convert(tmp_path, buffer.getvalue()[:cut])
    assert rc == 2 and "ckpt.pth" in err


def test_overwrite_keeps_a_folder_with_other_files(tmp_path, tiny_backbone):
    out = tmp_path / "out"
    out.mkdir()
    (out / teachers.SPEC_FILE).write_text("{}")
    (out / "my_notes.txt").write_text("precious")
    rc, err = _convert(tmp_path, tiny_backbone, "--overwrite")
    assert rc == 2 and "my_notes.txt" in err
    assert (out / "my_notes.txt").read_text() == "precious"
    (out / "my_notes.txt").unlink()
    assert _convert(tmp_path, tiny_backbone, "--overwrite")[0] == 0  # a converted teacher is replaced
    assert teachers.load_teacher(out).spec.depth == 2


# ---------------------------------------------------------------- workdir lock


def test_workdir_lock_names_the_holder_and_dies_with_it(tmp_path):
    with WorkdirLock(tmp_path), pytest.raises(WorkdirLocked, match=f"pid {os.getpid()}, started"):
        WorkdirLock(tmp_path).acquire()
    WorkdirLock(tmp_path).acquire().release()  # released: free again
    hold = f"WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import time; from dmt_jax.workdir_lock import WorkdirLock; {hold}"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirLocked, match=f"pid {holder.pid}"):
        WorkdirLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)  # a crash releases it
    holder.wait()
    WorkdirLock(tmp_path).acquire().release()


def test_second_run_on_a_busy_workdir_is_refused(tmp_path):
    workdir = tmp_path / "run"
    with WorkdirLock(workdir):
        run = Run(cli_args(workdir, tmp_path / "demo"), devices=1)
        assert run.finish(timeout=120) == 2
    assert f"error: workdir {workdir} is in use by another run (host" in run.output
    assert sorted(p.name for p in workdir.iterdir()) == [".dmt_lock"]  # nothing written


# ---------------------------------------------------------------- runs (in process)


def _train(config, workdir):
    from dmt_jax import loop

    return loop.train_and_evaluate(config, str(workdir))


def _bad_folder_config(tmp_path, **overrides):
    from tests.helpers_run import tiny_config

    root = _folder(tmp_path / "bad", {"a": list(UNREADABLE.values()), "b": [b"\x89PNG\r\n\x1a\n"]})
    fields = {"data.source": "folder", "data.folder_train": str(root), "data.folder_eval": str(root)}
    fields |= {"data.threads": 1, "data.num_parallel": 1, "log_example_ids": False}
    return tiny_config(
        tmp_path / "demo", **{k.replace(".", "__"): v for k, v in (fields | overrides).items()}
    )


def test_run_on_unreadable_images_exits_with_the_folder_named(tmp_path):
    config = _bad_folder_config(tmp_path, **{"data.max_unreadable_in_a_row": 100})
    with pytest.raises(data.UnreadableInput, match=f"image folder {tmp_path / 'bad'}"):
        _train(config, tmp_path / "run")


def test_run_stops_with_a_checkpoint_while_waiting_for_input(tmp_path):
    import threading

    config = _bad_folder_config(tmp_path, **{"data.max_unreadable_in_a_row": 0})  # would wait forever
    threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    _train(config, tmp_path / "run")  # returns: the stop was honoured
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()] == ["0"]


def test_resume_is_refused_with_other_teachers_or_schedule(tmp_path, capsys):
    from tests.helpers_run import tiny_config

    def config(**overrides):
        fields = dict(total_steps=4, checkpoint_every=2, log_example_ids=False) | overrides
        return tiny_config(tmp_path / "demo", **fields)

    workdir = tmp_path / "run"
    _train(config(), workdir)
    written = (workdir / "config.json").read_text()
    other_teacher = "('random:mu/4@32:9','random:mu/8@64:2')"
    refusal = r"teacher 0: other weights or spec.*loss: 'smooth_l1' -> 'mse'.*total_steps: 4 -> 6"
    refusal += r".*lr at step 4 jumps from"
    with pytest.raises(UserError, match=refusal):
        _train(config(teachers=other_teacher, total_steps=6, loss="mse"), workdir)
    assert (workdir / "config.json").read_text() == written  # a refused resume leaves it alone
    capsys.readouterr()
    _train(config(log_every=1), workdir)  # harmless: allowed, and said
    assert "resuming with changed config fields: log_every: 2 -> 1" in capsys.readouterr().out
    assert json.loads((workdir / "config.json").read_text())["log_every"] == 1
    _train(config(teachers=other_teacher, resume_allow_changes=True), workdir)  # meant: allowed, and said
    assert "teacher 0: other weights or spec" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "ckpt.safetensors",
            b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}",
            "not a readable safetensors",
        ),
        ("ckpt.safetensors", b"", "not a readable safetensors"),
        ("ckpt.pth", b"PK\x03\x04 not really a zip", "truncated or not a PyTorch checkpoint"),
    ],
)
def test_corrupt_source_files(tmp_path, capsys, name, content, message):
    src = tmp_path / name
    src.write_bytes(content)
    assert convert.main([str(src), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_integer_tensors_are_refused(tmp_path, tiny_backbone):
    state = dict(tiny_backbone, **{"norm.weight": tiny_backbone["norm.weight"].to(torch.int64)})
    rc, err = _convert(tmp_path, state)
    assert rc == 2 and "not floating point: norm.weight (torch.int64)" in err


def test_evaluation_split_with_no_readable_image(tmp_path):
    import jax

    from dmt_jax import evaluate, parallel

    root = _folder(tmp_path / "bad", {"a": list(UNREADABLE.values())})
    batches = data.EvalInput(data.FolderSource(root), global_batch=8, img_size=16, threads=1)
    features = jax.jit(lambda images: images.reshape(images.shape[0], -1).astype("float32"))
    with pytest.raises(UserError, match="no image of an evaluation split could be read"):
        evaluate.collect(features, batches, parallel.make_mesh(-1, 1))


def test_a_field_new_to_the_schema_does_not_block_a_resume():
    from dmt_jax import run_record

    saved = {"teachers": ["abc"], "config": {"base_lr": 1.0, "data": {"threads": 0}}}
    now = {"teachers": ["abc"], "config": {"base_lr": 1.0, "data": {"threads": 4}, "new_field": 2}}
    assert run_record.differences(saved, now) == ([], ["data.threads: 0 -> 4", "new_field: '(absent)' -> 2"])


def test_special_files_named_like_images_are_not_read(tmp_path):
    root = _folder(tmp_path / "images", {"a": [_png(), _png()]})
    os.mkfifo(root / "a" / "fifo.png")  # reading it would block forever
    (root / "a" / "folder.jpg").mkdir()
    (root / "a" / "loop").symlink_to(root / "a")  # a linked folder is not followed
    stream = _train_input(root)
    deadline = time.monotonic() + 30
    stream.stop_requested = lambda: time.monotonic() > deadline  # a hang fails the test, not the suite
    assert len(stream.source) == 2 and len(next(stream)["id"]) == 4
    stream.close()


def test_a_dataset_that_grew_is_a_changed_run():
    from dmt_jax import run_record

    saved = {"teachers": ["abc"], "config": {"seed": 0}, "num_train_examples": 1000}
    now = dict(saved, num_train_examples=1010)
    assert run_record.differences(saved, now) == (["training images: 1000 -> 1010"], [])


# ---------------------------------------------------------------- config abuse (issue 18, item 9)

RECIPES = {
    "raises": ('raise RuntimeError("boom")\n', "raised RuntimeError: boom while loading"),
    "not python": ("teachers:\n  - teachers/mae\nbatch_size: 4\n", "is not Python: "),
    "exits": ("import sys\nsys.exit(3)\n", "raised SystemExit: 3 while loading"),
    "no get_config": ("x = 1\n", "defines no get_config()"),
    "get_config raises": ("def get_config():\n    return {}['x']\n", "get_config() raised KeyError: 'x'"),
    "get_config returns an int": (
        "def get_config():\n    return 5\n",
        "returned a int, not an ml_collections",
    ),
    "binary": ("\0\1\2", "is not Python: source code string cannot contain null bytes: give"),
}


@pytest.mark.parametrize("name", RECIPES)
def test_a_recipe_that_cannot_give_a_config_is_one_line(tmp_path, name):
    from dmt_jax import main

    content, message = RECIPES[name]
    (tmp_path / "recipe.py").write_text(content)
    problem = main._recipe_problem(str(tmp_path / "recipe.py"))
    assert message in problem and str(tmp_path / "recipe.py") in problem and "\n" not in problem


def test_config_abuse_on_the_command_line_is_one_line_each(tmp_path):
    (tmp_path / "raises.py").write_text('raise RuntimeError("boom")\n')
    teacher = teachers.make_random_teacher("mu/4", 32, 0)
    teachers.save_teacher(tmp_path / "t", teacher.spec, teacher.params)
    (tmp_path / "link").symlink_to(tmp_path)
    cases = [  # (extra arguments, teachers) -> what the one error line says
        (("--config=" + str(tmp_path / "raises.py"),), None, "raised RuntimeError: boom while loading"),
        ((), "(1,2)", "--config.teachers=(1, 2): must be a tuple of strings"),
        ((), f"('{tmp_path}/t','{tmp_path}/link/t/')", "names one teacher twice"),  # one folder, typed twice
    ]
    runs = []
    for args, entries, message in cases:
        fields = {"teachers": entries} if entries else {}
        runs.append(
            (Run([*cli_args(tmp_path / "w", tmp_path / "demo", **fields), *args], devices=1), message)
        )
    for run, message in runs:
        assert run.finish(timeout=300) == 2, run.output
        errors = [line for line in run.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], run.output
        assert "Traceback" not in run.output
    assert not (tmp_path / "w").exists()


def test_duplicate_teachers_are_refused_unless_asked_for(tmp_path):
    import shutil

    from dmt_jax import config as config_lib
    from dmt_jax import parallel, train
    from tests.helpers_run import tiny_config

    teacher = teachers.make_random_teacher("mu/4", 32, 0)
    teachers.save_teacher(tmp_path / "t", teacher.spec, teacher.params)
    shutil.copytree(tmp_path / "t", tmp_path / "copy")  # the same weights in another folder
    same = tiny_config(tmp_path / "demo", teachers="('random:mu/4@32:1','random:mu/4@32:1')")
    assert any("names one teacher twice ('random:mu/4@32:1' (entries 0 and 1))" in p
               for p in config_lib.consistency_problems(same))  # fmt: skip
    copies = tiny_config(tmp_path / "demo", teachers=f"('{tmp_path}/t','{tmp_path}/copy')")
    assert not config_lib.consistency_problems(copies)  # two folders: only their weights tell
    mesh = parallel.make_mesh(-1, 1)
    with pytest.raises(UserError, match="teachers 0 and 1 of --config.teachers have the same weights"):
        train.build(copies, mesh, num_train_examples=80)
    for config in (same, copies):
        config.allow_duplicate_teachers = True  # meant: allowed
        assert not config_lib.consistency_problems(config)
        assert len(train.build(config, mesh, num_train_examples=80).teacher_fingerprints) == 2


# ---------------------------------------------------------------- conversion bounds (issue 18, item 5)


def test_float64_weights_beyond_float32s_range_are_refused(tmp_path, tiny_backbone):
    state = {k: v.double() for k, v in tiny_backbone.items()}
    state["blocks.1.mlp.fc2.weight"][0, 0] = 1e300  # finite as float64, Inf as float32
    rc, err = _convert(tmp_path, state)
    assert (
        rc == 2 and "NaN or Inf: blocks.1.mlp.fc2.weight (as float32: values beyond its range, 3.4e38" in err
    )
    assert not (tmp_path / "out").exists()


def test_a_tiny_file_declaring_a_huge_model_is_refused_before_anything_is_materialized(
    tmp_path, tiny_backbone
):
    import resource

    expanded = dict(tiny_backbone, **{"blocks.0.mlp.fc1.weight": torch.zeros(1).expand(100_000, 100_000)})
    shared = torch.zeros(1_000_000)
    views = dict(tiny_backbone, **{f"extra.{i}": shared for i in range(2000)})  # one 4 MB storage 2000 times
    cases = {
        "expanded": (expanded, "tensors that repeat their storage (stride-0 or overlapping views)"),
        "views": (views, "its tensors declare 8.0 GB as float32 in a file of"),
    }
    limit = resource.getrlimit(resource.RLIMIT_AS)
    for name, (state, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30 + _address_space(), limit[1]))  # 40 GB cannot fit
        try:
            rc, err = _convert(folder, state)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, limit)
        assert rc == 2 and message in err and (folder / "ckpt.pth").stat().st_size < 5_000_000, err
        assert not (folder / "out").exists()


def _address_space() -> int:
    """Bytes of address space this process already maps (the limit above is on top of it)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def test_keys_that_are_not_strings_are_refused_in_one_line(tmp_path, tiny_backbone):
    for state in (
        {**tiny_backbone, 0: tiny_backbone["norm.weight"]},
        {"state_dict": {**tiny_backbone, 7: 1}},
    ):
        rc, err = _convert(tmp_path, state)
        assert rc == 2 and "not a checkpoint: keys that are not strings: checkpoint" in err and "(int)" in err
        assert err.count("\n") == 1
    optimizer = {"state": {0: {"exp_avg": tiny_backbone["norm.weight"]}}, "param_groups": [{"lr": 1.0}]}
    rc, err = _convert(tmp_path, {"teacher": tiny_backbone, "optimizer": optimizer, "epoch": 5})
    assert rc == 0, err  # a training file's optimizer state is keyed by integers: not refused


def test_a_guessed_format_names_the_format_option(tmp_path, tiny_backbone, capsys):
    for state, fmt in (({"state_dict": tiny_backbone}, "ibot"), (tiny_backbone, "dino")):
        rc, _ = _convert(tmp_path, state, "--overwrite")
        out = capsys.readouterr().out
        assert rc == 0 and f"format {fmt} is a guess" in out and "convert again with --format NAME" in out
    marked = {"state_dict": dict(tiny_backbone, masked_embed=tiny_backbone["norm.weight"][None])}
    assert _convert(tmp_path, marked, "--overwrite")[0] == 0
    assert "is a guess" not in capsys.readouterr().out  # iBOT's own marker: no guess
    assert _convert(tmp_path, {"state_dict": tiny_backbone}, "--overwrite", "--format", "ibot")[0] == 0
    assert "is a guess" not in capsys.readouterr().out  # named: no guess
