"""What a user's mistakes with the figure scripts print: one `error:` line that names the
problem and what to do, exit status 2, and, without the hub, no more than the one attempt
that tells it is out of reach (none with HF_HUB_OFFLINE=1)."""

import importlib
import runpy
import sys
from pathlib import Path

import pytest
from datasets.exceptions import DatasetNotFoundError
from transformers import AutoTokenizer

import figures
from figures import dists_input
from mlsae.analysis.dists import Dists
from mlsae.analysis.mmcs import DECODER_KEYS
from mlsae.cli import DEFAULT_TEST_PATH
from mlsae.names import cache_path
from tests.analysis import CORPUS, GOLDEN_MODEL, GOLDEN_TRANSFORMER
from tests.goldens import GOLDENS
from tests.test_user_errors import error_line

DISTS_SCRIPTS = ["dists_cos_sim", "dists_heatmaps", "dists_layer_mean", "dists_layer_std"]
MODEL_SCRIPTS = [*DISTS_SCRIPTS, "mmcs", "prompt_heatmaps", "test_tables"]
"""The scripts whose models are --repo_id (resid_cos_sim's are --model_name)."""

SCRIPTS = [*MODEL_SCRIPTS, "resid_cos_sim"]
FIGURES = Path(figures.__file__).parent
PUBLISHED = "tim-lawson/mlsae-pythia-70m-deduped-x64-k32-tfm"
PUBLISHED_TRANSFORMER = "EleutherAI/pythia-70m-deduped"


def figure_main(name: str):
    return importlib.import_module(f"figures.{name}").main


def model_option(name: str) -> str:
    return "--model_name" if name == "resid_cos_sim" else "--repo_id"


def folder_kind(name: str) -> str:
    return "the language model folder" if name == "resid_cos_sim" else "the model folder"


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty working directory: no `out/` caches, no `data/test.jsonl.zst`."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_missing_model_folder_is_reported_at_once(capsys, workdir, unreachable_hub, name):
    missing = str(workdir / "no" / "such")
    line = error_line(capsys, figure_main(name), [model_option(name), missing, "--device=cpu"])
    assert line == f"error: {folder_kind(name)} {missing} does not exist"
    assert unreachable_hub == []


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_typo_in_a_model_folder_names_the_closest(capsys, workdir, unreachable_hub, name):
    (workdir / "runs" / "quickstart" / "model").mkdir(parents=True)
    args = [model_option(name), "runs/quickstart/modl", "--device=cpu"]
    line = error_line(capsys, figure_main(name), args)
    assert line == (
        f"error: {folder_kind(name)} runs/quickstart/modl does not exist "
        "(did you mean runs/quickstart/model?)"
    )
    assert unreachable_hub == []


@pytest.mark.parametrize("hub", ["unreachable_hub", "hub_offline"])
@pytest.mark.parametrize("name", SCRIPTS)
def test_a_hub_model_without_the_hub_is_named_after_one_attempt(
    capsys, workdir, request, hub, name
):
    attempts = request.getfixturevalue(hub)
    # resid_cos_sim checks its data before it loads the transformer.
    data = [f"--path={CORPUS}"] if name == "resid_cos_sim" else []
    line = error_line(capsys, figure_main(name), [*data, "--device=cpu"])
    model = PUBLISHED_TRANSFORMER if name == "resid_cos_sim" else PUBLISHED
    assert model in line
    if name == "test_tables":  # It reads CSVs only: the hub is never needed.
        assert f"no test CSV for {model}" in line and "python test.py" in line
        assert attempts == []
        return
    if hub == "unreachable_hub":
        assert "the hub (huggingface.co) cannot be reached" in line
        assert attempts == ["huggingface.co"]
    else:
        assert "HF_HUB_OFFLINE=1 is set" in line
        assert attempts == []
    if name in DISTS_SCRIPTS:
        assert "--dists_source compute" in line and "python -m mlsae.analysis.dists" in line
    else:
        assert "quickstart" in line


@pytest.mark.parametrize("name", SCRIPTS)
def test_an_unknown_option_names_the_closest_one(capsys, name):
    with pytest.raises(SystemExit) as exit_info:
        figure_main(name)(["--output_dri", "x"])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: unrecognized arguments: --output_dri" in line
    assert line.endswith("(did you mean --output_dir?)")


@pytest.mark.parametrize("name", SCRIPTS)
def test_python_dash_m_runs_main_under_run_command(capsys, workdir, monkeypatch, name):
    missing = str(workdir / "missing")
    monkeypatch.setattr(sys, "argv", [f"figures.{name}", model_option(name), missing])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(FIGURES / f"{name}.py"), run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip() == f"error: {folder_kind(name)} {missing} does not exist"


