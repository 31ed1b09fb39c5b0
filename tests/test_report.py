"""dmt-report: the page of a run's workdir has every section and every embedded image decodes; a hostile
or damaged workdir gives a page (everything escaped, the damage counted), never a traceback, a hang, a
leaked local file or a write through a link."""

from __future__ import annotations

import base64
import errno
import html.parser
import io
import json
import os
import struct
import threading

import numpy as np
import pytest
from PIL import Image

from dmt_jax import pictures, report, workdir_files


def _write_events(workdir, rows: dict[int, dict[str, float]], images_at: int | None = None):
    from clu import metric_writers

    writer = metric_writers.create_default_writer(str(workdir))
    for step, scalars in rows.items():
        writer.write_scalars(step, scalars)
    if images_at is not None:
        writer.write_images(images_at, {"pca_feature_maps": np.zeros((1, 8, 8, 3), np.uint8)})
    writer.flush()
    writer.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """What a distillation writes, in small: events (via the loop's writer), eval.jsonl, schedule.json, a
    picture, checkpoints, an export, config.json."""
    from safetensors.numpy import save_file

    workdir = tmp_path_factory.mktemp("run")
    rows = {}
    for step in (10, 20, 30):
        scalars = dict(loss=1.0 / step, loss_teacher_0=1.1 / step, loss_teacher_1=0.9 / step, lr=1e-3 * step)
        rows[step] = dict(scalars, img_per_s=100.0, nonfinite_steps_total=1.0, bad_images=2.0)
    _write_events(workdir, rows, images_at=30)
    with open(workdir / "eval.jsonl", "w") as f:
        for step, knn in ((0, 10.0), (30, 50.0)):
            row = {
                "step": step,
                "knn_top1/student": knn,
                "knn_top1/teacher_0": 70.0,
                "knn_top1/teacher_1": 60.0,
                "cka/teacher_0": knn / 100,
                "cka/teacher_1": knn / 120,
            }
            f.write(json.dumps(dict(row, **{"alignment/teacher_0": knn / 60})) + "\n")
        f.write('{"step": 40, "knn_to')  # a line cut short by a kill
    config = {"batch_size": 64, "epochs": 300.0, "teachers": ["demo:mu/4@32:1"]}
    (workdir / "config.json").write_text(json.dumps(config))
    schedule = dict(steps=30, batch_size=64, train_images=640, epochs=3.0, warmup_steps=2, peak_lr=2.5e-4)
    (workdir / "schedule.json").write_text(json.dumps(dict(schedule, min_lr=0.0, started_at_step=0)))
    grid = pictures.pca_grid(
        np.zeros((2, 16, 16, 3), np.uint8), [np.random.default_rng(0).normal(size=(2, 16, 8))] * 2
    )
    for step in (0, 30):
        pictures.save_png(grid, workdir / "pictures" / f"step_{step}.png")
    for step in (20, 30):
        (workdir / "checkpoints" / str(step) / "state").mkdir(parents=True)
        (workdir / "checkpoints" / str(step) / "state" / "data").write_bytes(b"x" * 1000)
    save_file(
        {"w": np.zeros(3, np.float32)}, str(workdir / "student_timm.safetensors"), {"timm_kwargs": "{}"}
    )
    return workdir


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.headings, self.images, self.text, self.tags, self._in = [], [], [], [], None

    def handle_starttag(self, tag, attrs):
        self._in = tag
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        if self._in == "h2":
            self.headings.append(data)
        self.text.append(data)

    @property
    def words(self) -> str:
        return " ".join(" ".join(self.text).split())


def _page(workdir, tmp_path) -> _Page:
    out = tmp_path / "report.html"
    assert report.main([str(workdir), "--out", str(out)]) == 0
    page = _Page()
    page.feed(out.read_text())
    return page


