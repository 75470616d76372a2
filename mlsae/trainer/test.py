"""`test(config)`: evaluate pretrained MLSAEs, or a stack of per-layer SAEs (`--sae`), and
write one CSV of metrics per model."""

import csv
import math
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer

from mlsae.cli import initialize, parse, require_local_data
from mlsae.lm.data import held_out_stream, load_tokenizer
from mlsae.model.lightning import MLSAETransformer
from mlsae.model.metric_sets import COMPARISON_GROUPS
from mlsae.names import csv_name, stack_name
from mlsae.trainer.config import (
    RunConfig,
    TestConfig,
    check_precision,
    default_precision,
)
from mlsae.trainer.quiet import quiet_lightning
from mlsae.trainer.shared_test import (
    GroupEvaluation,
    candidate_key,
    group_models,
    split_metrics,
)
from mlsae.trainer.stack_eval import evaluate_stack
from mlsae.trainer.summary import print_summary

# The original's column order (see tests/data/goldens/test_output.csv); others follow, then
# the columns that compare with SAELens and SAEBench.
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
    if prefix in COMPARISON_GROUPS:
        # After every other column, in their own order (docs/evaluation.md).
        return len(_GROUP_ORDER) + 1 + COMPARISON_GROUPS.index(prefix), prefix, position
    for rank, known in enumerate(_GROUP_ORDER):
        if prefix == known or prefix.startswith(known + "/"):
            return rank, prefix, position
    return len(_GROUP_ORDER), prefix, position


def test_one(config: TestConfig, repo_id: str) -> Path:
    """Evaluate one pretrained model and write its CSV; returns the CSV's path."""
    require_local_data(config.data.path)
    (metrics,) = _evaluate(config, [_load(config, repo_id)])
    return _write(config, repo_id, metrics)


def test_many(config: TestConfig, repo_ids: list[str]) -> list[Path]:
    """Evaluate several pretrained models, each as `test_one` would, those that read the same
    activations together (`mlsae.trainer.shared_test`); returns the CSVs' paths in order."""
    require_local_data(config.data.path)
    candidates: dict[object, list[int]] = {}
    for index, repo_id in enumerate(repo_ids):
        key = candidate_key(repo_id)
        candidates.setdefault(index if key is None else key, []).append(index)
    written: dict[int, Path] = {}
    for indices in candidates.values():
        if len(indices) == 1:
            written[indices[0]] = test_one(config, repo_ids[indices[0]])
            continue
        models = [_load(config, repo_ids[index]) for index in indices]
        for group in group_models(models):
            metrics = _evaluate(config, [models[member] for member in group])
            for member, each in zip(group, metrics, strict=True):
                written[indices[member]] = _write(config, repo_ids[indices[member]], each)
        del models
    return [written[index] for index in range(len(repo_ids))]


def _evaluate(config: TestConfig, models: list[MLSAETransformer]) -> list[dict[str, Any]]:
    """The metrics of each of `models`, which share one transformer: one model alone, as
    ever; several in one `GroupEvaluation`."""
    loader = held_out_stream(config.data, load_tokenizer(models[0].transformer.tokenizer))
    module = models[0] if len(models) == 1 else GroupEvaluation(models)
    quiet_lightning()
    trainer = Trainer(
        accelerator=config.accelerator,
        devices=1,
        precision=config.precision or default_precision(),
        limit_test_batches=config.data.max_steps if math.isfinite(config.data.max_tokens) else 1.0,
        logger=False,
        deterministic=True,
        enable_model_summary=False,
    )
    (metrics,) = trainer.test(module, loader, verbose=False)
    return [metrics] if len(models) == 1 else split_metrics(metrics, len(models))


def _load(config: TestConfig, repo_id: str) -> MLSAETransformer:
    options = {"count_special_tokens": config.count_special_tokens}
    if config.language_model() is not None:
        options["model_name"] = config.language_model()
    model = MLSAETransformer.from_pretrained(repo_id, **options)
    model.requires_grad_(False)
    return model


def _write(config: TestConfig, repo_id: str, metrics: dict) -> Path:
    output = Path(config.output_dir) / csv_name(repo_id)
    write_row(output, metrics)
    print_summary(f"{repo_id}: {output}", metrics)
    return output


def test_stack(config: TestConfig) -> Path:
    """Evaluate the stack of per-layer SAEs of `--sae` and write its CSV,
    `test_<stack name>.csv` (`mlsae.names.stack_name`); returns the CSV's path."""
    assert config.sae
    require_local_data(config.data.path)
    metrics = evaluate_stack(config)
    output = Path(config.output_dir) / f"test_{stack_name(config.sae[0])}.csv"
    write_row(output, metrics)
    print_summary(f"{' '.join(config.sae)}: {output}", metrics)
    return output


def write_row(output: Path, metrics: dict) -> None:
    """A CSV of one row of `metrics`, its columns in the order of `_column_key`."""
    columns = sorted(metrics, key=_column_key)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerow([repr(float(metrics[column])) for column in columns])


def test(config: TestConfig | RunConfig) -> list[Path]:
    """Evaluate every model the config names, or its stack of SAEs (`--sae`); returns the
    CSV files written. A `RunConfig` (the original's argument) evaluates the published
    model of that run."""
    if isinstance(config, RunConfig):
        config = TestConfig.from_run(config)
    config.check_sae_options()
    check_precision(config.precision, config.accelerator)
    initialize(config.seed)
    if config.sae:
        return [test_stack(config)]
    repo_ids = list(config.repo_ids())
    if len(repo_ids) == 1:
        return [test_one(config, repo_ids[0])]
    return test_many(config, repo_ids)


def main(args: list[str] | None = None) -> list[Path]:
    """`python test.py`: parse the command line and evaluate."""
    return test(parse(TestConfig, args))
