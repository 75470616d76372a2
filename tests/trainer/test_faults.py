"""Faults and hostile files: checkpoints are data, resumes refuse another run, a full disk or
SIGTERM leaves nothing half-written and says what happened."""

import errno
import importlib
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mlsae.cli import run_command
from mlsae.lm.fingerprint import weights_fingerprint
from mlsae.lm.transformer import Transformer
from mlsae.model.lightning import MLSAETransformer
from mlsae.trainer import faults
from mlsae.trainer import upload as upload_command
from mlsae.trainer.faults import INTERRUPTED_EXIT_STATUS
from tests.goldens import GOLDENS
from tests.trainer.test_errors import fails_with

# The modules (`mlsae.trainer.train` is the function of that name, as in the original).
train_command = importlib.import_module("mlsae.trainer.train")

TINY = str(GOLDENS / "tiny-gpt-neox-2")
CORPUS = str(GOLDENS / "corpus.jsonl.zst")
STEPS = 4
BASE = ["--model_name", TINY, "--path", CORPUS, "--max_length", "32", "--batch_size", "2",
        "--expansion_factor", "2", "-k", "4", "--auxk", "8", "--accumulate_grad_batches", "1",
        "--val_tokens", "64", "--limit_val_batches", "1", "--checkpoint_every_n_steps", "2",
        "--logger", "none", "--run", "run"]  # fmt: skip


