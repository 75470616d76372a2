"""`Transformer` where the original published it (`mlsae.lm.transformer` defines it)."""

from mlsae.lm.transformer import Transformer

__all__ = ["Transformer"]
