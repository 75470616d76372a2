"""Running an analysis as a command (`mlsae.analysis.run`): options, seed, outputs reported,
the hub, and user mistakes as one `error:` line."""

import runpy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from mlsae.analysis import dists as dists_module
from mlsae.analysis import run as analysis_run
from mlsae.analysis.dists import Dists
from mlsae.analysis.run import AnalysedModel, Saved, run_analysis
from mlsae.cli import ConfigError
from tests.analysis import CORPUS, GOLDEN_MODEL, GOLDEN_TRANSFORMER, TOKENS_PER_BATCH

MODEL_ARGS = [
    f"--repo_id={GOLDEN_MODEL}",
    f"--model_name={GOLDEN_TRANSFORMER}",
    f"--path={CORPUS}",
    "--max_length=32",
    "--batch_size=2",
    f"--max_tokens={TOKENS_PER_BATCH}",
    "--device=cpu",
]


@dataclass
class ToyConfig:
    """A toy analysis."""

    hub_suffix: ClassVar[str | None] = "toy"

    size: int = 3
    """How many random numbers."""

    push_to_hub: bool = False
    """Push the result to the hub."""

    seed: int = 42
    """The seed."""


@dataclass
class UnpublishedConfig(ToyConfig):
    """A toy analysis without a hub dataset."""

    hub_suffix: ClassVar[str | None] = None


def test_parses_seeds_saves_and_reports(capsys, tmp_path):
    pushed = []

    def save(config: ToyConfig) -> Saved[torch.Tensor]:
        result = torch.rand(config.size)
        path = tmp_path / "toy.txt"
        path.write_text(str(result.tolist()))
        return Saved(result, [("the toy", path)], ["a note"], pushed.append, "someone/toy")

    first = run_analysis(ToyConfig, save, ["--size=4", "--seed=7"])
    assert torch.equal(first, run_analysis(ToyConfig, save, ["--size=4", "--seed=7"]))
    torch.manual_seed(7)
    assert torch.equal(first, torch.rand(4))
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["a note", f"Saved the toy to {tmp_path / 'toy.txt'}"]
    assert pushed == []

    run_analysis(ToyConfig, save, ["--push_to_hub=true"])
    assert pushed == ["someone/toy"]
    assert "Pushed to the hub dataset someone/toy" in capsys.readouterr().out


def test_push_to_hub_without_a_hub_dataset_stops_before_computing():
    def save(config: UnpublishedConfig) -> Saved[None]:
        raise AssertionError("computed")

    with pytest.raises(ConfigError, match="--push_to_hub: this analysis publishes no hub dataset"):
        run_analysis(UnpublishedConfig, save, ["--push_to_hub=true"])


def test_the_model_identity_is_computed_only_for_outputs_that_record_it(monkeypatch):
    hashed = []

    def identity(source: object) -> str:
        hashed.append(source)
        return "h"

    monkeypatch.setattr(analysis_run, "source_identity", identity)
    source = object()
    model = AnalysedModel(None, "someone/mlsae-x-tfm", source)
    assert hashed == []
    assert (model.origin.model, model.origin.repo_id) == ("h", "someone/mlsae-x-tfm")
    assert model.origin is model.origin and hashed == [source]


def test_dists_push_to_their_dataset(tmp_path, monkeypatch, capsys):
    pushed = []
    monkeypatch.setattr(Dists, "push_to_hub", lambda self, repo_id: pushed.append(repo_id))
    dists = dists_module.main([*MODEL_ARGS, f"--output_dir={tmp_path}", "--push_to_hub=true"])
    assert pushed == ["mlsae-tfm-trained-dists"]
    assert dists.counts.sum() > 0
    out = capsys.readouterr().out
    path = tmp_path / "mlsae-tfm-trained-dists.safetensors"
    assert f"Saved the dists of {GOLDEN_MODEL} to {path}" in out


def run_module(module: str, args: list[str], monkeypatch, capsys) -> tuple[int, list[str]]:
    with monkeypatch.context() as patch:
        patch.setattr(sys, "argv", [module, *args])
        patch.delitem(sys.modules, module, raising=False)
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module(module, run_name="__main__")
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        (
            "mlsae.analysis.variances",
            [*MODEL_ARGS, "--push_to_hub=true"],
            "error: --push_to_hub: this analysis publishes no hub dataset",
        ),
        ("mlsae.analysis.mmcs", ["--repo_id", "a", "b", "c"], "error: give one or two --repo_id"),
        (
            "mlsae.analysis.geometry",
            [f"--model_name={GOLDEN_TRANSFORMER}", "--path=missing.jsonl", "--device=cpu"],
            "error: ",
        ),
    ],
)
def test_commands_end_a_user_mistake_with_one_error_line(
    module, args, message, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    code, lines = run_module(module, [*args, f"--output_dir={out}"], monkeypatch, capsys)
    assert code == 2
    assert lines[-1].startswith(message)
    assert not [line for line in lines if line.startswith("Traceback")]
    assert not Path(out).exists()