def args_for(run_dir: Path, steps: int = STEPS, *extra: str) -> list[str]:
    return [*BASE, "--run_dir", str(run_dir), "--max_tokens", str(steps * 64), *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished run of STEPS steps; tests copy its run folder before changing it."""
    run_dir = tmp_path_factory.mktemp("trained")
    train_command.main(args_for(run_dir))
    return run_dir


@pytest.fixture
def run_dir(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained, tmp_path / "runs")
    return tmp_path / "runs"


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "run" / "checkpoints" / "last.ckpt"


class CodeOnLoad:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def hostile_checkpoint(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    checkpoint = torch.load(last_checkpoint(run_dir), weights_only=True)
    checkpoint["payload"] = CodeOnLoad(marker)
    path = tmp_path / "hostile.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def test_resuming_a_hostile_checkpoint_runs_no_code(capsys, run_dir, tmp_path):
    path, marker = hostile_checkpoint(run_dir, tmp_path)
    args = args_for(run_dir, STEPS + 2, "--checkpoint_path", str(path))
    fails_with(capsys, train_command.main, args, "refusing to load", str(path))
    assert not marker.exists()


def test_uploading_a_hostile_checkpoint_runs_no_code(capsys, run_dir, tmp_path):
    path, marker = hostile_checkpoint(run_dir, tmp_path)
    args = ["--ckpt_path", str(path), "--output_dir", str(tmp_path / "upload")]
    fails_with(capsys, upload_command.main, args, "refusing to load", str(path))
    assert not marker.exists()


def test_uploading_a_truncated_checkpoint_is_one_error_line(capsys, run_dir, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last_checkpoint(run_dir).read_bytes()[:4096])
    args = ["--ckpt_path", str(truncated), "--output_dir", str(tmp_path / "upload")]
    error = fails_with(capsys, upload_command.main, args, str(truncated), "corrupt or truncated")
    assert error.strip().count("\n") == 0


def test_upload_reads_the_checkpoint_strictly(run_dir, tmp_path):
    tfm_dir, sae_dir = upload_command.main(
        [
            *("--ckpt_path", str(last_checkpoint(run_dir)), "--output_dir", str(tmp_path)),
            *("--model_name", "someone/tiny-gpt-neox-2"),
        ]
    )
    from mlsae.model import MLSAE

    uploaded = MLSAE.from_pretrained(sae_dir)
    state = torch.load(last_checkpoint(run_dir), weights_only=True)["state_dict"]
    assert torch.equal(uploaded.encoder.weight, state["autoencoder.encoder.weight"])
    # The checkpoint records the language model by fingerprint; -tfm holds its weights.
    published = load_file(tfm_dir / "model.safetensors")
    for name, value in Transformer(TINY).state_dict().items():
        assert torch.equal(published[f"transformer.{name}"], value), name


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["-k", "3"], ["-k was 4, now 3"]),
        (["--layers", "0", "1"], ["--layers was all, now 0 1"]),
        (["--batch_size", "4"], ["--batch_size was 2, now 4"]),
        (["--expansion_factor", "4"], ["--expansion_factor was 2, now 4"]),
        (["--lr", "0.5"], ["--lr was 0.0001, now 0.5"]),
        (["--val_tokens", "128"], ["--val_tokens was 64, now 128"]),
        (["--path", str(GOLDENS)], ["--path was", "--moved path"]),
        (["-k", "3", "--auxk", "6"], ["-k was 4, now 3", "--auxk was 8, now 6"]),
    ],
)
def test_resume_refuses_another_run(capsys, run_dir, extra, fragments):
    args = args_for(run_dir, STEPS + 2, "--checkpoint_path", str(last_checkpoint(run_dir)))
    fails_with(capsys, train_command.main, [*args, *extra], "cannot resume from", *fragments)


def test_resume_refuses_another_transformer(capsys, run_dir, tmp_path):
    other = tmp_path / "other-model"
    shutil.copytree(TINY, other)
    args = args_for(run_dir, STEPS + 2, "--checkpoint_path", str(last_checkpoint(run_dir)))
    args[args.index(TINY)] = str(other)
    fails_with(capsys, train_command.main, args, f"--model_name was {TINY}, now {other}")


def test_checkpoints_record_the_frozen_transformer_by_fingerprint(run_dir):
    checkpoint = torch.load(last_checkpoint(run_dir), weights_only=True)
    assert not [key for key in checkpoint["state_dict"] if key.startswith("transformer.")]
    assert "autoencoder.encoder.weight" in checkpoint["state_dict"]
    expected = weights_fingerprint(AutoModelForCausalLM.from_pretrained(TINY))
    assert checkpoint["mlsae"]["transformer_fingerprint"] == expected
    loaded = MLSAETransformer.load_checkpoint_weights(str(last_checkpoint(run_dir)))
    for name, value in AutoModelForCausalLM.from_pretrained(TINY).state_dict().items():
        assert torch.equal(loaded.transformer.model.state_dict()[name], value), name
    weight = checkpoint["state_dict"]["autoencoder.encoder.weight"]
    assert torch.equal(loaded.autoencoder.encoder.weight, weight)


def test_resume_refuses_other_weights_of_a_moved_transformer(capsys, run_dir, tmp_path):
    other = tmp_path / "other-model"
    shutil.copytree(TINY, other)
    model = AutoModelForCausalLM.from_pretrained(TINY)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(other)
    args = args_for(run_dir, STEPS + 2, "--checkpoint_path", str(last_checkpoint(run_dir)))
    args[args.index(TINY)] = str(other)
    fails_with(capsys, train_command.main, [*args, "--moved", "model_name"], "other weights than")


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_checkpoints_that_hold_the_transformer_still_load_and_resume(run_dir, tmp_path, shift):
    """Older checkpoints hold the transformer's weights: those are the ones loaded, and
    a run resumed from other weights than the model's keeps them in its checkpoints."""
    checkpoint = torch.load(last_checkpoint(run_dir), weights_only=True)
    del checkpoint["mlsae"]["transformer_fingerprint"]
    weights = {name: value + shift for name, value in Transformer(TINY).state_dict().items()}
    checkpoint["state_dict"].update({f"transformer.{n}": v for n, v in weights.items()})
    older = tmp_path / "older.ckpt"
    torch.save(checkpoint, older)
    loaded = MLSAETransformer.load_checkpoint_weights(str(older))
    for name, value in weights.items():
        assert torch.equal(loaded.transformer.state_dict()[name], value), name
    resumed_dir = tmp_path / "resumed"
    train_command.main(args_for(resumed_dir, STEPS + 2, "--checkpoint_path", str(older)))
    resumed = torch.load(last_checkpoint(resumed_dir), weights_only=True)
    assert resumed["global_step"] == STEPS + 2
    assert ("transformer_fingerprint" in resumed["mlsae"]) == (shift == 0.0)
    for name, value in weights.items():
        assert torch.equal(resumed["state_dict"].get(f"transformer.{name}", value), value)


def test_resume_accepts_moved_data_and_changed_length(run_dir, tmp_path):
    moved = tmp_path / "moved.jsonl.zst"
    shutil.copy(CORPUS, moved)
    args = args_for(run_dir, STEPS + 2, "--checkpoint_path", str(last_checkpoint(run_dir)))
    args[args.index(CORPUS)] = str(moved)
    train_command.main([*args, "--moved", "path", "--log_every_n_steps", "1"])
    assert torch.load(last_checkpoint(run_dir), weights_only=True)["global_step"] == STEPS + 2


def test_resume_prunes_orphan_periodic_checkpoints(run_dir):
    folder = last_checkpoint(run_dir).parent
    # A process killed after writing a periodic checkpoint, before last.ckpt.
    shutil.copy(last_checkpoint(run_dir), folder / f"epoch=0-step={STEPS + 2}.ckpt")
    args = args_for(run_dir, STEPS + 4, "--checkpoint_path", str(last_checkpoint(run_dir)))
    train_command.main(args)
    names = sorted(path.name for path in folder.iterdir())
    assert len(names) == 2 and names[1] == "last.ckpt", names
    assert names[0].startswith("epoch=") and names[0].endswith(f"-step={STEPS + 4}.ckpt")


def test_a_full_disk_is_one_error_line_and_leaves_no_partial(capsys, tmp_path, monkeypatch):
    real_save = torch.save

    def save(obj, file, *args, **kwargs):
        if isinstance(file, str | Path):
            return real_save(obj, file, *args, **kwargs)
        file.write(b"some bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / ".last.ckpt.partial").write_bytes(b"left by a killed run")
    error = fails_with(capsys, train_command.main, args_for(tmp_path), "no space left", str(folder))
    assert error.strip().count("\n") == 0
    assert not list(folder.glob(".*partial"))


class SigtermDuringFinalValidation(Callback):
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.training and trainer.state.fn == "validate":
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_the_final_validation_saves_the_model(capsys, tmp_path):
    from mlsae.trainer.config import RunConfig, parse

    config = parse(RunConfig, args_for(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: train_command.train(config, [SigtermDuringFinalValidation()]))
    assert exit_info.value.code == INTERRUPTED_EXIT_STATUS
    model_dir = tmp_path / "run" / "model"
    message = capsys.readouterr().err
    assert f"saved the trained model to {model_dir}" in message
    assert "without its held-out metrics" in message
    assert (model_dir / "model.safetensors").is_file()
    assert not list((tmp_path / "run").glob(".*partial"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_checkpoint_already_written_is_linked_into_a_folder_not_made_yet(tmp_path):
    written = tmp_path / "sweep" / "step=4" / "run.ckpt"
    written.parent.mkdir(parents=True)
    written.write_bytes(b"checkpoint")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert faults._hard_link(written, last)
    assert last.stat().st_ino == written.stat().st_ino