# Script-specific inputs ---------------------------------------------------------------------


def dists_args(workdir: Path, *args: str) -> list[str]:
    return [*args, f"--analysis_dir={workdir / 'out'}", f"--output_dir={workdir / 'fig'}"]


@pytest.mark.parametrize("name", DISTS_SCRIPTS)
def test_a_missing_dists_file_is_not_looked_up_on_the_hub(capsys, workdir, unreachable_hub, name):
    line = error_line(capsys, figure_main(name), ["--repo_id", "dists.safetensors"])
    assert line == "error: the dists file dists.safetensors does not exist"
    assert unreachable_hub == []


def test_a_dists_file_that_is_no_dists_file(capsys, workdir):
    args = ["--repo_id", str(GOLDENS / "golden-tfm.safetensors"), "--device=cpu"]
    line = error_line(capsys, figure_main("dists_heatmaps"), args)
    assert line.startswith(f"error: cannot read dists from {GOLDENS / 'golden-tfm.safetensors'}")
    assert "'counts'" in line and "mlsae.analysis.dists" in line


def test_a_corrupt_cached_dists_file_says_to_recompute(capsys, workdir):
    cached = cache_path(str(GOLDEN_MODEL), "dists", "safetensors", str(workdir / "out"))
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not safetensors")
    args = dists_args(workdir, "--repo_id", str(GOLDEN_MODEL), "--device=cpu")
    line = error_line(capsys, figure_main("dists_layer_std"), args)
    assert line.startswith(f"error: cannot read the cached dists {cached}")
    assert line.endswith("delete it or pass --recompute")


def test_hub_dists_of_a_local_folder_are_refused(capsys, workdir, unreachable_hub):
    args = dists_args(workdir, "--repo_id", str(GOLDEN_MODEL), "--dists_source=hub")
    line = error_line(capsys, figure_main("dists_layer_mean"), args)
    assert line == (
        f"error: --dists_source hub: {GOLDEN_MODEL} is a local folder, whose dists are not "
        "on the hub; pass --dists_source compute with the data options (--path, --split, "
        "--max_tokens)"
    )
    assert unreachable_hub == []


def test_a_failed_download_of_published_dists_says_how_to_compute_them(
    capsys, workdir, monkeypatch
):
    def not_on_the_hub(repo_id, device):
        raise DatasetNotFoundError(
            "Dataset 'someone/mlsae-x-x2-k1-dists' doesn't exist\non the Hub"
        )

    monkeypatch.setattr(dists_input, "offline_reason", lambda: None)
    monkeypatch.setattr(Dists, "from_hub", not_on_the_hub)
    line = error_line(
        capsys, figure_main("dists_heatmaps"), ["--repo_id=someone/mlsae-x-x2-k1-tfm"]
    )
    assert line == (
        "error: out/someone-mlsae-x-x2-k1-dists.safetensors does not exist and the published "
        "dists of someone/mlsae-x-x2-k1-tfm could not be downloaded (DatasetNotFoundError: "
        "Dataset 'someone/mlsae-x-x2-k1-dists' doesn't exist on the Hub); compute them with "
        "`python -m mlsae.analysis.dists --repo_id someone/mlsae-x-x2-k1-tfm --output_dir out "
        "--path <data> --split <split> --max_length <n> --batch_size <n> --max_tokens <n>`, or "
        "pass --dists_source compute with those data options"
    )


def test_dists_without_data_say_how_to_compute_them(capsys, workdir, unreachable_hub):
    args = dists_args(
        workdir, "--repo_id", str(GOLDEN_MODEL), "--model_name", str(GOLDEN_TRANSFORMER)
    )
    line = error_line(capsys, figure_main("dists_cos_sim"), [*args, "--device=cpu"])
    assert line.startswith(f"error: cannot compute the dists of {GOLDEN_MODEL}: ")
    assert f"{DEFAULT_TEST_PATH} does not exist" in line
    assert f"python -m mlsae.analysis.dists --repo_id {GOLDEN_MODEL}" in line
    assert unreachable_hub == []


def test_two_transformers_for_explicit_models_are_refused(capsys, workdir):
    args = ["--repo_id", str(GOLDEN_MODEL), "--model_name", "a", "b"]
    line = error_line(capsys, figure_main("dists_heatmaps"), args)
    assert line == "error: with --repo_id, give at most one --model_name"


def test_mmcs_of_a_language_model_names_the_decoder_keys(capsys, unreachable_hub):
    line = error_line(capsys, figure_main("mmcs"), ["--repo_id", str(GOLDEN_TRANSFORMER)])
    assert line.startswith(
        f"error: {GOLDEN_TRANSFORMER / 'model.safetensors'} holds none of {', '.join(DECODER_KEYS)}"
    )
    assert "-tfm or plain autoencoder" in line
    assert unreachable_hub == []


