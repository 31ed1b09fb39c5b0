"""`dmt-report WORKDIR`: one self-contained HTML page about a run, to open in any browser.

It reads what the run wrote (config.json, schedule.json, the TensorBoard event files, eval.jsonl,
pictures/, checkpoints/, the exports) and shows when the run ran, its resolved schedule and config,
the training curves, the evaluations against step, the newest PCA feature maps, the fault counters,
checkpoints and exports. A distillation shows the loss in total and per teacher, k-NN, linear probe,
alignment and CKA (each teacher one colour in every plot, the student always blue); a fine-tuning
shows its loss and top-1 / top-5. Plots are PNGs embedded in the page (matplotlib), so the file can
be mailed or archived alone. TensorFlow is not needed: the event files are read record by record
with TensorBoard's protos.

The workdir is read as untrusted input: every string from it is escaped on the page, file names
included; only regular files are read and links are never followed (a link could pull any local
file into a page meant to be mailed; a FIFO would block); anything malformed (a corrupt record, a
line that is not JSON, a non-scalar or non-finite value, metadata of the wrong type, a damaged
picture) is skipped and counted on the page.

    dmt-report /path/to/workdir            # writes /path/to/workdir/report.html
    dmt-report /path/to/workdir --out r.html
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import io
import os
import posixpath
import re
import sys

from dmt_jax import storage
from dmt_jax.errors import UserError, os_error_message
from dmt_jax.workdir_files import (
    Series,
    Workdir,
    checkpoints,
    exports,
    newest_picture,
    read_evals,
    read_event_scalars,
    read_json_object,
)

EXAMPLES = 3  # skipped items named per reason


# ---------------------------------------------------------------- plots

STUDENT_COLOUR = "#1f77b4"  # the student (and a fine-tuned model) is blue in every plot
# Teacher k has TEACHER_COLOURS[k] in every plot: matplotlib's tab10 without the student's blue and grey.
TEACHER_COLOURS = ("#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
OTHER_COLOUR = "#333333"  # a total (the loss over all teachers), lr, throughput


def line_style(tag: str) -> tuple[str, str]:
    """(colour, line style) of a series, fixed by what it measures, never by its order in a plot."""
    if m := re.search(r"teacher_(\d+)$", tag):
        return TEACHER_COLOURS[int(m.group(1)) % len(TEACHER_COLOURS)], "-"
    if tag.endswith("student") or tag in ("top1", "top5"):
        return STUDENT_COLOUR, "--" if tag == "top5" else "-"
    if tag.startswith("ema_"):  # a fine-tuning's EMA weights: the other model of the plot
        return TEACHER_COLOURS[0], "--" if tag.endswith("top5") else "-"
    return OTHER_COLOUR, "-"


def plot(title: str, series: Series, ylabel: str = "", logy: bool = False) -> str:
    """One matplotlib line plot of several series against step -> a base64 PNG."""
    figure = _figure(title, series, ylabel, logy)
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    with _plain_text():
        figure.savefig(buffer, format="png")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(title: str, series: Series, ylabel: str, logy: bool):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with _plain_text():
        figure, axes = plt.subplots(figsize=(6.0, 3.4), dpi=100)
        for name, points in series.items():
            steps, values = zip(*points, strict=True)
            colour, style = line_style(name)
            marker = "o" if len(points) <= 12 else None
            label = name.replace("$", r"\$")  # a tag is shown as written: its '$' starts no mathematics
            axes.plot(steps, values, style, color=colour, marker=marker, markersize=4, label=label)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.set_ylabel(ylabel)
        if logy and all(v > 0 for points in series.values() for _, v in points):
            axes.set_yscale("log")
        axes.grid(alpha=0.3)
        if len(series) > 1:
            axes.legend(fontsize=8)
        figure.tight_layout()
    return figure


def _plain_text():
    """No LaTeX, whatever a matplotlibrc says: the page is drawn the same everywhere."""
    import matplotlib

    return matplotlib.rc_context({"text.usetex": False})


def _pick(series: Series, name: str) -> Series:
    """'loss' -> loss and loss_teacher_k; 'knn_top1/' -> every knn_top1/... tag; 'top1|top5' -> those."""
    if "|" in name:
        return {tag: series[tag] for tag in name.split("|") if series.get(tag)}
    prefix = name if name.endswith("/") else name + "_"
    return {tag: pts for tag, pts in series.items() if (tag == name or tag.startswith(prefix)) and pts}


PLOTS = {  # kind of run -> (title, source, tag or tag family, y label, log y)
    "distillation": (
        ("Loss, total and per teacher", "train", "loss", "loss", True),
        ("Learning rate", "train", "lr", "lr", False),
        ("Throughput", "train", "img_per_s", "images / s", False),
        ("k-NN top-1 (student vs teachers)", "eval", "knn_top1/", "%", False),
        ("Linear probe top-1", "eval", "linear_probe_top1/", "%", False),
        ("Alignment of each head with its teacher", "eval", "alignment/", "mean cosine", False),
        ("Linear CKA, student encoder vs each teacher", "eval", "cka/", "CKA", False),
    ),
    "fine-tuning": (
        ("Training loss", "train", "loss", "loss", True),
        ("Learning rate", "train", "lr", "lr", False),
        ("Throughput", "train", "img_per_s", "images / s", False),
        ("Validation top-1 and top-5", "eval", "top1|top5|ema_top1|ema_top5", "%", False),
    ),
}


# ---------------------------------------------------------------- the page


class _Raw(str):
    """Page markup built here from escaped parts: a table cell that is not escaped again."""


def build_report(workdir: str | os.PathLike) -> str:
    """The HTML page for a run's workdir."""
    wd = Workdir(workdir)
    config, config_text = read_json_object(wd, "config.json")
    train, spans = read_event_scalars(wd)
    if config_text is None and not spans and not train:
        raise UserError(
            f"{wd.root} holds no run (no config.json, no TensorBoard events): pass a run's --workdir"
        )
    evals = read_evals(wd)
    schedule, _ = read_json_object(wd, "schedule.json")
    kind = _kind(config, evals)
    sources = {"train": train, "eval": evals}

    parts = [f"<h1>dmt_jax {kind}: {html.escape(wd.root)}</h1>"]
    parts.append(_summary(kind, train, evals, spans, schedule, wd))
    parts.append("<h2>Training and evaluation</h2><div class='plots'>")
    for title, source, tags, ylabel, logy in PLOTS[kind]:
        if series := _pick(sources[source], tags):
            parts.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,"
                         f"{plot(title, series, ylabel, logy)}'></figure>")  # fmt: skip
    parts.append("</div>")
    if picture := newest_picture(wd):
        step, png, width = picture
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f"<h2>PCA feature maps at step {step}</h2><p>Rows: evaluation images. Columns: input, each "
            "teacher, the student. Colours: the first three principal components of the patch tokens.</p>"
            f"<img class='pca' width='{2 * width}' alt='PCA feature maps' src='data:image/png;base64,{data}'>"
        )  # shown at twice its size: one pixel per patch
    parts.append(_faults(train))
    parts.append(_table("Checkpoints", ("checkpoint", "size"), [(n, _mb(b)) for n, b in checkpoints(wd)]))
    rows = []
    for name, size, meta in exports(wd):
        lines = [f"<b>{html.escape(k)}</b>: {html.escape(v)}" for k, v in sorted(meta.items())]
        cell = _Raw("<br>".join(lines))
        rows.append((name, _mb(size), cell))
    parts.append(_table("Exports", ("file", "size", "metadata"), rows))
    parts.append(_skipped(wd))
    shown = config_text if config_text is not None else "(no config.json)"
    parts.append(f"<h2>Resolved config</h2><pre>{html.escape(shown)}</pre>")
    title = html.escape(f"dmt_jax report: {posixpath.basename(wd.root)}")
    return _PAGE.format(title=title, body="\n".join(parts))


