"""User mistakes end with one clear `error:` line and exit status 2, not a traceback."""

import importlib
import json
import re
import shutil

import pytest
import zstandard

from mlsae.cli import run_command
from mlsae.model.lightning import MLSAETransformer
from tests.goldens import GOLDENS

# The modules (`mlsae.trainer.train` is the function of that name, as in the original).
train_command = importlib.import_module("mlsae.trainer.train")
test_command = importlib.import_module("mlsae.trainer.test")

TINY = str(GOLDENS / "tiny-gpt-neox-2")
CORPUS = str(GOLDENS / "corpus.jsonl.zst")
BASE = ["--model_name", TINY, "--path", CORPUS, "--max_length", "32", "--batch_size", "2",
        "--expansion_factor", "2", "-k", "4", "--auxk", "8", "--accumulate_grad_batches", "1",
        "--max_tokens", "128", "--val_tokens", "64", "--logger", "none"]  # fmt: skip


def fails_with(capsys, main, args, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: main(args))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    start = re.search(r"(^|\n)error: ", error)
    assert start, error
    error = error[start.start() :]
    for fragment in fragments:
        assert fragment in error, error
    return error


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--layers", "1", "9"], ["Layer 9 is out of range", "4 blocks"]),
        (["--layers", "1", "1"], ["must not repeat"]),
        (["-k", "500"], ["k (500) must not exceed n_latents (96)"]),
        (["--auxk", "100"], ["auxk (100) must not exceed n_latents (96)"]),
        (["--expansion_factor", "0"], ["--expansion_factor must be a positive integer"]),
        (["--expansion_factor", "-2"], ["--expansion_factor"]),
        (
            ["--max_length", "4096", "--max_tokens", "8192"],
            ["max_length 4096 is longer than", "context (128)"],
        ),
        (["--batch_size", "0"], ["--batch_size must be a positive integer"]),
        (["--accumulate_grad_batches", "0"], ["--accumulate_grad_batches"]),
        (["--precision", "16-mixed", "--accelerator", "cpu"], ["needs a CUDA GPU"]),
        (["--model_name", "/no/such/model"], ["/no/such/model does not exist"]),
    ],
)
def test_train_rejects_bad_options(capsys, tmp_path, extra, fragments):
    args = [*BASE, "--run_dir", str(tmp_path), *extra]
    fails_with(capsys, train_command.main, args, *fragments)


def test_unknown_hub_model_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    args = [*BASE, "--run_dir", str(tmp_path), "--model_name", "nobody/no-such-model-xyz"]
    fails_with(capsys, train_command.main, args, "nobody/no-such-model-xyz")


def write_bytes(path, data: bytes):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("missing.jsonl.zst", None, "no such file or directory"),
        ("bad.jsonl", b"{not json\n", "JSON"),
        ("bad.jsonl.zst", b"this is not zstd", "zstd"),
        ("empty.jsonl", b"", "empty"),
    ],
)
def test_train_rejects_bad_data(capsys, tmp_path, name, content, fragment):
    path = str(tmp_path / name) if content is None else write_bytes(tmp_path / name, content)
    args = [*BASE, "--run_dir", str(tmp_path / "runs"), "--path", path]
    fails_with(capsys, train_command.main, args, fragment)


def test_train_rejects_data_without_text(capsys, tmp_path):
    rows = "".join(json.dumps({"text": ""}) + "\n" for _ in range(3)).encode()
    path = write_bytes(tmp_path / "blank.jsonl.zst", zstandard.ZstdCompressor().compress(rows))
    args = [*BASE, "--run_dir", str(tmp_path / "runs"), "--path", path]
    fails_with(capsys, train_command.main, args, "holds no text")


def copy_checkpoint(tmp_path, edit=None):
    folder = tmp_path / "ckpt"
    shutil.copytree(GOLDENS / "mlsae-tfm-trained", folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_name"] = TINY
    if edit:
        edit(config)
    (folder / "config.json").chmod(0o644)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_loading_config_with_missing_key_or_wrong_type(capsys, tmp_path):
    folder = copy_checkpoint(tmp_path, lambda c: c.pop("standardize"))
    with pytest.warns(UserWarning, match="lacks config keys.*standardize=True"):
        MLSAETransformer.from_pretrained(folder)
    shutil.rmtree(folder)
    folder = copy_checkpoint(tmp_path, lambda c: c.update(k="six", standardize=1))
    with pytest.raises(ValueError, match=r"wrong type: .*k='six'.*standardize=1"):
        MLSAETransformer.from_pretrained(folder)


def test_loading_shapes_that_disagree_with_config(tmp_path):
    folder = copy_checkpoint(tmp_path, lambda c: c.update(expansion_factor=4))
    with pytest.raises(ValueError, match=r"autoencoder.encoder.weight \(384, 48\)"):
        MLSAETransformer.from_pretrained(folder)


def test_checkpoint_for_another_model(capsys, tmp_path):
    folder = copy_checkpoint(tmp_path)
    args = ["--repo_id", str(folder), "--model_name", "quickstart/model", "--path", CORPUS]
    # test.py's --model_name names the published models of a sweep; the override is explicit:
    with pytest.raises(ValueError, match="trained on .*tiny-gpt-neox-2.*not 'quickstart/model'"):
        MLSAETransformer.from_pretrained(folder, model_name="quickstart/model")
    missing = str(tmp_path / "nothing.zst")
    fails_with(capsys, test_command.main, [*args[:2], "--path", missing], "no such file")


def test_corrupt_resume_checkpoint_is_named(capsys, tmp_path):
    broken = tmp_path / "last.ckpt"
    broken.write_bytes(b"truncated")
    args = [*BASE, "--run_dir", str(tmp_path), "--checkpoint_path", str(broken)]
    fails_with(capsys, train_command.main, args, f"cannot read checkpoint {broken}")
