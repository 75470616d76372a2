"""The frozen language model: its residual stream at any block (`Transformer`), splicing a
replacement back in, the tuned lens, and the token stream it reads (`mlsae.lm.data`)."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlsae.lm.transformer import Transformer

__all__ = ["Transformer"]


def __getattr__(name: str) -> Any:
    # transformers takes seconds to import: only when asked for.
    if name == "Transformer":
        from mlsae.lm.transformer import Transformer

        return Transformer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
