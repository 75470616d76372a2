"""One module per SAE file format; importing each registers it (`mlsae.saes.registry`).
Folders are matched against the formats in this order."""

from mlsae.saes.formats import mlsae  # first: it claims config.json folders by their content

# isort: split
from mlsae.saes.formats import gemma_scope, llama_scope, saelens, sparsify, state_dict

__all__ = ["mlsae", "gemma_scope", "llama_scope", "saelens", "sparsify", "state_dict"]
