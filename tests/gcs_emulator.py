"""A GCS on localhost for tests of gs:// paths: the README's command `python -m dmt_jax.storage_emulator`.

`emulated_bucket()` starts it in its own process, in memory, on a free port, with one bucket, and sets
STORAGE_EMULATOR_HOST (only that: dmt_jax derives every other setting from it) plus, for this
process, what dmt_jax.storage.configure_emulator derives. Everything is undone at exit.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import subprocess
import sys
import threading

from dmt_jax import storage

BUCKET = "dmt-test"
_DERIVED = (
    "TENSORSTORE_GCS_HTTP_URL",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING",
    "EPATH_USE_TF",
    "FSSPEC_GS_USE_LISTINGS_CACHE",
)


class EmulatorProcess:
    """`python -m dmt_jax.storage_emulator --port 0 --bucket BUCKET` in the background; `url` from its
    first line; what it prints afterwards is kept (the last lines) for a failing test to show."""

    def __init__(self, bucket: str = BUCKET, timeout: float = 60):
        self.proc = subprocess.Popen(
            # --exit-with-parent: a test or bench killed by a timeout leaves no emulator serving on
            [
                sys.executable,
                "-m",
                "dmt_jax.storage_emulator",
                "--port",
                "0",
                "--bucket",
                bucket,
                "--exit-with-parent",
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        first = self._first_line(timeout)
        found = re.search(r"STORAGE_EMULATOR_HOST=(\S+)", first)
        if not found:
            self.stop()
            raise RuntimeError(f"the storage emulator did not start: {first!r}")
        self.url = found.group(1)
        self.output: collections.deque = collections.deque(maxlen=200)
        threading.Thread(target=self._drain, daemon=True).start()

    def _first_line(self, timeout: float) -> str:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return lines[0] if lines else f"nothing within {timeout} s"

    def _drain(self):
        for line in self.proc.stdout:
            self.output.append(line.rstrip("\n"))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class StockEmulator:
    """gcp-storage-emulator as it ships (no generation headers), in a thread of this process: what a user
    gets from `gcp-storage-emulator start`, for the test of the message that names it."""

    def __init__(self, bucket: str):
        from gcp_storage_emulator.handlers import objects
        from gcp_storage_emulator.server import create_server
        from helpers_run import free_port

        assert not getattr(objects.download, "sends_generation", False), "patched in this process"
        logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
        port = free_port()
        self.server = create_server("localhost", port, in_memory=True, default_bucket=bucket)
        self.server.start()
        self.url = f"http://localhost:{port}"

    def stop(self):
        self.server.stop()


@contextlib.contextmanager
def emulated_bucket(bucket: str = BUCKET, stock: bool = False):
    """gs://BUCKET on dmt_jax.storage_emulator (stock=True: on gcp-storage-emulator as it ships)."""
    emulator = StockEmulator(bucket) if stock else EmulatorProcess(bucket)
    saved = {k: os.environ.get(k) for k in (storage.EMULATOR_VARIABLE, *_DERIVED)}
    os.environ[storage.EMULATOR_VARIABLE] = emulator.url
    for k in _DERIVED:  # derived from an earlier emulator (configure_emulator keeps values it finds)
        os.environ.pop(k, None)
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
        emulator.stop()


def _epath_backend_changed():
    """etils.epath decides once per process whether gs:// goes through TensorFlow (EPATH_USE_TF); a test
    process may have decided before the emulator's settings were made (private: tests only)."""
    from etils.epath import gpath

    gpath._is_tf_installed.cache_clear()


def child_env() -> dict[str, str]:
    """The environment of a run started from a test: STORAGE_EMULATOR_HOST alone, nothing derived."""
    return {k: v for k, v in os.environ.items() if k not in _DERIVED}
