"""Helpers for the tests that run `python -m dmt_jax.main` (resilience, multi-process, command line).

A tiny demo run (two random-weight teachers, a /4 student, 80 generated images, no evaluation) takes
about 15 s on 2 cores, nearly all of it imports and compiles; `Run` starts one in the background,
waits for a line of its output, sends it a signal; the readers look at what it left in its workdir.
"""

from __future__ import annotations

import builtins
import errno
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Start-up chatter of TensorFlow, XLA and gloo: not the run's own output.
NOISE = re.compile(r"oneDNN|absl::InitializeLog|cpu_feature_guard|To enable the following|\[Gloo\]|^\s*$")

TINY = {
    "teachers": "('random:mu/4@32:1','random:mu/8@64:2')",
    "total_steps": 12,
    "batch_size": 16,
    "checkpoint_every": 4,
    "log_every": 2,
    "evaluate": False,
    "export_at_end": False,
    "log_example_ids": True,
    "data.demo_per_class_train": 8,
    "data.demo_per_class_val": 4,
}


def tiny_fields(demo_root, **overrides) -> dict:
    """The config fields of a tiny demo run; overrides use '__' for '.' (data__demo_root=...)."""
    fields = dict(TINY, **{"data.demo_root": str(demo_root)})
    fields.update({k.replace("__", "."): v for k, v in overrides.items()})
    return fields


def cli_args(workdir, demo_root, **overrides) -> list[str]:
    fields = tiny_fields(demo_root, **overrides)
    return [f"--config={REPO / 'configs' / 'demo.py'}", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in fields.items()
    ]


def tiny_config(demo_root, **overrides):
    """The same run as cli_args, as a config object for in-process runs of loop.train_and_evaluate."""
    import runpy

    config = runpy.run_path(str(REPO / "configs" / "demo.py"))["get_config"]()
    for dotted, value in tiny_fields(demo_root, **overrides).items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = _literal(value) if isinstance(value, str) else value
    return config


FINETUNE_TINY = {
    "init": "",
    "total_steps": 16,
    "batch_size": 16,
    "checkpoint_every": 4,
    "log_every": 2,
    "eval_every": 0,
    "eval_batch_size": 40,
    "export_at_end": False,
    "data.demo_per_class_train": 8,
    "data.demo_per_class_val": 4,
}


def finetune_args(workdir, demo_root, **overrides) -> list[str]:
    """A tiny fine-tuning of configs/finetune_demo.py (random init); overrides use '__' for '.'."""
    fields = dict(FINETUNE_TINY, **{"data.demo_root": str(demo_root)})
    fields.update({k.replace("__", "."): v for k, v in overrides.items()})
    return [f"--config={REPO / 'configs' / 'finetune_demo.py'}", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in fields.items()
    ]


def finetune_config(demo_root, **overrides):
    """The run of finetune_args as a config object, for in-process runs of finetune.finetune."""
    import runpy

    config = runpy.run_path(str(REPO / "configs" / "finetune_demo.py"))["get_config"]()
    fields = dict(FINETUNE_TINY, **{"data.demo_root": str(demo_root)})
    fields.update({k.replace("__", "."): v for k, v in overrides.items()})
    for dotted, value in fields.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _literal(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run_env(devices: int = 8, base: dict | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        JAX_DEFAULT_MATMUL_PRECISION="highest",  # as tests/conftest.py sets for in-process runs
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return env


class Run:
    """`python -m dmt_jax.main ARGS` in the background, stdout and stderr merged, read line by line."""

    def __init__(self, args, devices: int = 8, module: str = "dmt_jax.main", env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=run_env(devices, env),  # env: instead of os.environ
            cwd=str(REPO),
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 180) -> str:
        """The first new line matching pattern; fails if the run ends or the time runs out first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r} within {timeout}s:\n{self.output}"
                ) from None
            if line is None:
                raise AssertionError(f"run ended before a line matching {pattern!r}:\n{self.output}")
            self.lines.append(line)
            if re.search(pattern, line):
                return line

    def send(self, sig: int):
        self.proc.send_signal(sig)

    def finish(self, timeout: float = 240) -> int:
        """Waits for the end; returns the exit code."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self._drain()
            raise AssertionError(f"run did not end within {timeout}s:\n{self.output}") from None
        self._drain()
        return rc

    def kill(self):
        """Ends the run now (its lines so far stay in `output`)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._drain()

    def _drain(self):
        try:
            while (line := self._queue.get(timeout=30)) is not None:
                self.lines.append(line)
        except queue.Empty:
            pass

    @property
    def output(self) -> str:
        return "\n".join(line for line in self.lines if not NOISE.search(line))


def run_all(*runs: Run, timeout: float = 240) -> list[int]:
    return [r.finish(timeout) for r in runs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def checkpoint_steps(workdir) -> list[int]:
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def read_state(workdir, step: int | None = None) -> dict:
    """The train state of a checkpoint (default: the newest) as numpy arrays, on no particular mesh."""
    import orbax.checkpoint as ocp

    step = checkpoint_steps(workdir)[-1] if step is None else step
    path = Path(workdir) / "checkpoints" / str(step) / "state"
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax warns that the item has no step metadata of its own
    try:
        reader = ocp.PyTreeCheckpointer()
        tree = reader.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    finally:
        absl_logger.setLevel(level)


def example_ids(workdir, process: int = 0) -> dict[int, list[int]]:
    """step -> ids from workdir/example_ids.p{process}.jsonl; for a step written twice the later line wins."""
    import json

    out = {}
    for line in (Path(workdir) / f"example_ids.p{process}.jsonl").read_text().splitlines():
        entry = json.loads(line)
        out[entry["step"]] = entry["ids"]
    return out


def scalars(workdir) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from every TensorBoard event file in workdir."""
    import tensorflow as tf

    out: dict[str, dict[int, float]] = {}
    for path in sorted(Path(workdir).glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    return out


def without_key_bias(tree):
    """Zeroes the key third of every qkv bias (and of its Adam moments): its true gradient is exactly 0
    and Adam turns the rounding noise into +-lr steps that depend on summation order (tests/test_train.py)."""

    def one(path, x):
        x = np.asarray(x)
        name = jax.tree_util.keystr(path)
        if "qkv" in name and name.endswith("['bias']"):
            x = x.copy()
            third = x.shape[-1] // 3
            x[..., third : 2 * third] = 0
        return x

    return jax.tree_util.tree_map_with_path(one, tree)


def max_rel_err(a, b) -> float:
    """Largest per-tensor max|a - b| / max|b|, the key bias left out."""
    a, b = without_key_bias(a), without_key_bias(b)
    errs = jax.tree.map(lambda x, y: float(np.abs(x - y).max() / (np.abs(y).max() + 1e-30)), a, b)
    return max(jax.tree.leaves(errs))


def trees_equal(a, b) -> bool:
    return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))


def send_after(run: Run, pattern: str, sig: int = signal.SIGTERM) -> str:
    line = run.wait_for(pattern)
    run.send(sig)
    return line


def fill_disk_under(monkeypatch, prefixes: tuple[str, ...], code: int = errno.ENOSPC):
    """Every file opened for writing under one of these path prefixes fails with ENOSPC (a full disk; or
    another errno: EROFS for a read-only one); reads and writes elsewhere go through. orbax writes its
    metadata through Python's open."""
    real_open = builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        if isinstance(file, str | os.PathLike) and str(file).startswith(prefixes) and set(mode) & set("wax+"):
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
