"""`python -m dmt_jax.storage_emulator --port 9023`: a Google Cloud Storage on localhost for gs:// runs.

The `gcp-storage-emulator` package (the `emulator` extra: `pip install -e '.[emulator]'`) serves GCS's
JSON API from memory (or from --data-dir). Two changes make it serve a run:
- it sends each object's generation with its bytes (`x-goog-generation`), as GCS does; tensorstore
  (orbax's checkpoints) refuses a read without it ("Malformed StorageGeneration"), so under the stock
  emulator the first checkpoint fails;
- a client that hangs up before its answer is written (gcsfs and tensorstore do, on retries and at
  exit) is not a server error: no traceback for each one.

- it honours GCS's generation preconditions (`ifGenerationMatch` on a write or a delete: 412 when the
  object's generation differs, '0' meaning "only if absent"), the compare-and-swap the workdir lock of
  a gs:// workdir is built on (dmt_jax/workdir_lock.py).

It prints one line (where it serves, and the variable a run needs), then serves until Ctrl-C or
SIGTERM. Every process of a run started with `STORAGE_EMULATOR_HOST=http://localhost:PORT` then reads
and writes `gs://BUCKET/...` there (dmt_jax/storage.py derives every other setting from that variable).
`--port 0` picks a free port (the line says which). The tests start it this way (tests/gcs_emulator.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from http import server as http_server

from dmt_jax.errors import UserError

DEFAULT_PORT = 9023  # gcp-storage-emulator's own default
DEFAULT_BUCKET = "dmt"


def _emulator():
    try:
        from gcp_storage_emulator import server
        from gcp_storage_emulator.handlers import buckets, objects
        from gcp_storage_emulator.storage import Storage
    except ImportError as e:
        raise UserError(
            f"the GCS emulator needs the gcp-storage-emulator package ({e}): pip install -e '.[emulator]'"
        ) from e
    return server, buckets, objects, Storage


def _send_generation_headers(server, objects) -> None:
    """Real GCS sends an object's generation with its bytes; the emulator does not (once per process)."""
    original = objects.download
    if getattr(original, "sends_generation", False):
        return

    def download(request, response, storage, *args, **kwargs):
        original(request, response, storage, *args, **kwargs)
        with contextlib.suppress(Exception):  # not found: nothing to add
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]

    download.sends_generation = True
    objects.download = download  # objects.get calls it by name; the route table holds it directly
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler is original:
                handlers[method] = download


def _honour_generation_preconditions(server, objects) -> None:
    """Real GCS writes or deletes an object only if its generation is `ifGenerationMatch` and answers 412
    otherwise; the emulator ignores the parameter (once per process; requests are served one at a time,
    so the check and the write are one step)."""
    from http import HTTPStatus

    def guarded(original):
        if getattr(original, "honours_preconditions", False):
            return original

        def handler(request, response, storage, *args, **kwargs):
            wanted = request.query.get("ifGenerationMatch")
            if wanted:
                name = request.params.get("object_id") or (request.query.get("name") or [""])[0]
                try:
                    current = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
                except Exception:  # noqa: BLE001 - the emulator's NotFound: no object, generation 0
                    current = "0"
                if current != str(wanted[0]):
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    return None
            return original(request, response, storage, *args, **kwargs)

        handler.honours_preconditions = True
        return handler

    for name in ("insert", "delete"):
        original = getattr(objects, name)
        replacement = guarded(original)
        setattr(objects, name, replacement)
        for _, handlers in server.HANDLERS:
            for method, handler in handlers.items():
                if handler is original:
                    handlers[method] = replacement


class _HTTPServer(http_server.HTTPServer):
    """One request at a time (the emulator's storage is not thread-safe), quiet about hang-ups."""

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):  # BrokenPipe, ConnectionReset: the client left
            return
        print(f"storage emulator: request from {client_address[0]} failed: {error!r}", file=sys.stderr)


class Emulator:
    """A started emulator (serving in a thread of this process); `url` is STORAGE_EMULATOR_HOST's value."""

    def __init__(self, host: str = "localhost", port: int = 0, buckets=(DEFAULT_BUCKET,), data_dir=None):
        server, bucket_handlers, objects, Storage = _emulator()
        _send_generation_headers(server, objects)
        _honour_generation_preconditions(server, objects)
        # The emulator logs every request at INFO and each handler failure at ERROR with the request:
        # the failures are answered to the client (which says what failed); the rest is noise.
        logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
        storage = Storage(use_memory_fs=data_dir is None, data_dir=data_dir)
        for name in buckets:
            bucket_handlers.create_bucket(name, storage)
        self.buckets = tuple(buckets)
        self._httpd = _HTTPServer((host, port), functools.partial(server.RequestHandler, storage))
        self.host, self.port = host, self._httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True, name="gcs-emulator")
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _watch_parent(parent: int, stop: threading.Event) -> None:
    """Sets `stop` once the parent is gone (this process is then re-parented: getppid changes)."""
    while not stop.wait(0.5):
        if os.getppid() != parent:
            stop.set()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dmt_jax.storage_emulator",
        description="A GCS emulator on localhost for gs:// paths (checkpoints, teachers, exports).",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0: a free port (default %(default)s)")
    parser.add_argument("--host", default="localhost", help="default %(default)s")
    parser.add_argument(
        "--bucket", action="append", help=f"bucket to create; repeatable (default {DEFAULT_BUCKET})"
    )
    parser.add_argument(
        "--data-dir", default=None, help="keep the objects in this directory (default: in memory)"
    )
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop when the process that started this one ends (tests, benchmarks)",
    )
    args = parser.parse_args(argv)
    buckets = args.bucket or [DEFAULT_BUCKET]
    data_dir = os.path.abspath(args.data_dir) if args.data_dir else None  # the emulator wants it absolute
    try:
        emulator = Emulator(args.host, args.port, buckets, data_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the port is taken, the host unknown
        print(f"error: cannot serve on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.exit_with_parent:
        threading.Thread(target=_watch_parent, args=(os.getppid(), stop), daemon=True).start()
    where = "in memory" if data_dir is None else f"in {data_dir}"
    names = ", ".join(f"gs://{b}" for b in buckets)
    print(
        f"GCS emulator on {emulator.url} ({names}, {where}); for a run: "
        f"export STORAGE_EMULATOR_HOST={emulator.url}",
        flush=True,
    )
    stop.wait()
    emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
