"""The distillation objective: DMT's (the default, objective/dmt.py) and the agglomerative options.

`from dmt_jax import objective` keeps giving DMT's functions (objective.keep_indices, objective.Heads,
objective.distill_loss, ...), as before the package existed. The agglomerative objective (summary and
dense targets per teacher, keyed by teacher name) is built from the modules beside it:
align (grid resampling), heads (adaptors), normalize (none | layernorm | standardize | phi_s),
losses, dropping (UNIC's teacher dropping) and agglomerative (the targets and the loss).
"""

from dmt_jax.objective.dmt import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Heads,
    Student,
    alignment_per_example,
    distill_loss,
    keep_indices,
    layer_norm_no_params,
    normalize_pixels,
    num_visible,
    per_token_loss,
    teacher_targets,
    teacher_weights,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Heads",
    "Student",
    "alignment_per_example",
    "distill_loss",
    "keep_indices",
    "layer_norm_no_params",
    "normalize_pixels",
    "num_visible",
    "per_token_loss",
    "teacher_targets",
    "teacher_weights",
]
