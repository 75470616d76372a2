"""A web page and JSON API for exploring one pretrained MLSAE:
`python -m mlsae.explorer --repo_id <hub id or local dir>`."""

from .app import create_app
from .service import ExplorerInputError, ExplorerService

__all__ = ["ExplorerInputError", "ExplorerService", "create_app"]
