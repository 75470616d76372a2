"""The row of a published `-examples` dataset and of the examples database: `Example`,
with its `COLUMNS` and their `FEATURES` (`mlsae.analysis.examples_db` stores them)."""

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import datasets

COLUMNS = ("id", "latent", "layer", "token_id", "token", "act", "token_ids", "tokens", "acts")
"""The columns of a published `-examples` dataset and of the SQLite table."""

FEATURES = datasets.Features(
    {
        "id": datasets.Value("int64"),
        "latent": datasets.Value("int64"),
        "layer": datasets.Value("int64"),
        "token_id": datasets.Value("int64"),
        "token": datasets.Value("string"),
        "act": datasets.Value("float64"),
        "token_ids": datasets.Value("string"),
        "tokens": datasets.Value("string"),
        "acts": datasets.Value("string"),
    }
)


class Example(NamedTuple):
    """One example: the token at which `latent` fired at `layer` and its context window.

    The one declaration of an example's fields: the explorer's response schema
    (`mlsae.explorer.schemas.Example`) is built from them."""

    latent: int
    layer: int
    token_id: int
    token: str
    act: float
    token_ids: list[int]
    tokens: list[str]
    acts: list[float]

    def serialize(self) -> tuple[int | str | float, ...]:
        """The row without its id, with the window lists as JSON strings."""
        return (
            self.latent,
            self.layer,
            self.token_id,
            self.token,
            self.act,
            json.dumps(self.token_ids),
            json.dumps(self.tokens),
            json.dumps(self.acts),
        )

    @staticmethod
    def from_row(row: Sequence[Any]) -> "Example":
        """From a table row without its id."""
        latent, layer, token_id, token, act, token_ids, tokens, acts = row
        return Example(
            latent, layer, token_id, token, act, _json(token_ids), _json(tokens), _json(acts)
        )

    @staticmethod
    def from_dict(row: dict[str, Any]) -> "Example":
        """From a dataset row (window columns as JSON strings or as lists)."""
        return Example.from_row([row[name] for name in COLUMNS[1:]])


def _json(value: str | list) -> list:
    return json.loads(value) if isinstance(value, str) else list(value)
