"""What a run wrote in its workdir, read without trusting it (for dmt-report, dmt_jax/report.py).

Only regular files are read and links are never followed: a link could pull any local file into a
page meant to be mailed, and a FIFO named like an input would block the reader forever. Anything
malformed (a corrupt TensorBoard record, a line that is not JSON, a non-scalar or non-finite value,
metadata of the wrong type, a damaged picture) is skipped and counted by reason in
`Workdir.skipped`, never raised: the report shows those counts.
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
import re
import stat
import struct
from collections import defaultdict

from etils import epath

from dmt_jax import storage

Series = dict[str, list[tuple[int, float]]]  # tag -> [(step, value)], sorted by step
MAX_HEADER = 100_000_000  # bytes of a safetensors JSON header read at most


class Workdir:
    """A run's workdir, read without trusting it: regular files only, links never followed, nothing that
    can block; what is left out is counted by reason in `skipped` (shown on the page)."""

    def __init__(self, workdir):
        self.root = storage.resolve(workdir, "workdir")
        self.remote = storage.is_remote(self.root)
        self.skipped: dict[str, dict[str, None]] = defaultdict(dict)  # reason -> ordered set of items
        self._listings: dict[str, list[tuple[str, str]]] = {}

    def skip(self, why: str, what: str) -> None:
        self.skipped[why][what] = None

    def entries(self, folder: str = "") -> list[tuple[str, str]]:
        """(name, 'file' | 'dir') of a folder's entries, sorted; links and special files are skipped and
        counted, a folder reached through a link is not listed."""
        if folder not in self._listings:
            self._listings[folder] = self._list(folder) if self._is_folder(folder) else []
        return self._listings[folder]

    def _list(self, folder: str) -> list[tuple[str, str]]:
        where = self._join(folder)
        if self.remote:  # a bucket has no links and no special files
            return sorted((p.name, "dir" if p.is_dir() else "file") for p in epath.Path(where).iterdir())
        out = []
        try:
            with os.scandir(where) as listing:
                found = list(listing)
        except OSError as e:
            self.skip("folders that could not be listed", f"{folder or '.'} ({e.strerror})")
            return []
        for entry in found:
            rel = posixpath.join(folder, entry.name)
            if entry.is_symlink():
                self.skip("symbolic links (never followed)", rel)
            elif entry.is_dir(follow_symlinks=False):
                out.append((entry.name, "dir"))
            elif entry.is_file(follow_symlinks=False):
                out.append((entry.name, "file"))
            else:
                self.skip("special files (FIFO, device, socket)", rel)
        return sorted(out)

    def _is_folder(self, folder: str) -> bool:
        """Every part of `folder` below the workdir is a real folder (no link on the way)."""
        if self.remote:
            return epath.Path(self._join(folder)).is_dir()
        where = self.root
        for part in [p for p in folder.split("/") if p]:
            where = os.path.join(where, part)
            try:
                mode = os.lstat(where).st_mode
            except OSError:
                return False
            if stat.S_ISLNK(mode):
                self.skip("symbolic links (never followed)", folder)
                return False
            if not stat.S_ISDIR(mode):
                return False
        return os.path.isdir(self.root)

    def read(self, rel: str, limit: int | None = None) -> bytes | None:
        """A file's bytes (at most `limit`), or None when it is absent or may not be read (counted)."""
        where = self._join(rel)
        if self.remote:
            path = epath.Path(where)
            if not path.is_file():
                return None
            with path.open("rb") as f:
                return f.read() if limit is None else f.read(limit)
        if not self._is_folder(posixpath.dirname(rel)):
            return None
        try:
            return storage.read_local(where, limit)
        except FileNotFoundError:
            return None
        except storage.LinkRefused:
            why = "symbolic links (never followed)" if os.path.islink(where) else "special files"
            self.skip(why + (" (FIFO, device, socket)" if why == "special files" else ""), rel)
        except OSError as e:
            self.skip("files that could not be read", f"{rel} ({e.strerror or e})")
        return None

    def size(self, rel: str) -> int:
        """Bytes of a file, or of a folder tree (links not followed)."""
        where = self._join(rel)
        if self.remote:
            path = epath.Path(where)
            return (
                sum(self.size(posixpath.join(rel, c.name)) for c in path.iterdir())
                if path.is_dir()
                else (path.stat().length)
            )
        mode = os.lstat(where)
        if not stat.S_ISDIR(mode.st_mode):
            return mode.st_size
        return sum(self.size(posixpath.join(rel, name)) for name, _ in self.entries(rel))

    def _join(self, rel: str) -> str:
        return self.root if not rel else f"{self.root}/{rel}"


