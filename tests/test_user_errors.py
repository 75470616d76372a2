"""What a new user's mistakes print: one `error:` line that names the problem and what to do,
exit status 2, and, without the hub, no more than the one attempt that tells it is out of
reach (none with HF_HUB_OFFLINE=1)."""

import importlib
import re
import shutil
import warnings

import pytest

from mlsae.cli import parse, run_command
from tests.goldens import GOLDENS

train_command = importlib.import_module("mlsae.trainer.train")
test_command = importlib.import_module("mlsae.trainer.test")
upload_command = importlib.import_module("mlsae.trainer.upload")

TINY = str(GOLDENS / "tiny-gpt-neox-2")
CORPUS = str(GOLDENS / "corpus.jsonl.zst")
PUBLISHED = "tim-lawson/mlsae-pythia-70m-deduped-x64-k32-tfm"
TRAIN = ["--model_name", TINY, "--path", CORPUS, "--max_length", "32", "--batch_size", "2",
         "--expansion_factor", "2", "-k", "4", "--auxk", "8", "--accumulate_grad_batches", "1",
         "--max_tokens", "128", "--val_tokens", "64", "--logger", "none"]  # fmt: skip
ANALYSES = ["dists", "examples", "heatmaps", "variances", "geometry"]


def error_line(capsys, main, args) -> str:
    """The one `error:` line that `main(args)` ends with, under `run_command`."""
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: main(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    return errors[0]


def analysis_main(name: str):
    return importlib.import_module(f"mlsae.analysis.{name}").main


def test_analysis_without_the_hub_names_the_model_after_one_attempt(capsys, unreachable_hub):
    line = error_line(capsys, analysis_main("dists"), [])
    assert f"cannot load the MLSAE '{PUBLISHED}'" in line
    assert "huggingface.co) cannot be reached" in line
    assert "--repo_id" in line and "quickstart/model" in line
    assert unreachable_hub == ["huggingface.co"]


def test_analysis_with_hub_offline_says_so_without_trying(capsys, hub_offline):
    line = error_line(capsys, analysis_main("dists"), [])
    assert f"'{PUBLISHED}': HF_HUB_OFFLINE=1 is set" in line
    assert "quickstart" in line
    assert hub_offline == []


@pytest.mark.parametrize("name", ANALYSES)
def test_every_analysis_reports_a_missing_model_folder(capsys, unreachable_hub, name):
    line = error_line(capsys, analysis_main(name), ["--repo_id", "/path/that/does/not/exist"])
    assert line == "error: the model folder /path/that/does/not/exist does not exist"
    assert unreachable_hub == []


def test_train_on_a_hub_model_without_the_hub(capsys, tmp_path, unreachable_hub):
    args = [*TRAIN, "--run_dir", str(tmp_path), "--model_name", "nobody/no-such-model-xyz"]
    line = error_line(capsys, train_command.main, args)
    assert "cannot load the language model 'nobody/no-such-model-xyz'" in line
    assert "--model_name" in line and "quickstart/model" in line
    assert unreachable_hub == ["huggingface.co"]


def test_train_on_a_hub_dataset_without_the_hub(capsys, tmp_path, unreachable_hub):
    args = [*TRAIN, "--run_dir", str(tmp_path), "--path", "nobody/no-such-dataset"]
    line = error_line(capsys, train_command.main, args)
    assert "cannot stream the hub dataset 'nobody/no-such-dataset'" in line
    assert "--path" in line and "quickstart/data" in line
    assert unreachable_hub == ["huggingface.co"]


def test_a_typo_in_a_local_data_path_is_reported_at_once(
    capsys, tmp_path, monkeypatch, unreachable_hub
):
    (tmp_path / "corpus" / "data").mkdir(parents=True)
    shutil.copy(CORPUS, tmp_path / "corpus" / "data" / "train.jsonl.zst")
    monkeypatch.chdir(tmp_path)
    args = [*TRAIN, "--run_dir", str(tmp_path / "runs"), "--path", "corpus/dat"]
    line = error_line(capsys, train_command.main, args)
    assert line == "error: no such file or directory: 'corpus/dat' (did you mean 'corpus/data'?)"
    assert unreachable_hub == []


def test_a_typo_in_a_local_model_name_is_reported_at_once(
    capsys, tmp_path, monkeypatch, unreachable_hub
):
    shutil.copytree(TINY, tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    args = [*TRAIN, "--run_dir", str(tmp_path / "runs"), "--model_name", "models/tinny"]
    line = error_line(capsys, train_command.main, args)
    assert line == (
        "error: the language model folder models/tinny does not exist (did you mean models/tiny?)"
    )
    assert unreachable_hub == []


def test_test_of_a_language_model_folder_says_what_it_is(capsys, unreachable_hub):
    args = ["--repo_id", TINY, "--path", CORPUS, "--max_length", "32"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = error_line(capsys, test_command.main, args)
    assert line == (
        f"error: {TINY} is a Hugging Face language model, not an MLSAE: pass it as "
        "--model_name (model_name= in Python)"
    )
    assert not [w for w in caught if "config keys" in str(w.message)]
    assert unreachable_hub == []


def test_test_loads_a_model_with_the_language_model_named_by_model_name(
    capsys, tmp_path, monkeypatch, unreachable_hub
):
    # The golden model stores "tiny-gpt-neox-2", which is not found from tmp_path.
    shutil.copytree(GOLDENS / "mlsae-tfm-trained", tmp_path / "model")
    shutil.copytree(TINY, tmp_path / "elsewhere" / "lm")
    monkeypatch.chdir(tmp_path)
    args = ["--repo_id", "model", "--path", CORPUS, "--max_length", "32", "--batch_size", "2",
            "--max_tokens", "64", "--output_dir", "out"]  # fmt: skip
    line = error_line(capsys, test_command.main, args)
    assert "'tiny-gpt-neox-2'" in line and "--model_name" in line
    (written,) = test_command.main([*args, "--model_name", "elsewhere/lm"])
    assert written.is_file()
    line = error_line(capsys, test_command.main, [*args, "--model_name", "elsewhere/lm", "b/c"])
    assert line == (
        "error: with --repo_id, give one --model_name (the language model to load model with), "
        "got 2"
    )
    assert unreachable_hub == ["huggingface.co"]  # the one probe that tells the hub is away


@pytest.mark.parametrize(
    ("command", "args", "wrong", "right"),
    [
        ("train", ["--expansion_factr", "4"], "--expansion_factr", "--expansion_factor"),
        ("train", ["--max-tokens=5"], "--max-tokens", "--max_tokens"),
        ("test", ["--repoid", "x"], "--repoid", "--repo_id"),
        ("upload", ["--ckpt_path", "x", "--privte"], "--privte", "--private"),
        ("dists", ["--count_specal_tokens"], "--count_specal_tokens", "--count_special_tokens"),
    ],
)
def test_an_unknown_option_names_the_closest_one(capsys, command, args, wrong, right):
    module = {"train": train_command, "test": test_command, "upload": upload_command}
    main = module[command].main if command in module else analysis_main(command)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: unrecognized arguments: " + wrong in line
    assert line.endswith(f"(did you mean {right}?)")


def test_several_unknown_options_each_get_their_closest():
    from mlsae.cli import closest_options

    options = ["--expansion_factor", "--max_tokens", "-k", "--help"]
    message = "unrecognized arguments: --expansion_factr 4 --max_token=3 --zzz"
    assert closest_options(message, options) == (
        " (did you mean --expansion_factor for --expansion_factr, --max_tokens for --max_token?)"
    )
    assert closest_options("unrecognized arguments: --zzz", options) == ""
    assert closest_options("argument -k: expected one argument", options) == ""


def test_parse_still_parses():
    from mlsae.trainer.config import RunConfig

    config = parse(RunConfig, ["--expansion_factor", "4", "-k", "3", "--path", "x"])
    assert (config.autoencoder.expansion_factor, config.autoencoder.k) == (4, 3)
    assert config.data.path == "x"


@pytest.mark.parametrize("command", ["train", "test", *ANALYSES])
def test_help_gives_each_default_once_and_every_option_some_help(capsys, command):
    module = {"train": train_command, "test": test_command}
    main = module[command].main if command in module else analysis_main(command)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    options = re.split(r"\n  (?=-)", capsys.readouterr().out)[1:]
    assert len(options) > 5
    for option in options:
        name, _, text = " ".join(option.split()).partition(" ")
        assert "(default: None)" not in text, name
        assert text.lower().count("default") <= 1 or "(default:" not in text, name
        words = re.sub(r"\{.*?\}|\[.*?\]|--?\w+|\b(list|bool|str|int|float)\b", "", text)
        assert re.search(r"[a-z]{4}", words), f"{name} has no help"