def test_report_has_every_section_and_every_image_decodes(workdir, tmp_path):
    page = _page(workdir, tmp_path)
    assert page.headings == [
        "Summary",
        "Training and evaluation",
        "PCA feature maps at step 30",  # the newest picture
        "Faults",
        "Checkpoints",
        "Exports",
        "Skipped while reading the workdir",
        "Resolved config",
    ]
    titles = [img["alt"] for img in page.images]
    for expected in ("Loss", "Learning rate", "Throughput", "k-NN", "Alignment", "CKA", "PCA"):
        assert any(expected in t for t in titles), (expected, titles)
    assert not any("probe" in t for t in titles)  # no probe metric in this run: no empty plot
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,")  # self-contained: nothing to fetch
        decoded = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        decoded.load()
        assert decoded.size[0] > 50 and decoded.size[1] > 50
    text = page.words
    for expected in (
        "checkpoints/20",
        "checkpoints/30",
        "student_timm.safetensors",
        "timm_kwargs",
        '"batch_size"',
    ):
        assert expected in text, expected
    assert "0.100 (step 0) -> 0.500 (step 30)" in text  # CKA, first and last evaluation
    assert "non-finite steps skipped 1" in text and "unreadable images skipped 2" in text
    # When and how long it ran, and the schedule as run (not the config's 300 epochs).
    assert "started 20" in text and " UTC" in text and "wall time 0h00m" in text
    assert (
        "schedule 30 steps of batch 64 = 3 epochs; warmup 2 steps" in text and "640 training images" in text
    )
    assert "eval.jsonl lines that are not JSON (e.g. cut short by a kill) 1 line 3" in text  # counted


def test_report_reads_the_event_files_without_tensorflow_summaries_api(workdir):
    scalars, spans = workdir_files.read_event_scalars(workdir_files.Workdir(workdir))
    assert [step for step, _ in scalars["loss"]] == [10, 20, 30]
    assert scalars["lr"][-1][1] == pytest.approx(0.03)
    assert "pca_feature_maps" not in scalars  # images are not scalars
    assert len(spans) == 1 and 0 <= spans[0][1] - spans[0][0] < 60


def test_each_teacher_has_one_colour_in_every_plot_and_the_student_another(workdir):
    wd = workdir_files.Workdir(workdir)
    sources = {"train": workdir_files.read_event_scalars(wd)[0], "eval": workdir_files.read_evals(wd)}
    colours: dict[str, set] = {}
    for title, source, tags, ylabel, logy in report.PLOTS["distillation"]:
        series = report._pick(sources[source], tags)
        if not series:
            continue
        figure = report._figure(title, series, ylabel, logy)
        for line in figure.axes[0].get_lines():
            who = line.get_label().rsplit("_", 1)[-1].rsplit("/", 1)[-1]  # 'teacher_0' -> '0', '.../student'
            who = "student" if who == "student" else f"teacher {who}" if who.isdigit() else line.get_label()
            colours.setdefault(who, set()).add(line.get_color())
    assert colours["teacher 0"] == {report.TEACHER_COLOURS[0]} and colours["teacher 1"] == {
        report.TEACHER_COLOURS[1]
    }
    assert colours["student"] == {report.STUDENT_COLOUR}
    assert report.STUDENT_COLOUR not in report.TEACHER_COLOURS


def test_report_of_a_folder_without_a_run_is_a_one_line_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_a_fine_tuning_has_its_own_page(tmp_path):
    workdir = tmp_path / "ft"
    workdir.mkdir()
    config = {"init": "/runs/dmt", "model": {"variant": "mu/4"}, "num_classes": 10, "epochs": 100.0}
    (workdir / "config.json").write_text(json.dumps(config))
    _write_events(workdir, {s: dict(loss=2.0 / s, lr=1e-3, img_per_s=50.0) for s in (5, 10)})
    with open(workdir / "eval.jsonl", "w") as f:
        for step, top1 in ((5, 40.0), (10, 55.0)):
            f.write(json.dumps(dict(step=step, top1=top1, top5=90.0, best_top1=top1, best_step=step)) + "\n")
    page = _page(workdir, tmp_path)
    titles = [img["alt"] for img in page.images]
    assert titles == ["Training loss", "Learning rate", "Throughput", "Validation top-1 and top-5"]
    assert not any("teacher" in t for t in titles + page.headings)
    assert "dmt_jax fine-tuning" in page.words and "best top-1 55.00% (step 10)" in page.words


