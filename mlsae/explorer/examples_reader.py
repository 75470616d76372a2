"""The examples database as the explorer's threads read it."""

import threading
from pathlib import Path

from mlsae.analysis.examples import Example as StoredExample
from mlsae.analysis.examples import Examples


class ExamplesReader:
    """An examples database, opened once per thread (sqlite connections are per thread)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no examples database at {self.path}")
        self._local = threading.local()

    def _examples(self) -> Examples:
        examples = getattr(self._local, "examples", None)
        if examples is None:
            examples = self._local.examples = Examples(self.path)
        return examples

    def get(self, layer: int, latent: int) -> list[StoredExample]:
        return self._examples().get(layer, latent)

    def top(self) -> StoredExample | None:
        """The example with the largest activation of all (the first stored of equals);
        None for an empty database. It reads every row once."""
        row = (
            self._examples()
            .connection.execute(
                "SELECT latent, layer, token_id, token, act, token_ids, tokens, acts "
                "FROM examples ORDER BY act DESC, id LIMIT 1"
            )
            .fetchone()
        )
        return None if row is None else StoredExample.from_row(row)


def open_examples(
    examples: "Examples | ExamplesReader | str | Path | None",
) -> ExamplesReader | None:
    if examples is None or isinstance(examples, ExamplesReader):
        return examples
    if isinstance(examples, Examples):
        return ExamplesReader(examples.path)
    return ExamplesReader(examples)
