"""The columns that compare with SAELens and SAEBench: after every other column in the
CSV, and under plain names in the summary."""

from mlsae.model.metric_sets import COMPARISON_GROUPS, comparison_metrics
from mlsae.trainer.summary import summary_lines
from mlsae.trainer.test import _column_key


def test_the_metric_set_logs_the_groups_the_csv_orders():
    names = set(comparison_metrics([3, 5], n_inputs=4, n_latents=8))
    assert names == set(COMPARISON_GROUPS)


def test_comparison_columns_follow_every_other_column_in_their_own_order():
    old = ["train/dead/rel", "train/fvu/layer_0", "train/fvu/avg", "loss/auxk", "train/l0/avg",
           "val/logit/kldiv_per_token/avg"]  # fmt: skip
    new = [f"{group}/{last}" for group in COMPARISON_GROUPS for last in ("layer_0", "avg")]
    assert sorted([*reversed(new), *old], key=_column_key) == [*old, *new]


def test_summary_names_the_comparison_metrics_plainly():
    metrics = {f"{group}/avg": 0.5 for group in COMPARISON_GROUPS}
    lines = summary_lines(metrics)
    assert len(lines) == len(COMPARISON_GROUPS)
    assert lines[0].split("  ")[1] == "explained variance (SAELens)"
    assert lines[-1].endswith("(train/dense/avg)")
