"""Test-wide settings: 8 virtual CPU devices (sharding tests) and float32 at highest matmul precision."""

import os

# Must precede the first jax import: sharded tests use a 4 x 2 mesh of virtual CPU devices.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
