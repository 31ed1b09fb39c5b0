"""`dmt-report WORKDIR`: one self-contained HTML page about a run, to open in any browser.

It reads what the run wrote (config.json, the TensorBoard event files, eval.jsonl, pictures/,
checkpoints/, the exports) and shows the resolved config, the training curves (loss in total and
per teacher, lr, img/s), the evaluations against step (k-NN, linear probe, alignment, CKA), the
newest PCA feature maps, the fault counters, checkpoints and exports. Plots are PNGs embedded in
the page (matplotlib), so the file can be mailed or archived alone. TensorFlow is not needed: the
event files are read record by record with TensorBoard's protos.

    dmt-report /path/to/workdir            # writes /path/to/workdir/report.html
    dmt-report /path/to/workdir --out r.html
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import re
import struct
import sys
from collections import defaultdict

from etils import epath

from dmt_jax.errors import UserError

Series = dict[str, list[tuple[int, float]]]  # tag -> [(step, value)], sorted by step


# ---------------------------------------------------------------- reading the workdir


def read_event_scalars(workdir: epath.Path) -> Series:
    """Every scalar in workdir's TensorBoard event files; a later write of a (tag, step) wins (resumes)."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util

    values: dict[str, dict[int, float]] = defaultdict(dict)
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        for record in _records(path.read_bytes()):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    values[value.tag][event.step] = float(value.simple_value)
                elif kind == "tensor" and value.metadata.plugin_data.plugin_name == "scalars":
                    values[value.tag][event.step] = float(tensor_util.make_ndarray(value.tensor))
    return {tag: sorted(points.items()) for tag, points in sorted(values.items())}


def _records(data: bytes):
    """The payloads of a TFRecord file (length, length crc, payload, payload crc); a torn tail is skipped."""
    offset = 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        start, end = offset + 12, offset + 12 + length
        if end + 4 > len(data):
            return
        yield data[start:end]
        offset = end + 4


def read_evals(workdir: epath.Path) -> Series:
    """eval.jsonl as series; a line cut short by a kill is skipped, a repeated step keeps its last line."""
    values: dict[str, dict[int, float]] = defaultdict(dict)
    path = workdir / "eval.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    values[key][int(row["step"])] = float(value)
    return {tag: sorted(points.items()) for tag, points in sorted(values.items())}


def newest_picture(workdir: epath.Path) -> tuple[int, epath.Path] | None:
    found = [(int(m.group(1)), p) for p in (workdir / "pictures").glob("step_*.png")
             if (m := re.fullmatch(r"step_(\d+)\.png", p.name))]  # fmt: skip
    return max(found) if found else None


def checkpoints(workdir: epath.Path) -> list[tuple[str, int]]:
    """(name, bytes) of each checkpoint, numbered steps first, then any set aside as unreadable."""
    out = []
    for folder, pattern in (("checkpoints", r"\d+"), ("checkpoints_unreadable", r".+")):
        entries = [p for p in (workdir / folder).glob("*") if p.is_dir() and re.fullmatch(pattern, p.name)]
        entries.sort(key=lambda p: int(p.name) if p.name.isdigit() else p.name)
        out += [(f"{folder}/{p.name}", _size(p)) for p in entries]
    return out


def exports(workdir: epath.Path) -> list[tuple[str, int, dict]]:
    """(name, bytes, metadata) of each .safetensors export in the workdir."""
    out = []
    for path in sorted(workdir.glob("*.safetensors")):
        out.append((path.name, path.stat().length, safetensors_metadata(path)))
    return out


def safetensors_metadata(path: epath.Path) -> dict[str, str]:
    """The __metadata__ of a safetensors file, read from its JSON header only (8-byte length, header)."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(length, 100_000_000)))
        return dict(header.get("__metadata__", {}))
    except (OSError, ValueError, struct.error) as e:  # a damaged export is listed, not fatal to the report
        return {"error": f"unreadable header: {e}"}


def _size(path: epath.Path) -> int:
    """Bytes in a folder tree (one listing per folder: no recursive glob, which remote filesystems refuse)."""
    return sum(_size(p) if p.is_dir() else p.stat().length for p in path.iterdir())


# ---------------------------------------------------------------- plots


def plot(title: str, series: Series, ylabel: str = "", logy: bool = False) -> str:
    """One matplotlib line plot of several series against step -> a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.0, 3.4), dpi=100)
    for name, points in series.items():
        steps, values = zip(*points, strict=True)
        axes.plot(steps, values, marker="o" if len(points) <= 12 else None, markersize=4, label=name)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    if logy:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pick(series: Series, name: str) -> Series:
    """'loss' -> loss and loss_teacher_k; 'knn_top1/' -> every knn_top1/... tag."""
    prefix = name if name.endswith("/") else name + "_"
    return {tag: pts for tag, pts in series.items() if (tag == name or tag.startswith(prefix)) and pts}