# ---------------------------------------------------------------- a hostile workdir


def _event_file(path, records: list[bytes]):
    """A TFRecord file of these payloads, with correct CRCs."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    with open(path, "wb") as f:
        for payload in records:
            header = struct.pack("<Q", len(payload))
            f.write(header + struct.pack("<I", masked_crc32c(header)))
            f.write(payload + struct.pack("<I", masked_crc32c(payload)))


def _event(step: int, tag: str, value=None, tensor=None) -> bytes:
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.util import tensor_util

    summary = summary_pb2.Summary()
    entry = summary.value.add(tag=tag)
    if tensor is not None:
        entry.tensor.CopyFrom(tensor_util.make_tensor_proto(np.asarray(tensor, np.float32)))
        entry.metadata.plugin_data.plugin_name = "scalars"
    else:
        entry.simple_value = value
    return event_pb2.Event(step=step, wall_time=1.7e9 + step, summary=summary).SerializeToString()


SCRIPT = "<script>alert(1)</script>"


@pytest.fixture
def hostile(tmp_path):
    """A workdir with every kind of damage and mischief the report must survive."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"teachers": [SCRIPT], "note": SCRIPT}))
    good = [_event(s, "loss", 1.0 / s) for s in (1, 2, 3)] + [
        _event(s, "loss_teacher_0", 0.5) for s in (1, 2)
    ]
    bad = [
        _event(4, "loss", float("nan")),  # a NaN summary
        _event(5, "loss", tensor=[1.0, 2.0, 3.0]),  # not a scalar
        b"\xff\xfe not a protobuf",  # a record that is no event
        _event(6, "loss_teacher_$\\frac{1}{$x", 0.25),  # matplotlib would read it as (broken) mathematics
        _event(7, SCRIPT, 1.0),  # a tag that is HTML
    ]
    _event_file(workdir / "events.out.tfevents.1.host", good + bad)
    damaged = bytearray((workdir / "events.out.tfevents.1.host").read_bytes())
    _event_file(workdir / "events.out.tfevents.2.host", [_event(8, "lr", 0.1), _event(9, "lr", 0.2)])
    corrupt = bytearray((workdir / "events.out.tfevents.2.host").read_bytes())
    corrupt[20] ^= 0xFF  # a flipped bit inside the first record's payload: its CRC no longer matches
    (workdir / "events.out.tfevents.2.host").write_bytes(bytes(corrupt))
    (workdir / "events.out.tfevents.3.host").write_bytes(b"\x00" * 7 + b"garbage" * 10)  # length CRC wrong
    assert damaged
    lines = [
        "[1, 2]",
        '{"step": "five", "knn_top1/student": 1}',
        '{"step": 5, "knn_top1/student": NaN}',
        '{"step": 6, "knn_top1/student": 1e999}',
        '{"step": 7, "knn_top1/student": 10, "knn_top1/teacher_0": "' + SCRIPT.replace('"', "") + '"}',
        '{"step": 8, "knn_top1/student": 20, "knn_top1/' + SCRIPT + '": 3}',
        "{not json",
    ]
    (workdir / "eval.jsonl").write_text("\n".join(lines) + "\n")
    header = json.dumps({"__metadata__": {"timm_kwargs": {"depth": 2}, SCRIPT: SCRIPT}, "w": {
        "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()  # fmt: skip
    (workdir / f"{SCRIPT.replace('/', '')}.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + b"\0" * 4
    )
    (workdir / "broken.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{")  # a header too long
    grid = pictures.pca_grid(np.zeros((1, 8, 8, 3), np.uint8), [np.ones((1, 4, 3))])
    pictures.save_png(grid, workdir / "pictures" / "step_30.png")
    (workdir / "pictures" / "step_40.png").write_bytes(pictures.png_bytes(grid)[:30])  # a short PNG
    (workdir / "checkpoints" / "20").mkdir(parents=True)
    (workdir / "checkpoints" / "20" / "x").write_bytes(b"y" * 100)
    return workdir


def test_a_hostile_workdir_gives_a_page_with_everything_escaped_and_the_damage_counted(hostile, tmp_path):
    out = tmp_path / "report.html"
    assert report.main([str(hostile), "--out", str(out)]) == 0
    text = out.read_text()
    assert "<script" not in text.lower()  # every string from the workdir is escaped, file names included
    assert "&lt;script&gt;alert(1)&lt;script&gt;.safetensors" in text and "&lt;script&gt;alert(1)" in text
    page = _Page()
    page.feed(text)
    assert set(page.tags) <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "div", "figure",
                              "img", "p", "table", "tr", "th", "td", "b", "br", "pre"}  # fmt: skip
    assert "PCA feature maps at step 30" in page.headings  # the short PNG of step 40 is passed over
    words = page.words
    for counted in (
        "corrupt TensorBoard records 3",  # an undecodable record, a flipped bit, a file with a bad length
        "non-finite values (NaN, Inf) 1",
        "non-scalar summaries 1",
        "eval.jsonl lines that are not JSON (e.g. cut short by a kill) 1",
        "eval.jsonl lines without an integer step 2",  # a list, a step that is a string
        "eval.jsonl values that are not finite numbers 3",
        "export metadata of the wrong type (not text) 1",
        "exports with an unreadable header 1",
        "pictures that are not whole PNG files 1 pictures/step_40.png",
    ):
        assert counted in words, counted
    # The loss plot holds the tag with '$' (matplotlib would have failed on it as mathematics).
    assert "Loss, total and per teacher" in [img["alt"] for img in page.images]


def test_links_and_special_files_are_never_followed_nor_waited_on(hostile, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = pictures.png_bytes(np.full((20, 20, 3), 7, np.uint8))  # a local file the page must not leak
    (outside / "secret.png").write_bytes(secret)
    (outside / "big").mkdir()
    (outside / "big" / "data").write_bytes(b"z" * 5_000_000)
    (hostile / "pictures" / "step_99.png").symlink_to(outside / "secret.png")
    (hostile / "checkpoints" / "50").symlink_to(outside / "big")
    (hostile / "events.out.tfevents.9.host").symlink_to(outside / "secret.png")
    os.remove(hostile / "eval.jsonl")
    os.mkfifo(hostile / "eval.jsonl")  # reading it would block forever
    os.mkfifo(hostile / "events.out.tfevents.8.host")
    (hostile / "report.html").symlink_to(outside / "victim.html")  # dangling: must not create it
    (outside / "kept.txt").write_text("precious")
    (hostile / "report.html.old").symlink_to(outside / "kept.txt")

    done = {}
    worker = threading.Thread(target=lambda: done.update(rc=report.main([str(hostile)])), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert done.get("rc") == 0, "the report blocked or failed"
    page_text = (hostile / "report.html").read_text()
    assert not (hostile / "report.html").is_symlink() and not (outside / "victim.html").exists()
    assert (outside / "kept.txt").read_text() == "precious"
    assert base64.b64encode(secret).decode() not in page_text  # the linked picture is not embedded
    assert "PCA feature maps at step 30" in page_text
    page = _Page()
    page.feed(page_text)
    words = page.words
    assert "checkpoints/50" not in words.split("Checkpoints checkpoint size")[1].split("Exports")[0]
    assert "symbolic links (never followed) 5" in words  # 3 in the workdir, 1 in pictures/, 1 in checkpoints/
    assert "special files (FIFO, device, socket) 2" in words


def test_a_read_only_workdir_gets_one_line_and_the_page_can_go_elsewhere(
    workdir, tmp_path, monkeypatch, capsys
):
    from tests.helpers_run import fill_disk_under

    fill_disk_under(monkeypatch, (str(workdir),), code=errno.EROFS)
    assert report.main([str(workdir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: Read-only file system: {workdir}/report.html")
    assert "--out PATH" in err
    assert not [p for p in os.listdir(workdir) if p.startswith(".report.html")]  # no partial file
    assert report.main([str(workdir), "--out", str(tmp_path / "r.html")]) == 0
