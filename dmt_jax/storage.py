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

One form per path. `resolve` turns what a user typed into the one value every reader and writer of a
run uses: `~` expanded and, on a local disk, every symbolic link and `..` resolved as the kernel does
(`a/link/../b` is the link target's sibling, not `a/b`), so a workdir typed two ways is one workdir
with one lock. A bucket path has no links: its `.`/`..` and doubled slashes are folded lexically.

Nothing is written or read through a link. The workdir is resolved, so a link below it was planted
there: `open_local` opens a file without following links (O_NOFOLLOW), refuses a linked parent folder
and anything that is not a regular file (a FIFO would block forever), and the whole-file writers
write a private temporary file and rename it over the target (a rename replaces a link, never what
it points to). A failed write names the file it was meant to write, whatever library failed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import shutil
import stat
import sys
import tempfile

from etils import epath

from dmt_jax.errors import UserError, error_code

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


REACH_TIMEOUT_S = 30.0  # a bucket that has not answered by then will not (a black-holed host waits forever)


def unreachable_buckets(paths: dict[str, str], timeout: float = REACH_TIMEOUT_S) -> list[str]:
    """One line per bucket among `paths` (what it is -> path; local ones ignored) that fails or does not
    answer within `timeout` seconds, naming it and what to check. The buckets are asked in parallel, each
    by its client's own call (epath's exists()) in a daemon thread, so a client that retries for minutes
    or waits on a silent host cannot hold the run."""
    import threading
    import time

    buckets: dict[str, list[tuple[str, str]]] = {}
    for what, p in paths.items():
        if p and is_remote(p):
            try:
                text = resolve(p, what)
            except UserError:  # no bucket named: the check of that path says so
                continue
            buckets.setdefault(text.split("/", 3)[2], []).append((what, text))
    answers: dict[str, BaseException | None] = {}

    def ask(bucket: str, p: str):
        try:
            epath.Path(p).exists()
            answers[bucket] = None
        except BaseException as e:  # the client's own error, whatever its type: reported below
            answers[bucket] = e

    threads = [
        threading.Thread(target=ask, args=(b, found[0][1]), daemon=True) for b, found in buckets.items()
    ]
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    problems = []
    for bucket, found in buckets.items():
        if bucket not in answers:
            why = f"did not answer within {timeout:g} s"
        elif answers[bucket] is not None:
            error = answers[bucket]
            first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
            why = f"could not be reached ({type(error).__name__}: {first[:200]})"
        else:
            continue
        named = ", ".join(f"{what}={p}" for what, p in found)
        problems.append(f"bucket {bucket} ({named}) {why}: check {_what_to_check()}")
    return problems


def _what_to_check() -> str:
    if host := os.environ.get(EMULATOR_VARIABLE):
        return (
            f"that a GCS emulator answers at {EMULATOR_VARIABLE}={host} (unset it for Google Cloud Storage)"
        )
    return (
        "the credentials (`gcloud auth application-default login`, or GOOGLE_APPLICATION_CREDENTIALS), the "
        f"network and the bucket's name; for a local emulator set {EMULATOR_VARIABLE}"
    )


NAME_MAX = 255  # bytes in one file name (ext4, xfs, NFS, ...)
PATH_MAX = 4096  # bytes in a whole path (Linux)


class LinkRefused(UserError):
    """A file a run would write or read is a symbolic link, or is not a regular file."""


def resolve(p, what: str = "path") -> str:
    """The one form of a path every reader and writer uses (see the module docstring); `what` names
    it in the one-line error for an empty or blank name, or a name too long for the filesystem."""
    text = os.fsdecode(os.fspath(p))
    if not text.strip():
        raise UserError(f"{what} is empty{' (blank)' if text else ''}: give a directory or bucket path")
    if "\0" in text:
        raise UserError(f"{what}={text!r} holds a NUL character: give a plain path")
    if is_remote(text):
        return _resolve_remote(text, what)
    full = os.path.realpath(os.path.expanduser(text))
    for name in full.split(os.sep):
        if len(os.fsencode(name)) > NAME_MAX:
            raise UserError(
                f"{what}={text[:80]}{'...' if len(text) > 80 else ''}: the name {name[:40]}... is "
                f"{len(os.fsencode(name))} bytes; a file name holds at most {NAME_MAX}: choose a shorter one"
            )
    if len(os.fsencode(full)) >= PATH_MAX:
        raise UserError(
            f"{what}={text[:80]}...: the path is {len(os.fsencode(full))} bytes; a path holds at most "
            f"{PATH_MAX - 1}: choose a shorter one"
        )
    return full


def _resolve_remote(text: str, what: str) -> str:
    scheme, rest = text.split("://", 1)
    bucket, _, key = rest.partition("/")
    if not bucket.strip() or not scheme.strip():
        raise UserError(f"{what}={text!r} names no bucket: write it as gs://BUCKET/PATH")
    key = posixpath.normpath("/" + key).lstrip("/") if key.strip("/") else ""
    return f"{scheme}://{bucket}" + (f"/{key}" if key else "")


def resolve_file(p, what: str = "path") -> str:
    """A file's path to write: its folder resolved as `resolve` does, its own name kept (a link there is
    replaced by the writers below, never followed)."""
    text = os.fsdecode(os.fspath(p))
    if is_remote(text) or not text.strip():
        return resolve(text, what)
    folder, name = os.path.split(os.path.expanduser(text))
    if not name.strip() or name in (".", ".."):
        raise UserError(f"{what}={text!r} names a folder, not a file: give a file name")
    if len(os.fsencode(name)) > NAME_MAX:
        raise UserError(
            f"{what}: the name {name[:40]}... is longer than {NAME_MAX} bytes: choose a shorter one"
        )
    return os.path.join(resolve(folder or ".", what), name)


def path(p, what: str = "path") -> epath.Path:
    """`resolve(p)` as an epath.Path (local, or gs://...)."""
    return epath.Path(resolve(p, what))


def _linked_folder(parent: str) -> str:
    """The first folder of `parent` (an absolute local path) that is a symbolic link, or ''."""
    if os.path.realpath(parent) == parent:
        return ""
    current = os.sep
    for name in parent.split(os.sep)[1:]:
        current = os.path.join(current, name)
        if os.path.islink(current):
            return current
    return ""  # a folder that disappeared meanwhile: the open itself says so


def _link_refusal(where: str) -> LinkRefused:
    try:
        to = f" (to {os.readlink(where)})"
    except OSError:
        to = ""
    return LinkRefused(
        f"{where} is a symbolic link{to}: runs never read or write through a link (it may point out of "
        "the workdir); remove it"
    )


def open_local(target, flags: int, mode: int = 0o666) -> int:
    """os.open of a local regular file, never through a link (at the file or a folder above it within
    what was resolved), never blocking on a FIFO or device: LinkRefused names what is in the way."""
    target = os.path.abspath(os.fspath(target))
    if linked := _linked_folder(os.path.dirname(target)):
        raise _link_refusal(linked)
    try:
        fd = os.open(target, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _link_refusal(target) from None
        if e.errno == errno.ENXIO:  # a FIFO opened for writing without a reader
            raise _not_regular(target) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _not_regular(target)
    os.set_blocking(fd, True)
    return fd


def _not_regular(target: str) -> LinkRefused:
    return LinkRefused(f"{target} is not a regular file (a FIFO, device, socket or folder): remove it")


def read_local(target, limit: int | None = None) -> bytes:
    """The bytes of a local regular file (at most `limit`), read without following a link."""
    fd = open_local(target, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        return f.read() if limit is None else f.read(limit)


class WriteFailed(OSError):
    """A write that failed for the machine's state (a full disk, ...), naming the file it was for."""


@contextlib.contextmanager
def named_write_errors(target):
    """A failed write inside becomes an OSError naming `target` (not a temporary file) with its errno,
    whichever library raised it (safetensors and tensorstore wrap the OS error in their own type)."""
    try:
        yield
    except (UserError, WriteFailed):
        raise
    except Exception as e:
        if (code := error_code(e)) is None:
            raise
        raise WriteFailed(code, os.strerror(code), os.fspath(target)) from e


@contextlib.contextmanager
def atomic_local(target):
    """Yields a private temporary path beside a local `target`; renames it over `target` when the body
    ends, else removes it: `target` is whole or untouched, never partial. A link at `target` is replaced,
    never written through; the file gets the mode a plain open would give it."""
    target = os.path.abspath(os.fspath(target))
    folder = os.path.dirname(target)
    if linked := _linked_folder(folder):
        raise _link_refusal(linked)
    with named_write_errors(target):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)[:200]}.tmp-", dir=folder)
        os.close(fd)
        try:
            yield tmp
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def write_bytes(target, data: bytes) -> None:
    """Writes a whole file: atomically and never through a link on a local disk (atomic_local); a
    bucket object is replaced whole anyway."""
    if is_remote(target):
        path(target).write_bytes(data)
        return
    with atomic_local(target) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(target, text: str) -> None:
    """Writes a whole small file (config.json, report.html) as write_bytes does."""
    write_bytes(target, text.encode())


def append_line(target, line: str) -> None:
    """Appends one line to a small log (eval.jsonl), never through a link; a bucket object cannot be
    appended to, so it is rewritten whole (a few lines per evaluation: cheap)."""
    if not is_remote(target):
        with named_write_errors(target):
            fd = open_local(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            with os.fdopen(fd, "a") as f:
                f.write(line + "\n")
        return
    target = path(target)
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
