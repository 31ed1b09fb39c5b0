"""A GCS JSON API server on localhost (the `gcp-storage-emulator` package) for tests of gs:// paths.

`emulated_bucket()` starts one, in memory, in a thread of the test process, on a free port, with one
bucket, and sets STORAGE_EMULATOR_HOST (only that: dmt_jax derives every other setting from it) plus,
for this process, what dmt_jax.storage.configure_emulator derives. Everything is undone at exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

from helpers_run import free_port

from dmt_jax import storage

BUCKET = "dmt-test"
_DERIVED = (
    "TENSORSTORE_GCS_HTTP_URL",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING",
    "EPATH_USE_TF",
    "FSSPEC_GS_USE_LISTINGS_CACHE",
)


def _send_generation_headers():
    """Real GCS sends an object's generation with its bytes (x-goog-generation); the emulator does not,
    and tensorstore (orbax's OCDBT manifests) refuses a read without it ("Malformed StorageGeneration")."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

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


_PRECONDITION_LOCK = threading.Lock()


def _honour_generation_preconditions():
    """Real GCS writes or deletes an object only if its generation is `ifGenerationMatch` ('0': only if it
    does not exist) and answers 412 otherwise; the emulator ignores the parameter. The workdir lock's
    compare-and-swap needs it (dmt_jax/workdir_lock.py)."""
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    def guarded(original):
        if getattr(original, "honours_preconditions", False):
            return original

        def handler(request, response, storage, *args, **kwargs):
            wanted = request.query.get("ifGenerationMatch")
            if not wanted:
                return original(request, response, storage, *args, **kwargs)
            name = request.params.get("object_id") or (request.query.get("name") or [""])[0]
            with _PRECONDITION_LOCK:  # the check and the write as one step (the server is threaded)
                try:
                    current = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
                except Exception:  # noqa: BLE001 - the emulator's NotFound
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


@contextlib.contextmanager
def emulated_bucket(bucket: str = BUCKET):
    from gcp_storage_emulator.server import create_server

    _send_generation_headers()
    _honour_generation_preconditions()
    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = create_server("localhost", port, in_memory=True, default_bucket=bucket)
    server.start()
    saved = {k: os.environ.get(k) for k in (storage.EMULATOR_VARIABLE, *_DERIVED)}
    os.environ[storage.EMULATOR_VARIABLE] = f"http://localhost:{port}"
    storage.configure_emulator()
    _epath_backend_changed()
    try:
        yield f"gs://{bucket}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _epath_backend_changed()
        server.stop()


def _epath_backend_changed():
    """etils.epath decides once per process whether gs:// goes through TensorFlow (EPATH_USE_TF); a test
    process may have decided before the emulator's settings were made (private: tests only)."""
    from etils.epath import gpath

    gpath._is_tf_installed.cache_clear()


def child_env() -> dict[str, str]:
    """The environment of a run started from a test: STORAGE_EMULATOR_HOST alone, nothing derived."""
    return {k: v for k, v in os.environ.items() if k not in _DERIVED}
