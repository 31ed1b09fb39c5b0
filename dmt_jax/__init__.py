"""dmt_jax: DMT multi-teacher distillation of self-supervised ViTs in JAX/Flax."""

import logging
import os

# Before anything imports TensorFlow (the input pipeline, TensorBoard writers): no start-up chatter.
# oneDNN's notice (and absl's "All log messages before absl::InitializeLog()" line with it) goes when
# its ops are off; the input pipeline only decodes and resizes, where they change nothing but the bits.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _FontCacheNotice(logging.Filter):
    """matplotlib (imported by Keras, with TensorFlow) says when it builds its font cache, once per
    machine: 'generated new fontManager' or 'Matplotlib is building the font cache'. Not the run's news."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not message.startswith(("generated new fontManager", "Matplotlib is building the font cache"))


logging.getLogger("matplotlib.font_manager").addFilter(_FontCacheNotice())

# STORAGE_EMULATOR_HOST (a local GCS emulator) is the one setting gs:// paths need: each storage layer's
# own setting is derived from it here, before any of them is imported (dmt_jax/storage.py).
from dmt_jax import storage as _storage  # noqa: E402

_storage.configure_emulator()

__version__ = "0.1.0"
