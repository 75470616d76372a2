"""What the examples command shows after its last batch, while it writes the database, and
that the database it writes holds exactly the kept examples."""

import json
import math
import re
import sqlite3

import pytest
import torch

from mlsae.analysis import examples as examples_module
from mlsae.analysis.examples import Example, Examples, TopExamples, main, write_db
from tests.analysis import (
    CORPUS,
    GOLDEN_MODEL,
    GOLDEN_TRANSFORMER,
    TOKENS_PER_BATCH,
    golden_tokenizer,
    random_latents,
)


def reference_rows(top: TopExamples, tokenizer) -> list[tuple]:
    """The table rows of `top`'s kept examples, built one slot at a time from its
    layer-major tensors: by latent, then layer, then slot; ids from 1."""
    rows: list[tuple] = []
    for latent in range(top.n_latents):
        for layer in range(top.n_layers):
            group = layer * top.n_latents + latent
            for slot in range(top.n_examples):
                value = top.values[group, slot].item()
                if not math.isfinite(value):
                    continue
                inside = top.window_token_ids[group, slot] >= 0
                window = top.window_token_ids[group, slot][inside].tolist()
                token_id = int(top.token_ids[group, slot])
                acts = top.window_acts[group, slot][inside].float().tolist()
                rows.append(
                    (
                        len(rows) + 1,
                        latent,
                        layer,
                        token_id,
                        tokenizer.decode(token_id),
                        value,
                        json.dumps(window),
                        json.dumps(tokenizer.convert_ids_to_tokens(window)),
                        json.dumps(acts),
                    )
                )
    return rows


def bar_updates(err: str, description: str) -> list[str]:
    """The states that tqdm printed of the bar named `description`."""
    return [part for part in re.split(r"[\r\n]", err) if part.startswith(f"{description}:")]


@pytest.fixture
def kept(monkeypatch) -> list[TopExamples]:
    """The `TopExamples` that the command collects, once it has run."""
    collected: list[TopExamples] = []
    collect = examples_module.collect_examples

    def keep(*args, **kwargs):
        collected.append(collect(*args, **kwargs))
        return collected[-1]

    monkeypatch.setattr(examples_module, "collect_examples", keep)
    return collected


def test_the_command_shows_the_write_and_where_it_went(tmp_path, capsys, kept):
    args = [
        f"--repo_id={GOLDEN_MODEL}",
        f"--model_name={GOLDEN_TRANSFORMER}",
        f"--path={CORPUS}",
        "--max_length=32",
        "--batch_size=2",
        "--n_examples=3",
        "--n_tokens=2",
        "--device=cpu",
        f"--max_tokens={3 * TOKENS_PER_BATCH}",
        f"--output_dir={tmp_path}",
    ]
    with main(args) as examples:
        path = examples.path
    out, err = capsys.readouterr()

    connection = sqlite3.connect(path)
    rows = connection.execute("SELECT * FROM examples ORDER BY id").fetchall()
    (top,) = kept
    assert rows == reference_rows(top, golden_tokenizer())
    assert connection.execute("SELECT * FROM shape").fetchall() == [(4, 384)]
    windows = [len(json.loads(row[6])) for row in rows]
    assert min(windows) < 5 == max(windows)  # Windows clipped at a sequence's edge, and not.

    # After the batches, a second bar counts the rows written, up to all of them ...
    collecting, writing = bar_updates(err, "examples"), bar_updates(err, "writing examples")
    assert collecting[-1].startswith("examples: 100%")
    assert err.index(collecting[-1]) < err.index(writing[0])
    n = len(rows)
    assert re.match(rf"writing examples: 100%\|.*\| {n}/{n} ", writing[-1])
    # ... and the last line says how many went where.
    assert out.splitlines()[-1] == (
        f"Saved {len(rows):,} examples of {GOLDEN_MODEL} to {tmp_path / path.name}"
    )


def test_write_and_export_bars(tmp_path, capsys):
    top = TopExamples(2, 6, 3, 2)
    latents = random_latents(2, 2, 8, 6, 3, torch.Generator().manual_seed(7))
    top.update(torch.arange(16).view(2, 8) + 40, latents)
    examples = list(top.examples(golden_tokenizer()))
    assert len(top) == len(examples) > 0

    write_db(examples, tmp_path / "quiet.db")
    assert capsys.readouterr().err == ""

    n = len(examples)
    path = write_db(examples, tmp_path / "shown.db", progress=True, total=n)
    written = bar_updates(capsys.readouterr().err, "writing examples")
    assert re.match(rf"writing examples: 100%\|.*\| {n}/{n} ", written[-1])

    with Examples(path) as opened:
        dataset = opened.to_dataset()
    assert [Example.from_dict(row) for row in dataset] == examples
    exported = bar_updates(capsys.readouterr().err, "exporting examples")
    assert re.match(rf"exporting examples: 100%\|.*\| {n}/{n} ", exported[-1])
