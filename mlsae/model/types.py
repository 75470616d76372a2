"""`TopK` and `Stats`, where the original published them (defined in `mlsae.types`)."""

from mlsae.types import Stats, TopK

__all__ = ["Stats", "TopK"]