def read_event_scalars(wd: Workdir) -> tuple[Series, list[tuple[float, float]]]:
    """Every finite scalar in the workdir's TensorBoard event files (a later write of a (tag, step) wins:
    resumes), and the (first, last) wall time of each event file (one per session of the run)."""
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto import event_pb2

    values: dict[str, dict[int, float]] = defaultdict(dict)
    spans = []
    for name, kind in wd.entries():
        if kind != "file" or not name.startswith("events.out.tfevents."):
            continue
        times = []
        for record in _records(wd.read(name) or b"", wd, name):
            try:
                event = event_pb2.Event.FromString(record)
            except DecodeError:
                wd.skip("corrupt TensorBoard records", name)
                continue
            if math.isfinite(event.wall_time) and event.wall_time > 0:
                times.append(event.wall_time)
            for value in event.summary.value:
                if (x := _scalar(value, wd, f"{value.tag} at step {event.step}")) is not None:
                    values[value.tag][event.step] = x
        if times:
            spans.append((min(times), max(times)))
    return {tag: sorted(points.items()) for tag, points in sorted(values.items())}, spans


def _scalar(value, wd: Workdir, where: str) -> float | None:
    """A summary value as a finite float; None for other kinds (images: silently) or bad ones (counted)."""
    from tensorboard.util import tensor_util

    kind = value.WhichOneof("value")
    if kind == "simple_value":
        x = value.simple_value
    elif kind == "tensor" and value.metadata.plugin_data.plugin_name == "scalars":
        try:
            array = tensor_util.make_ndarray(value.tensor)
            if array.size != 1:
                wd.skip("non-scalar summaries", where)
                return None
            x = float(array.reshape(()))
        except (TypeError, ValueError, OverflowError):
            wd.skip("non-scalar summaries", where)
            return None
    else:
        return None
    if not math.isfinite(x):
        wd.skip("non-finite values (NaN, Inf)", where)
        return None
    return x


