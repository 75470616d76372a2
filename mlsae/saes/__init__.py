"""Other SAE families behind one inference interface: `load_sae` reads SAELens, sparsify,
Llama Scope, Gemma Scope, plain state dicts and this library's own models, and returns an
`SAE` with `encode`, `decode`, `forward`, `encode_sparse`, `d_in`, `d_sae`, `layer` and
`site`."""

from mlsae.saes import formats  # noqa: F401 (registers every format)
from mlsae.saes.base import SAE, SITES, SparseLatents
from mlsae.saes.linear import LinearSAE
from mlsae.saes.load import load_sae
from mlsae.saes.registry import FORMATS, SAEFileError

__all__ = ["FORMATS", "SAE", "SITES", "LinearSAE", "SAEFileError", "SparseLatents", "load_sae"]
