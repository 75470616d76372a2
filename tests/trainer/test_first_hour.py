"""What a new user sees: a progress bar with a total, no advertising, plain-named metrics,
a model card, per-token KL, and no empty folders after a failed run."""

import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

from mlsae.model import MLSAETransformer
from mlsae.trainer.summary import summary_lines
from tests.goldens import GOLDENS

train_command = importlib.import_module("mlsae.trainer.train")

TINY = str(GOLDENS / "tiny-gpt-neox-2")
CORPUS = str(GOLDENS / "corpus.jsonl.zst")
ARGS = ["--model_name", TINY, "--path", CORPUS, "--max_length", "32", "--batch_size", "2",
        "--expansion_factor", "2", "-k", "4", "--auxk", "8", "--accumulate_grad_batches", "2",
        "--val_tokens", "64", "--limit_val_batches", "2", "--max_tokens", "512",
        "--logger", "csv", "--run", "run"]  # fmt: skip


def test_a_run_shows_a_total_no_advertising_and_plain_names(tmp_path, capfd, caplog):
    output_dir = train_command.main([*ARGS, "--run_dir", str(tmp_path)])
    out, err = capfd.readouterr()
    assert "8/8" in out.replace("\r", "\n")  # 4 optimizer steps of 2 micro-batches
    assert "Tip:" not in out + err + caplog.text
    assert "FVU (fraction of variance unexplained)" in out and "(val/fvu/avg)" in out
    card = (output_dir / "README.md").read_text()
    assert f"Multi-Layer SAE on {TINY}" in card
    assert "of which 4 are kept per vector" in card and "Trained on 512 tokens" in card
    assert "| FVU (fraction of variance unexplained) |" in card
    assert "MLSAETransformer.from_pretrained" in card and "@inproceedings" in card


def test_a_failed_run_leaves_no_empty_folders(tmp_path):
    args = [*ARGS, "--run_dir", str(tmp_path / "runs")]
    args[args.index(CORPUS)] = str(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError):
        train_command.main(args)
    assert not (tmp_path / "runs" / "run").exists()


def test_wandb_credentials_are_found_without_importing_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    assert not train_command._wandb_logged_in()
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    os.chmod(netrc, 0o600)
    assert train_command._wandb_logged_in()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not train_command._wandb_logged_in()


def test_summary_lines_use_plain_names_in_a_fixed_order():
    lines = summary_lines(
        {"val/logit/kldiv/avg": 22.6, "train/fvu/avg": 0.155, "loss/total": 0.2,
         "val/logit/kldiv_per_token/avg": 0.09, "train/fvu/layer_0": 0.1}
    )  # fmt: skip
    assert [line.split("  ")[1] for line in lines] == [
        "FVU (fraction of variance unexplained)",
        "KL divergence per token, spliced (nats)",
        "KL divergence per sequence, spliced (nats)",
    ]
    assert lines[0].endswith("0.155  (train/fvu/avg)")


def test_kl_per_token_is_the_mean_over_the_positions_that_count():
    torch.manual_seed(0)
    model = MLSAETransformer(model_name=TINY, expansion_factor=2, k=4, auxk=8, max_length=32)
    tokens = torch.randint(1, 500, (2, 16))
    tokens[:, 0] = 0  # EOS: a special position, left out
    stream = model.residual_stream(tokens)
    recons = model.to_transformer_space(model.autoencoder(stream.inputs).recons)
    spliced = model.spliced_metrics(tokens, stream, recons)
    own = model.transformer.model(input_ids=tokens).logits
    pred_stack = torch.where(stream.mask[None, :, :, None], recons, stream.raw)
    for position in range(model.n_layers):
        logits = model.transformer.forward_at_layer(pred_stack, position, "logits")
        per_position = F.kl_div(
            F.log_softmax(own, -1), F.log_softmax(logits, -1), log_target=True, reduction="none"
        ).sum(-1)
        expected = per_position[stream.mask].mean()
        assert math.isclose(spliced["kl_per_token"][position], expected, rel_tol=1e-4)
        assert math.isclose(
            spliced["kl"][position], per_position[stream.mask].sum() / 2, rel_tol=1e-4
        )
