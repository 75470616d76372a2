"""`test(config)`: evaluate pretrained MLSAEs and write one CSV of metrics per model."""

import csv
import math
import os
from pathlib import Path

from lightning.pytorch import Trainer

from mlsae.model.data import load_tokenizer
from mlsae.model.lightning import MLSAETransformer
from mlsae.trainer.config import (
    TestConfig,
    check_precision,
    default_precision,
    held_out_stream,
    initialize,
    parse,
    require_local_data,
)
from mlsae.trainer.train import print_summary
from mlsae.utils import local_model_name

# The original's column order (see tests/data/goldens/test_output.csv); others follow.
_GROUP_ORDER = (
    "train/dead",
    "train/fvu",
    "train/l1",
    "train/mse",
    "val/logit/kldiv",
    "val/logit/mse",
    "val/loss/delta",
    "loss/total",
    "loss/mse",
    "loss/auxk",
)


def _column_key(name: str) -> tuple[int, str, int]:
    group, _, last = name.rpartition("/")
    position = int(last[len("layer_") :]) if last.startswith("layer_") else 1 << 30
    prefix = group if position < 1 << 30 or last == "avg" else name
    for rank, known in enumerate(_GROUP_ORDER):
        if name.startswith(known):
            return rank, prefix, position
    return len(_GROUP_ORDER), prefix, position


def csv_name(repo_id: str) -> str:
    """`test_<last part of the repo id or folder>.csv`, as the original names it; for a
    model that train.py saved to `<run>/model`, the run's name."""
    if os.path.isdir(repo_id):
        return f"test_{local_model_name(repo_id)}.csv"
    return f"test_{Path(repo_id.rstrip('/')).name}.csv"


def test_one(config: TestConfig, repo_id: str) -> Path:
    """Evaluate one pretrained model and write its CSV; returns the CSV's path."""
    data = config.data
    require_local_data(data.path)
    model = MLSAETransformer.from_pretrained(
        repo_id, count_special_tokens=config.count_special_tokens
    )
    model.requires_grad_(False)
    loader = held_out_stream(data, load_tokenizer(model.transformer.tokenizer))
    trainer = Trainer(
        accelerator=config.accelerator,
        devices=1,
        precision=config.precision or default_precision(),
        limit_test_batches=data.max_steps if math.isfinite(data.max_tokens) else 1.0,
        logger=False,
        deterministic=True,
        enable_model_summary=False,
    )
    (metrics,) = trainer.test(model, loader, verbose=False)
    columns = sorted(metrics, key=_column_key)
    output = Path(config.output_dir) / csv_name(repo_id)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerow([repr(float(metrics[column])) for column in columns])
    print_summary(f"{repo_id}: {output}", metrics)
    return output


def test(config: TestConfig) -> list[Path]:
    """Evaluate every model the config names; returns the CSV files written."""
    check_precision(config.precision, config.accelerator)
    initialize(config.seed)
    return [test_one(config, repo_id) for repo_id in config.repo_ids()]


def main(args: list[str] | None = None) -> list[Path]:
    """`python test.py`: parse the command line and evaluate."""
    return test(parse(TestConfig, args))