def test_mmcs_of_a_folder_without_weights(capsys, tmp_path, unreachable_hub):
    (tmp_path / "config.json").write_text("{}")
    line = error_line(capsys, figure_main("mmcs"), ["--repo_id", str(tmp_path)])
    assert line == (
        f"error: {tmp_path} has no model.safetensors: pass the folder of a pretrained MLSAE "
        "(-tfm or plain autoencoder)"
    )
    assert unreachable_hub == []


def test_mmcs_of_corrupt_weights(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    line = error_line(capsys, figure_main("mmcs"), ["--repo_id", str(tmp_path)])
    assert line.startswith(f"error: cannot read {tmp_path / 'model.safetensors'} (")
    assert line.endswith("pass the folder of a pretrained MLSAE (-tfm or plain autoencoder)")


def test_mmcs_of_a_file_asks_for_its_folder(capsys, unreachable_hub):
    path = GOLDENS / "golden-ae.safetensors"
    line = error_line(capsys, figure_main("mmcs"), ["--repo_id", str(path)])
    assert line == (
        f"error: {path} is a file: pass the folder that holds the model's model.safetensors "
        "and config.json"
    )
    assert unreachable_hub == []


@pytest.mark.parametrize("words", [0, 300])
def test_prompt_heatmaps_of_an_empty_or_oversized_prompt(capsys, tmp_path, words):
    prompt = "word " * words
    args = ["--repo_id", str(GOLDEN_MODEL), "--model_name", str(GOLDEN_TRANSFORMER)]
    args += [f"--prompt={prompt}", f"--output_dir={tmp_path}", "--device=cpu"]
    line = error_line(capsys, figure_main("prompt_heatmaps"), args)
    if not words:
        assert line == "error: the prompt is empty"
        return
    tokenizer = AutoTokenizer.from_pretrained(str(GOLDEN_TRANSFORMER))
    context = 128  # max_position_embeddings of tiny-gpt-neox-2
    n_tokens = len(tokenizer(prompt)["input_ids"])
    assert n_tokens > context
    assert line == (
        f"error: the prompt has {n_tokens} tokens, more than the {context} that fit the "
        "model's context: shorten it"
    )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("text", ["layer,block\n", "a,b\n1,2\n", ""])
def test_resid_cos_sim_of_a_broken_cached_geometry(capsys, workdir, text):
    path = workdir / "out" / "tiny-geometry.csv"
    path.parent.mkdir()
    path.write_text(text)
    line = error_line(capsys, figure_main("resid_cos_sim"), ["--model_name=someone/tiny"])
    assert line.startswith("error: out/tiny-geometry.csv is not a geometry CSV")
    assert line.endswith("pass --recompute to compute it again")


def test_resid_cos_sim_without_data_says_how_to_compute(capsys, workdir, unreachable_hub):
    args = ["--model_name", str(GOLDEN_TRANSFORMER), "--device=cpu"]
    line = error_line(capsys, figure_main("resid_cos_sim"), args)
    assert line.startswith(f"error: cannot compute the geometry of {GOLDEN_TRANSFORMER}: ")
    assert f"{DEFAULT_TEST_PATH} does not exist" in line
    assert f"python -m mlsae.analysis.geometry --model_name {GOLDEN_TRANSFORMER}" in line
    assert unreachable_hub == []


@pytest.mark.parametrize("text", ["", "train/fvu/avg\n"])
def test_test_tables_of_an_empty_test_csv(capsys, workdir, text):
    path = workdir / "out" / "test_mlsae-x-x2-k1-tfm.csv"
    path.parent.mkdir()
    path.write_text(text)
    line = error_line(capsys, figure_main("test_tables"), ["--repo_id=someone/mlsae-x-x2-k1-tfm"])
    assert line == (
        "error: out/test_mlsae-x-x2-k1-tfm.csv has no rows: run "
        "`python test.py --repo_id someone/mlsae-x-x2-k1-tfm --output_dir out` again"
    )


def test_test_tables_name_every_missing_csv_on_one_line(capsys, workdir):
    args = ["--repo_id", "someone/mlsae-a-x2-k1-tfm", "someone/mlsae-b-x2-k1-tfm"]
    line = error_line(capsys, figure_main("test_tables"), args)
    assert line == (
        "error: no test CSV for someone/mlsae-a-x2-k1-tfm (out/test_mlsae-a-x2-k1-tfm.csv), "
        "someone/mlsae-b-x2-k1-tfm (out/test_mlsae-b-x2-k1-tfm.csv): run "
        "`python test.py --repo_id <model> --output_dir out` with the data options for each"
    )