def _records(data: bytes, wd: Workdir, name: str):
    """The payloads of a TFRecord file (length, length crc, payload, payload crc), each checked against
    its CRC. A torn tail (a run writing now) ends the file quietly; a damaged record is counted."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    offset = 0
    while offset + 12 <= len(data):
        header = data[offset : offset + 8]
        if struct.unpack("<I", data[offset + 8 : offset + 12])[0] != masked_crc32c(header):
            wd.skip("corrupt TensorBoard records", f"{name} (the rest of the file)")
            return  # the length is not to be trusted: nothing after it can be found
        (length,) = struct.unpack("<Q", header)
        start, end = offset + 12, offset + 12 + length
        if end + 4 > len(data):
            return
        payload = data[start:end]
        if struct.unpack("<I", data[end : end + 4])[0] == masked_crc32c(payload):
            yield payload
        else:
            wd.skip("corrupt TensorBoard records", name)
        offset = end + 4


def read_evals(wd: Workdir) -> Series:
    """eval.jsonl as series (a repeated step keeps its last line); lines and values that are not what
    the run writes (not JSON, no integer step, not a finite number) are skipped and counted."""
    values: dict[str, dict[int, float]] = defaultdict(dict)
    text = (wd.read("eval.jsonl") or b"").decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            wd.skip("eval.jsonl lines that are not JSON (e.g. cut short by a kill)", f"line {number}")
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if not _is_int(step) or step < 0:
            wd.skip("eval.jsonl lines without an integer step", f"line {number}")
            continue
        for key, value in row.items():
            if key == "step":
                continue
            try:
                number_ok = _is_number(value) and math.isfinite(float(value))
            except OverflowError:
                number_ok = False
            if number_ok:
                values[key][step] = float(value)
            else:
                wd.skip("eval.jsonl values that are not finite numbers", f"{key} at line {number}")
    return {tag: sorted(points.items()) for tag, points in sorted(values.items())}


def read_json_object(wd: Workdir, name: str) -> tuple[dict, str | None]:
    """(the JSON object in a file, its text) - ({}, None) when absent; ({}, text) when it is not an object
    (counted)."""
    raw = wd.read(name)
    if raw is None:
        return {}, None
    text = raw.decode("utf-8", errors="replace")
    try:
        found = json.loads(text)
    except ValueError:
        found = None
    if not isinstance(found, dict):
        wd.skip("files that are not a JSON object", name)
        return {}, text
    return found, text


def newest_picture(wd: Workdir) -> tuple[int, bytes, int] | None:
    """(step, PNG bytes, width) of the newest readable pictures/step_<N>.png; damaged ones are counted."""
    found = sorted(
        ((int(m.group(1)), name) for name, kind in wd.entries("pictures")
         if kind == "file" and (m := re.fullmatch(r"step_(\d+)\.png", name))),
        reverse=True,
    )  # fmt: skip
    for step, name in found:
        data = wd.read(f"pictures/{name}")
        if data is not None and (width := _png_width(data)):
            return step, data, width
        if data is not None:
            wd.skip("pictures that are not whole PNG files", f"pictures/{name}")
    return None


def _png_width(data: bytes) -> int:
    """The width of a whole, valid PNG (every chunk's CRC checked), else 0."""
    from PIL import Image

    if len(data) < 24 or not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return 0
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            return int(image.size[0])
    except Exception:  # PIL raises many types for a damaged file; any of them means: not shown
        return 0


def checkpoints(wd: Workdir) -> list[tuple[str, int]]:
    """(name, bytes) of each checkpoint, numbered steps first, then any set aside as unreadable."""
    out = []
    for folder, pattern in (("checkpoints", r"\d+"), ("checkpoints_unreadable", r".+")):
        names = [n for n, kind in wd.entries(folder) if kind == "dir" and re.fullmatch(pattern, n)]
        names.sort(key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n))
        out += [(f"{folder}/{n}", wd.size(f"{folder}/{n}")) for n in names]
    return out


def exports(wd: Workdir) -> list[tuple[str, int, dict[str, str]]]:
    """(name, bytes, metadata) of each .safetensors export in the workdir; metadata values are shown as
    text, whatever their type (a wrong one is counted)."""
    out = []
    for name, kind in wd.entries():
        if kind == "file" and name.endswith(".safetensors"):
            out.append((name, wd.size(name), safetensors_metadata(wd, name)))
    return out


def safetensors_metadata(wd: Workdir, name: str) -> dict[str, str]:
    """The __metadata__ of a safetensors file, read from its JSON header only (8-byte length, header)."""
    head = wd.read(name, 8) or b""
    try:
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER:
            raise ValueError(f"a header of {length} bytes")
        header = json.loads((wd.read(name, 8 + length) or b"")[8:])
        metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
        if not isinstance(metadata, dict):
            raise ValueError("__metadata__ is not an object")
    except (ValueError, struct.error) as e:  # a damaged export is listed, not fatal to the report
        wd.skip("exports with an unreadable header", name)
        return {"error": f"unreadable header: {e}"}
    if any(not isinstance(v, str) for v in metadata.values()):
        wd.skip("export metadata of the wrong type (not text)", name)
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
