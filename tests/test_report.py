"""dmt-report: the page of a run's workdir has every section, and every embedded image decodes."""

from __future__ import annotations

import base64
import html.parser
import io
import json

import numpy as np
import pytest
from PIL import Image

from dmt_jax import pictures, report


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """What a run writes, in small: events (via the loop's writer), eval.jsonl, a picture, checkpoints,
    an export, config.json."""
    from clu import metric_writers
    from safetensors.numpy import save_file

    workdir = tmp_path_factory.mktemp("run")
    writer = metric_writers.create_default_writer(str(workdir))
    for step in (10, 20, 30):
        scalars = dict(loss=1.0 / step, loss_teacher_0=1.1 / step, loss_teacher_1=0.9 / step, lr=1e-3 * step)
        writer.write_scalars(step, dict(scalars, img_per_s=100.0, nonfinite_steps_total=1.0, bad_images=2.0))
    writer.write_images(30, {"pca_feature_maps": np.zeros((1, 8, 8, 3), np.uint8)})
    writer.flush()
    writer.close()
    with open(workdir / "eval.jsonl", "w") as f:
        for step, knn in ((0, 10.0), (30, 50.0)):
            row = {
                "step": step,
                "knn_top1/student": knn,
                "knn_top1/teacher_0": 70.0,
                "cka/teacher_0": knn / 100,
            }
            f.write(json.dumps(dict(row, **{"alignment/teacher_0": knn / 60})) + "\n")
        f.write('{"step": 40, "knn_to')  # a line cut short by a kill
    (workdir / "config.json").write_text(json.dumps({"batch_size": 64, "teachers": ["demo:mu/4@32:1"]}))
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
        self.headings, self.images, self.text, self._in = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self._in = tag
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        if self._in == "h2":
            self.headings.append(data)
        self.text.append(data)


def test_report_has_every_section_and_every_image_decodes(workdir, tmp_path):
    out = tmp_path / "report.html"
    assert report.main([str(workdir), "--out", str(out)]) == 0
    page = _Page()
    page.feed(out.read_text())
    assert page.headings == [
        "Summary",
        "Training and evaluation",
        "PCA feature maps at step 30",  # the newest picture
        "Faults",
        "Checkpoints",
        "Exports",
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
    text = " ".join(page.text)
    for expected in (
        "checkpoints/20",
        "checkpoints/30",
        "student_timm.safetensors",
        "timm_kwargs",
        '"batch_size"',
    ):
        assert expected in text, expected
    assert "0.100 (step 0) -> 0.500 (step 30)" in text  # CKA, first and last evaluation
    assert "non-finite steps skipped 1" in " ".join(text.split())
    assert "unreadable images skipped 2" in " ".join(text.split())


def test_report_reads_the_event_files_without_tensorflow_summaries_api(workdir):
    scalars = report.read_event_scalars(workdir)
    assert [step for step, _ in scalars["loss"]] == [10, 20, 30]
    assert scalars["lr"][-1][1] == pytest.approx(0.03)
    assert "pca_feature_maps" not in scalars  # images are not scalars


def test_report_of_a_folder_without_a_run_is_a_one_line_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
