"""Test-wide settings: 8 virtual CPU devices (sharding tests) and float32 at highest matmul precision."""

import os

# Must precede the first jax import: sharded tests use a 4 x 2 mesh of virtual CPU devices.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# PyTorch's stack (timm -> torch._dynamo -> triton) loads here, before any test module imports
# TensorFlow: triton imported after TensorFlow has run segfaults the process, and which module is
# collected first changes as test files come and go.
import timm  # noqa: E402, F401
import torch._dynamo  # noqa: E402, F401

jax.config.update("jax_default_matmul_precision", "highest")
