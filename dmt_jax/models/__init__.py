from dmt_jax.models.vit import VARIANTS, ViT, parse_variant, sincos_pos_embed_2d

__all__ = ["VARIANTS", "ViT", "parse_variant", "sincos_pos_embed_2d"]
