"""`train.py --site`: a few steps at a site other than the residual stream, the model saved
with its site, evaluated there by `test.py`, and resumes that change the site refused."""

import csv
import importlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mlsae.model.lightning import MLSAETransformer
from tests.goldens import GOLDENS
from tests.trainer.test_errors import fails_with

# The modules (`mlsae.trainer.train` is the function of that name, as in the original).
train_command = importlib.import_module("mlsae.trainer.train")
test_command = importlib.import_module("mlsae.trainer.test")

TINY = str(GOLDENS / "tiny-gpt-neox-2")
CORPUS = str(GOLDENS / "corpus.jsonl.zst")
STEPS = 3
BASE = ["--model_name", TINY, "--path", CORPUS, "--max_length", "32", "--batch_size", "2",
        "--expansion_factor", "2", "-k", "4", "--auxk", "8", "--accumulate_grad_batches", "1",
        "--val_tokens", "64", "--limit_val_batches", "1", "--checkpoint_every_n_steps", "1",
        "--logger", "none", "--run", "run"]  # fmt: skip


def args_for(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [*BASE, "--run_dir", str(run_dir), "--max_tokens", str(steps * 64), *extra]


@pytest.fixture(scope="module", params=["mlp_out", "attn_z"])
def trained(request, tmp_path_factory) -> tuple[str, Path]:
    """A finished run of STEPS steps at a site; tests copy its run folder to change it."""
    site = request.param
    run_dir = tmp_path_factory.mktemp(f"trained-{site}")
    train_command.main(args_for(run_dir, STEPS, "--site", site))
    return site, run_dir


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "run" / "checkpoints" / "last.ckpt"


def test_the_trained_model_reads_and_keeps_its_site(trained):
    site, run_dir = trained
    output = run_dir / "run" / "model"
    assert json.loads((output / "config.json").read_text())["site"] == site
    model = MLSAETransformer.from_pretrained(output)
    config = model.transformer.config
    head_dim = config.hidden_size // config.num_attention_heads
    assert model.site == model.transformer.site == site
    assert model.n_inputs == config.num_attention_heads * head_dim
    tokens = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    read = model.transformer.read_sites(tokens, [(layer, site) for layer in model.layers])
    expected = torch.stack([read[layer, site] for layer in model.layers])
    assert torch.equal(model.residual_stream(tokens).raw, expected)
    checkpoint = torch.load(last_checkpoint(run_dir), map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == STEPS
    assert checkpoint["hyper_parameters"]["site"] == site


def test_test_evaluates_the_model_at_its_site(trained, tmp_path: Path):
    _, run_dir = trained
    args = ["--repo_id", str(run_dir / "run" / "model"), "--path", CORPUS, "--split", "test"]
    args += ["--max_length", "32", "--batch_size", "2", "--max_tokens", "128"]
    (written,) = test_command.main([*args, "--output_dir", str(tmp_path)])
    with open(written) as file:
        row = next(csv.DictReader(file))
    for column in ("val/loss/delta/avg", "train/fvu/avg", "val/loss/recovered_zero/avg"):
        assert math.isfinite(float(row[column])), column


def test_resume_refuses_another_site(capsys, trained, tmp_path: Path):
    site, run_dir = trained
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs)
    resume = ["--checkpoint_path", str(last_checkpoint(runs))]
    args = args_for(runs, STEPS + 1, *resume, "--site", "resid_post")
    fails_with(
        capsys, train_command.main, args, "cannot resume", f"--site was {site}, now resid_post"
    )


def test_a_checkpoint_without_a_site_was_trained_at_resid_post(capsys, trained, tmp_path: Path):
    site, run_dir = trained
    checkpoint = torch.load(last_checkpoint(run_dir), map_location="cpu", weights_only=True)
    del checkpoint["hyper_parameters"]["site"]
    older = tmp_path / "older.ckpt"
    torch.save(checkpoint, older)
    args = args_for(tmp_path / "runs", STEPS + 1, "--checkpoint_path", str(older), "--site", site)
    fails_with(capsys, train_command.main, args, f"--site was resid_post, now {site}")


def test_an_unknown_site_is_one_error_line(capsys, tmp_path: Path):
    args = args_for(tmp_path, 1, "--site", "mlp")
    error = fails_with(capsys, train_command.main, args, "--site must be one of resid_pre, ")
    assert error.strip().count("\n") == 0


def test_the_tuned_lens_at_another_site_is_refused(capsys, tmp_path: Path):
    args = args_for(tmp_path, 1, "--site", "attn_z", "--tuned_lens", "true")
    fails_with(capsys, train_command.main, args, "--tuned_lens", "--site resid_post, not attn_z")
