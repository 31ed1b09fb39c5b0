"""What every teacher family's module returns: its tokens, split where the objective needs them split."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Features:
    """prefix: [B, P, D] tokens before the patches (CLS, registers; P may be 0, as for SigLIP and SAM).
    patches: [B, N, D'] the final patch tokens, row-major over the family's patch grid.
    summary: [B, S] the family's image-level vector (CLS, CLIP's projected embedding, SigLIP's MAP
    output), or None where the family has none (SAM)."""

    prefix: jax.Array
    patches: jax.Array
    summary: jax.Array | None = None

    def tokens(self) -> jax.Array:
        """The family's final token sequence in checkpoint order (prefix, then patches): `features`."""
        if self.prefix.shape[1] == 0:
            return self.patches
        return jnp.concatenate([self.prefix, self.patches], axis=1)
