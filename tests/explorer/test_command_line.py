"""`python -m mlsae.explorer`'s options: their help, and the mistakes it refuses before
serving."""

import re
from pathlib import Path

import pytest
import uvicorn

import mlsae.explorer.__main__ as explorer_main
from mlsae.cli import run_command
from mlsae.model.lightning import MLSAETransformer


def option_help(text: str) -> dict[str, str]:
    """Each option's help in `--help` output, whitespace collapsed."""
    blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    return {block.split()[0].rstrip(","): " ".join(block.split()) for block in blocks[1:]}


def test_help_shows_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        explorer_main.parse_args(["--help"])
    assert stopped.value.code == 0
    helps = option_help(capsys.readouterr().out)
    defaults = vars(explorer_main.parse_args(["--repo_id", "x"]))
    assert set(helps) == {"-h"} | {f"--{name}" for name in defaults}
    for option, text in helps.items():
        if option not in ("-h", "--repo_id"):
            assert "default" in text.lower(), text
    for name in ("host", "port", "output_dir", "cache_size"):
        assert f"(default: {defaults[name]})" in helps[f"--{name}"]
    for name in ("cache_mb", "max_body_mb"):
        assert f"(default: {defaults[name]:g})" in helps[f"--{name}"]
    assert defaults["cache_mb"] == 512 and defaults["max_body_mb"] == 4


def fail_if_called(*args, **kwargs):
    raise AssertionError("the model must not be loaded")


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with one trained model, out/runs/quickstart/model; loading any
    model fails the test."""
    model = tmp_path / "out" / "runs" / "quickstart" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(MLSAETransformer, "from_pretrained", fail_if_called)
    return tmp_path


def run_explorer(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The explorer's one-line error and exit status 2, as `python -m mlsae.explorer`."""
    with pytest.raises(SystemExit) as stopped:
        run_command(lambda: explorer_main.main(args))
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_a_misspelled_model_folder_is_one_error_line(
    runs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = run_explorer(["--repo_id", "out/runs/quickstart/modl"], capsys)
    assert "out/runs/quickstart/modl does not exist" in line
    assert "did you mean out/runs/quickstart/model?" in line
    assert "out/runs/<run>/model" in line


@pytest.mark.parametrize(
    ("repo_id", "meant"),
    [
        ("out/runs/quickstrat/model", "out/runs/quickstart/model"),
        ("out/rusn/quickstart/model", "out/runs/quickstart/model"),
        ("./out/runs/quick-start/model", "out/runs/quickstart/model"),
    ],
)
def test_a_misspelled_folder_above_the_model_is_named(
    runs: Path, capsys: pytest.CaptureFixture[str], repo_id: str, meant: str
) -> None:
    line = run_explorer(["--repo_id", repo_id], capsys)
    assert f"--repo_id {repo_id} does not exist (did you mean {meant}?)" in line


def test_no_guess_without_a_model_folder_there(
    runs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (runs / "out" / "runs" / "quickstarts").mkdir()  # close to the name, but holds no model
    line = run_explorer(["--repo_id", "out/runs/quickstartz/model"], capsys)
    assert "did you mean out/runs/quickstart/model?" in line
    line = run_explorer(["--repo_id", "out/runs/quickstartz/weights"], capsys)
    assert "did you mean" not in line


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--cache_size", "0"),
        ("--cache_size", "two"),
        ("--max_prompt_tokens", "0"),
        ("--max_prompt_tokens", "-1"),
        ("--port", "65536"),
        ("--port", "-1"),
    ],
)
def test_counts_and_ports_out_of_range_are_refused(
    capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    with pytest.raises(SystemExit) as stopped:
        explorer_main.parse_args(["--repo_id", "x", option, value])
    assert stopped.value.code == 2
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert f"error: argument {option}: expected" in last_line
    assert repr(value) in last_line


def test_counts_and_ports_in_range_are_taken() -> None:
    args = ["--repo_id", "x", "--cache_size", "1", "--max_prompt_tokens", "1", "--port", "0"]
    options = explorer_main.parse_args(args)
    assert (options.cache_size, options.max_prompt_tokens, options.port) == (1, 1, 0)
    assert explorer_main.parse_args(["--repo_id", "x", "--port", "65535"]).port == 65535


@pytest.mark.parametrize(
    "repo_id", ["./modl", "out/modl", "~/no-such-folder-here", "/no/such/folder", "a/b/c"]
)
def test_a_missing_local_path_is_refused_without_loading(
    runs: Path, capsys: pytest.CaptureFixture[str], repo_id: str
) -> None:
    assert f"--repo_id {repo_id} does not exist" in run_explorer(["--repo_id", repo_id], capsys)


def test_a_file_is_no_model_folder(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (runs / "notes.txt").write_text("")
    assert "is a file, not a folder" in run_explorer(["--repo_id", "./notes.txt"], capsys)


@pytest.mark.parametrize("repo_id", ["tim-lawson/mlsae-pythia-70m-deduped-x64-k32-tfm", "name"])
def test_a_hub_id_is_left_to_the_loader(runs: Path, repo_id: str) -> None:
    assert not explorer_main.looks_local(repo_id)
    explorer_main.check_model_folder(repo_id)


def test_a_prompt_the_model_cannot_take_is_one_error_line(
    runs: Path,
    model: MLSAETransformer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(MLSAETransformer, "from_pretrained", lambda *args, **kwargs: model)
    monkeypatch.setattr(uvicorn, "run", fail_if_called)
    prompt = "a " * 200
    n_tokens = len(model.transformer.tokenizer(prompt)["input_ids"])
    args = ["--repo_id", "out/runs/quickstart/model", "--device", "cpu", "--prompt", prompt]
    line = run_explorer(args, capsys)
    assert line.startswith(f"error: --prompt: the prompt has {n_tokens} tokens, more than the 128")
