"""gs:// failures end within a bounded time in one line naming the bucket and what to check (issue 18,
item 8): a host that refuses connections, one that accepts them and never answers (a client would wait
for it forever), and no emulator where one was meant."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from dmt_jax import storage, validate
from dmt_jax.errors import UserError
from tests.helpers_run import Run, cli_args, free_port


@contextlib.contextmanager
def silent_host():
    """host:port of a socket that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("localhost", 0))
    server.listen(64)
    try:
        yield f"http://localhost:{server.getsockname()[1]}"
    finally:
        server.close()


def point_at(monkeypatch, host: str):
    """STORAGE_EMULATOR_HOST=host and what configure_emulator derives, all undone after the test (the
    derived variables too: a later test's emulator must not inherit this host)."""
    monkeypatch.setenv(storage.EMULATOR_VARIABLE, host)
    for name in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "EPATH_USE_TF",
                 "FSSPEC_GS_USE_LISTINGS_CACHE"):  # fmt: skip
        monkeypatch.setenv(name, "")  # remembers the value before (or its absence) for the undo
        monkeypatch.delenv(name)
    storage.configure_emulator()


@pytest.fixture
def no_answer(monkeypatch):
    with silent_host() as host:
        point_at(monkeypatch, host)
        from etils.epath import gpath

        gpath._is_tf_installed.cache_clear()  # epath decides its gs:// backend once per process
        yield host
        gpath._is_tf_installed.cache_clear()


def test_buckets_that_do_not_answer_are_named_within_the_bound(no_answer):
    from tests.helpers_run import tiny_config

    config = tiny_config("/tmp/unused", teachers="('gs://teachers-bucket/mae','random:mu/8@64:2')")
    start = time.monotonic()
    problems = validate.bucket_problems(config, "gs://runs-bucket/w", timeout=3.0)
    assert time.monotonic() - start < 10  # both asked at once, neither waited for beyond the bound
    assert len(problems) == 2
    for bucket, named in (("runs-bucket", "--workdir=gs://runs-bucket/w"),
                          ("teachers-bucket", "--config.teachers[0]=gs://teachers-bucket/mae")):  # fmt: skip
        line = next(p for p in problems if f"bucket {bucket} " in p)
        assert named in line and "did not answer within 3 s" in line and "\n" not in line
        assert f"check that a GCS emulator answers at STORAGE_EMULATOR_HOST={no_answer}" in line


def test_a_fine_tuning_names_a_silent_bucket_of_its_init_in_one_line(no_answer, monkeypatch, tmp_path):
    import runpy

    from dmt_jax.finetune import cli
    from tests.helpers_run import REPO

    monkeypatch.setattr(storage, "REACH_TIMEOUT_S", 3.0)
    config = runpy.run_path(str(REPO / "configs" / "finetune_demo.py"))["get_config"]()
    config.init = "gs://students-bucket/run"
    config.data.demo_root = str(tmp_path / "demo")
    start = time.monotonic()
    with pytest.raises(UserError) as raised:
        cli.check_run(config, str(tmp_path / "ft"))
    assert time.monotonic() - start < 10
    (line,) = [p for p in raised.value.problems if "students-bucket" in p]
    assert line.startswith("bucket students-bucket (--config.init=gs://students-bucket/run) did not answer")


def test_a_refused_connection_is_named_with_the_clients_error(monkeypatch):
    point_at(monkeypatch, f"http://localhost:{free_port()}")  # nobody listens
    from etils.epath import gpath

    gpath._is_tf_installed.cache_clear()
    try:
        problems = storage.unreachable_buckets({"--workdir": "gs://b/w"}, timeout=5)
    finally:
        gpath._is_tf_installed.cache_clear()
    assert len(problems) == 1 and problems[0].startswith("bucket b (--workdir=gs://b/w) ")
    assert "could not be reached" in problems[0] or "did not answer" in problems[0]


def test_without_an_emulator_the_line_says_what_to_check(monkeypatch):
    monkeypatch.delenv(storage.EMULATOR_VARIABLE, raising=False)
    assert "gcloud auth application-default login" in storage._what_to_check()
    assert "STORAGE_EMULATOR_HOST" in storage._what_to_check()


def test_a_run_on_a_silent_bucket_ends_in_one_line(tmp_path):
    with silent_host() as host:
        start = time.monotonic()
        run = Run(
            cli_args("gs://runs-bucket/w", tmp_path / "demo"),
            devices=1,
            env={**_env(), "STORAGE_EMULATOR_HOST": host},
        )
        assert run.finish(timeout=300) == 2
        took = time.monotonic() - start
    errors = [line for line in run.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in run.output, run.output
    assert errors[0].startswith(
        "error: bucket runs-bucket (--workdir=gs://runs-bucket/w) did not answer within 30 s"
    )
    assert took < 30 + 60  # the bound, plus the start-up of a run on a shared 2-core machine


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"}


def test_an_unusable_bucket_path_is_one_line():
    with pytest.raises(UserError, match="names no bucket"):
        storage.resolve("gs://", "--workdir")
