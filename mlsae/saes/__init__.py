"""Other SAE families behind one inference interface: `load_sae` reads SAELens, sparsify,
Llama Scope, Gemma Scope, plain state dicts and this library's own models, and returns an
`SAE` with `encode`, `decode`, `forward`, `encode_sparse`, `d_in`, `d_sae`, `layer` and
`site`; `load_sae_stack` loads one SAE per layer as an `SAEStack`."""

from mlsae.saes import formats  # noqa: F401 (registers every format)
from mlsae.saes.base import SAE, SITES, SparseLatents
from mlsae.saes.linear import LinearSAE
from mlsae.saes.load import load_sae
from mlsae.saes.registry import FORMATS, SAEFileError
from mlsae.saes.stack import SAEStack, load_sae_stack

__all__ = [
    "FORMATS",
    "SAE",
    "SITES",
    "LinearSAE",
    "SAEFileError",
    "SAEStack",
    "SparseLatents",
    "load_sae",
    "load_sae_stack",
]