def _kind(config: dict, evals: Series) -> str:
    if "teachers" in config:
        return "distillation"
    if "init" in config or "num_classes" in config or "top1" in evals:
        return "fine-tuning"
    return "distillation"


def _summary(kind: str, train: Series, evals: Series, spans, schedule: dict, wd: Workdir) -> str:
    rows = []
    if spans:
        first, last = min(s for s, _ in spans), max(e for _, e in spans)
        wall = sum(e - s for s, e in spans)
        rows.append(("started", _date(first)))
        rows.append(("last written", _date(last)))
        sessions = f" in {len(spans)} sessions (resumes)" if len(spans) > 1 else ""
        rows.append(("wall time", _duration(wall) + sessions))
    if schedule:
        rows.append(("schedule", _schedule(schedule, wd)))
    if "loss" in train:
        rows.append(("last step", str(train["loss"][-1][0])))
        rows.append(("last loss", f"{train['loss'][-1][1]:.4f}"))
    if kind == "fine-tuning" and "top1" in evals:
        best_step, best = max(evals["top1"], key=lambda point: (point[1], -point[0]))
        rows.append(("best top-1", f"{best:.2f}% (step {best_step})"))
    for tag in sorted(evals):
        if tag.startswith("best_"):  # a running maximum and its step: not a measurement of its own
            continue
        first, last = evals[tag][0], evals[tag][-1]
        rows.append((tag, f"{first[1]:.3f} (step {first[0]}) -> {last[1]:.3f} (step {last[0]})"))
    return _table("Summary", ("", "value"), rows)


def _schedule(s: dict, wd: Workdir) -> str:
    """schedule.json as the run's start-up summary said it (summary.describe_schedule)."""
    from dmt_jax.summary import describe_schedule

    try:
        text = describe_schedule(s).removeprefix("schedule: ")
        return text + f" ({s['train_images']:,} training images)"
    except (KeyError, TypeError, ValueError):
        wd.skip("files that are not what the run writes", "schedule.json")
        return "(schedule.json unreadable)"


def _date(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def _faults(train: Series) -> str:
    def last(tag):
        return int(train[tag][-1][1]) if tag in train else 0

    rows = [
        ("non-finite steps skipped", str(last("nonfinite_steps_total"))),
        ("unreadable images skipped", str(last("bad_images"))),
    ]
    return _table("Faults", ("counter", "count"), rows)


def _skipped(wd: Workdir) -> str:
    """What the report left out of this page, and why: never silently."""
    rows = []
    for why, items in sorted(wd.skipped.items()):
        names = list(items)
        more = f" and {len(names) - EXAMPLES} more" if len(names) > EXAMPLES else ""
        rows.append((why, str(len(names)), ", ".join(names[:EXAMPLES]) + more))
    return _table("Skipped while reading the workdir", ("reason", "count", "examples"), rows)


def _table(title: str, header, rows) -> str:
    def cell(v):
        return v if isinstance(v, _Raw) else html.escape(str(v))

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
        if unreachable := storage.unreachable_buckets({"workdir": args.workdir}):
            raise UserError(*unreachable)
        page = build_report(args.workdir)
        out = storage.resolve_file(args.out or f"{storage.resolve(args.workdir)}/report.html", "--out")
        storage.write_text(out, page)  # whole or not at all; a link at `out` is replaced, not followed
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full workdir: the page can go elsewhere
        print(f"error: {os_error_message(e)}; or write the page elsewhere with --out PATH", file=sys.stderr)
        return 1
    print(f"report written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