PLOTS = (  # (title, source, tag or tag family, y label, log y)
    ("Loss, total and per teacher", "train", "loss", "loss", True),
    ("Learning rate", "train", "lr", "lr", False),
    ("Throughput", "train", "img_per_s", "images / s", False),
    ("k-NN top-1 (student vs teachers)", "eval", "knn_top1/", "%", False),
    ("Linear probe top-1", "eval", "linear_probe_top1/", "%", False),
    ("Alignment of each head with its teacher", "eval", "alignment/", "mean cosine", False),
    ("Linear CKA, student encoder vs each teacher", "eval", "cka/", "CKA", False),
)


# ---------------------------------------------------------------- the page


def build_report(workdir: str | epath.PathLike) -> str:
    """The HTML page for a run's workdir."""
    workdir = epath.Path(workdir)
    if not (workdir / "config.json").exists() and not list(workdir.glob("events.out.tfevents.*")):
        raise UserError(
            f"{workdir} holds no run (no config.json, no TensorBoard events): pass a run's --workdir"
        )
    config = (
        (workdir / "config.json").read_text() if (workdir / "config.json").exists() else "(no config.json)"
    )
    train, evals = read_event_scalars(workdir), read_evals(workdir)
    sources = {"train": train, "eval": evals}

    parts = [f"<h1>dmt_jax run: {html.escape(str(workdir))}</h1>", _summary(train, evals)]
    parts.append("<h2>Training and evaluation</h2><div class='plots'>")
    for title, source, prefix, ylabel, logy in PLOTS:
        series = _pick(sources[source], prefix)
        if series:
            parts.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,"
                         f"{plot(title, series, ylabel, logy)}'></figure>")  # fmt: skip
    parts.append("</div>")
    picture = newest_picture(workdir)
    if picture:
        step, path = picture
        png = path.read_bytes()
        width = struct.unpack(">I", png[16:20])[0] * 2  # the PNG's IHDR width, shown at twice its size
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f"<h2>PCA feature maps at step {step}</h2><p>Rows: evaluation images. Columns: input, each "
            "teacher, the student. Colours: the first three principal components of the patch tokens.</p>"
            f"<img class='pca' width='{width}' alt='PCA feature maps' src='data:image/png;base64,{data}'>"
        )
    parts.append(_faults(train))
    parts.append(
        _table("Checkpoints", ("checkpoint", "size"), [(n, _mb(b)) for n, b in checkpoints(workdir)])
    )
    rows = [(name, _mb(size), "<br>".join(f"<b>{html.escape(k)}</b>: {html.escape(v)}"
             for k, v in sorted(meta.items()))) for name, size, meta in exports(workdir)]  # fmt: skip
    parts.append(_table("Exports", ("file", "size", "metadata"), rows, escape=False))
    parts.append(f"<h2>Resolved config</h2><pre>{html.escape(config)}</pre>")
    return _PAGE.format(title=html.escape(f"dmt_jax report: {workdir.name}"), body="\n".join(parts))


def _summary(train: Series, evals: Series) -> str:
    rows = []
    if "loss" in train:
        rows.append(("last step", str(train["loss"][-1][0])))
        rows.append(("last loss", f"{train['loss'][-1][1]:.4f}"))
    for tag in sorted(evals):
        first, last = evals[tag][0], evals[tag][-1]
        rows.append((tag, f"{first[1]:.3f} (step {first[0]}) -> {last[1]:.3f} (step {last[0]})"))
    return _table("Summary", ("", "value"), rows)


def _faults(train: Series) -> str:
    def last(tag):
        return int(train[tag][-1][1]) if tag in train else 0

    rows = [
        ("non-finite steps skipped", str(last("nonfinite_steps_total"))),
        ("unreadable images skipped", str(last("bad_images"))),
    ]
    return _table("Faults", ("counter", "count"), rows)


def _table(title: str, header, rows, escape: bool = True) -> str:
    def cell(v):
        return html.escape(str(v)) if escape else str(v)

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    if not rows:
        body = f"<tr><td colspan='{len(header)}'>none</td></tr>"
    return f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>{body}</table>"


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 18px; margin-top: 28px; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 8px; }}
figure {{ margin: 0; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }}
pre {{ background: #f6f6f6; padding: 8px; font-size: 12px; max-height: 480px; overflow: auto; }}
img.pca {{ image-rendering: pixelated; }}
</style></head>
<body>
{body}
</body></html>
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dmt-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="a run's --workdir")
    parser.add_argument("--out", default="", help="where to write the page (default WORKDIR/report.html)")
    args = parser.parse_args(argv)
    try:
        page = build_report(args.workdir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = epath.Path(args.out or epath.Path(args.workdir) / "report.html")
    out.write_text(page)
    print(f"report written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
