"""Single-device model code: moesys's MoE transformer."""

from moesys.models.transformer import MoETransformer, TransformerOutput

__all__ = ["MoETransformer", "TransformerOutput"]
