"""Paths that may be local or in a bucket (gs://...), and the one switch that points them at an emulator.

Every path a run touches (workdir, checkpoints, teacher directories, exports, tfds data_dir) goes
through `etils.epath.Path`, never os.path (which turns "gs://b/x" into "<cwd>/gs:/b/x"). Orbax writes
checkpoints through tensorstore; the rest goes through epath.

`STORAGE_EMULATOR_HOST=http://localhost:PORT` (the variable Google's own clients honour) is the only
setting a run against a local GCS emulator needs; `configure_emulator` derives each layer's own
setting from it, once, before any of them is used (dmt_jax.main calls it first):
- tensorstore (orbax's array data): TENSORSTORE_GCS_HTTP_URL, and a dummy GOOGLE_AUTH_TOKEN_FOR_TESTING
  so that it asks no credential server;
- etils.epath (orbax's directories and metadata, everything else): EPATH_USE_TF=false, so gs:// goes
  through gcsfs, which honours STORAGE_EMULATOR_HOST itself (with FSSPEC_GS_USE_LISTINGS_CACHE=false:
  other processes write to the bucket too). TensorFlow's own GCS filesystem has its
  endpoint compiled in (https://www.googleapis.com/storage/v1/) and cannot be pointed at an emulator;
  under an emulator, TensorBoard events are written locally and copied at the end (EventsDir).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile

from etils import epath

EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"


def configure_emulator(environ=None) -> str:
    """Derives tensorstore's and epath's settings from STORAGE_EMULATOR_HOST; returns the host or ''."""
    env = os.environ if environ is None else environ
    host = env.get(EMULATOR_VARIABLE, "")
    if not host:
        return ""
    if "://" not in host:  # Google's clients accept a bare host:port
        host = f"http://{host}"
    env.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
    env.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    env.setdefault("EPATH_USE_TF", "false")
    # Other processes write to the same bucket (checkpoints of a multi-host run): no cached listings.
    env.setdefault("FSSPEC_GS_USE_LISTINGS_CACHE", "false")
    if "fsspec.config" in sys.modules:  # fsspec reads FSSPEC_* when imported: already done here
        sys.modules["fsspec.config"].conf.setdefault("gs", {})["use_listings_cache"] = False
    # gcsfs looks for credentials (none: the emulator needs none) and warns each time it finds none.
    for name in ("gcsfs", "google.auth._default"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return host


def is_remote(path) -> bool:
    return "://" in os.fspath(path)


def path(p) -> epath.Path:
    """A local path made absolute (and ~ expanded), or a bucket path kept as it is."""
    text = os.fspath(p)
    return epath.Path(text) if is_remote(text) else epath.Path(os.path.abspath(os.path.expanduser(text)))


def write_text(target, text: str) -> None:
    """Writes a whole small file (config.json): atomically on a local disk; a bucket object is
    replaced whole anyway."""
    target = path(target)
    if is_remote(target):
        target.write_text(text)
        return
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    tmp.replace(target)


def append_line(target, line: str) -> None:
    """Appends one line to a small log (eval.jsonl); a bucket object cannot be appended to, so it is
    rewritten whole (a few lines per evaluation: cheap)."""
    target = path(target)
    if not is_remote(target):
        with open(target, "a") as f:
            f.write(line + "\n")
        return
    old = target.read_text() if target.exists() else ""
    target.write_text(old + line + "\n")


def move_tree(src, dst) -> None:
    """Moves a directory; in a bucket (no directories, no rename) its objects are copied, then deleted."""
    src, dst = path(src), path(dst)
    if not is_remote(src):
        shutil.move(os.fspath(src), os.fspath(dst))
        return
    for f in files_under(src):
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f.read_bytes())
    src.rmtree()


def files_under(root) -> list[epath.Path]:
    """Every file below a directory, local or in a bucket (epath's walk() loses the gs:// prefix)."""
    found = []
    for child in path(root).iterdir():
        found += files_under(child) if child.is_dir() else [child]
    return found


class EventsDir:
    """Where TensorBoard events go. TensorFlow writes gs:// itself, but its GCS client cannot be pointed
    at an emulator: under STORAGE_EMULATOR_HOST a bucket workdir's events are written to a local
    directory (`local`) and copied to the bucket by sync()/close(). Otherwise `local` is the workdir.
    """

    def __init__(self, target):
        self.target = path(target)
        self.remote = is_remote(self.target) and bool(os.environ.get(EMULATOR_VARIABLE))
        self.local = tempfile.mkdtemp(prefix="dmt_events_") if self.remote else os.fspath(self.target)

    def sync(self) -> None:
        if not self.remote:
            return
        for name in os.listdir(self.local):
            src = os.path.join(self.local, name)
            if os.path.isfile(src):
                with open(src, "rb") as f:
                    (self.target / name).write_bytes(f.read())

    def close(self) -> None:
        self.sync()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
