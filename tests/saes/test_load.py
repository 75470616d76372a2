"""`load_sae`: which format a folder or file is in, subfolders, options, and the hub (a
local folder served in its place, or no hub at all)."""

import shutil

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from mlsae.cli import run_command
from mlsae.lm.hub_access import HubUnreachableError, PathNotFoundError
from mlsae.saes import FORMATS, SAEFileError, load_sae
from mlsae.saes.registry import detect
from tests.goldens import GOLDENS
from tests.saes.fake_hub import serve

D_IN, D_SAE = 4, 6


def gemma_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "W_enc": rng.normal(size=(D_IN, D_SAE)).astype(np.float32),
        "W_dec": rng.normal(size=(D_SAE, D_IN)).astype(np.float32),
        "b_enc": np.zeros(D_SAE, dtype=np.float32),
        "b_dec": np.zeros(D_IN, dtype=np.float32),
        "threshold": np.full(D_SAE, 0.1, dtype=np.float32),
    }


def linear_state() -> dict[str, torch.Tensor]:
    return {
        "encoder.weight": torch.randn(D_SAE, D_IN),
        "encoder.bias": torch.zeros(D_SAE),
        "decoder.weight": torch.randn(D_IN, D_SAE),
        "decoder.bias": torch.zeros(D_IN),
    }


@pytest.fixture
def releases(tmp_path):
    """A folder of several SAEs, one per subfolder (and nested ones)."""
    root = tmp_path / "releases"
    gemma = root / "layer_3" / "width_16k" / "average_l0_50"
    gemma.mkdir(parents=True)
    np.savez(gemma / "params.npz", **gemma_params())
    (root / "layer_4").mkdir()
    np.savez(root / "layer_4" / "params.npz", **gemma_params())
    shutil.copytree(GOLDENS / "mlsae-ae-trained", root / "mlsae")
    (root / "plain").mkdir()
    torch.save(linear_state(), root / "plain" / "sae.pt")
    save_file(linear_state(), root / "plain" / "sae.safetensors")
    return root


def test_the_formats_in_their_detection_order():
    assert list(FORMATS)[0] == "mlsae"
    assert {"mlsae", "gemma_scope", "state_dict"} <= set(FORMATS)


@pytest.mark.parametrize(
    ("inside", "format"),
    [
        ("layer_4", "gemma_scope"),
        ("layer_4/params.npz", "gemma_scope"),
        ("layer_3/width_16k/average_l0_50", "gemma_scope"),
        ("mlsae", "mlsae"),
        ("mlsae/config.json", "mlsae"),
        ("plain/sae.pt", "state_dict"),
        ("plain/sae.safetensors", "state_dict"),
    ],
)
def test_each_format_is_detected(releases, inside, format):
    assert detect(releases / inside).name == format
    assert load_sae(releases / inside).format == format


def test_a_language_model_folder_is_no_mlsae(tmp_path):
    shutil.copytree(GOLDENS / "tiny-gpt-neox-2", tmp_path / "lm")
    with pytest.raises(SAEFileError, match=r"lm is in no known SAE format \(found: config\.json"):
        load_sae(tmp_path / "lm")


def test_unknown_format_names_the_path_and_what_is_there(releases):
    with pytest.raises(SAEFileError) as error:
        load_sae(releases)
    message = str(error.value)
    assert (
        f"{releases} is in no known SAE format (found: layer_3, layer_4, mlsae, plain)" in message
    )
    assert "pass format= one of mlsae, " in message and "subfolder=" in message


def test_an_unknown_format_name(releases):
    with pytest.raises(SAEFileError, match=r"unknown format 'gemma'; expected one of mlsae, "):
        load_sae(releases / "layer_4", format="gemma")


def test_options_the_format_does_not_take(releases):
    with pytest.raises(SAEFileError, match=r"the gemma_scope format takes no option hookpoints, "):
        load_sae(releases / "layer_4", hookpoints="x", k=3)
    with pytest.raises(SAEFileError, match=r"\(its options: layer, site\)"):
        load_sae(releases / "layer_4", k=3)


def test_subfolder(releases):
    assert load_sae(releases, subfolder="layer_4").layer == 4
    assert load_sae(releases, hookpoint="layer_3/width_16k/average_l0_50").layer == 3
    with pytest.raises(SAEFileError, match="not both"):
        load_sae(releases, subfolder="layer_3", hookpoint="layer_4")


def test_missing_subfolder_lists_the_subfolders(releases):
    with pytest.raises(SAEFileError) as error:
        load_sae(releases, subfolder="layer_5")
    assert "has no subfolder layer_5 (it holds layer_3, layer_4, mlsae, plain)" in str(error.value)
    with pytest.raises(SAEFileError, match=r"sae\.pt has no subfolder x \(it is a file, not a"):
        load_sae(releases / "plain" / "sae.pt", subfolder="x")


def test_missing_nested_subfolder_lists_where_the_path_stops(releases):
    with pytest.raises(SAEFileError) as error:
        load_sae(releases, subfolder="layer_3/width_16k/average_l0_5")
    assert (
        "has no subfolder layer_3/width_16k/average_l0_5 (layer_3/width_16k holds "
        "layer_3/width_16k/average_l0_50)"
    ) in str(error.value)
    with pytest.raises(SAEFileError, match=r"layer_9/width_16k \(it holds layer_3, layer_4, "):
        load_sae(releases, subfolder="layer_9/width_16k")


def test_missing_local_path_is_reported_at_once(tmp_path, monkeypatch, unreachable_hub):
    (tmp_path / "gemma-sae").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PathNotFoundError) as error:
        load_sae("./gemma-sea")
    assert str(error.value) == "the SAE ./gemma-sea does not exist (did you mean ./gemma-sae?)"
    assert unreachable_hub == []


def test_hub_offline_gives_one_error_naming_the_sae(tmp_path, monkeypatch, hub_offline):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(HubUnreachableError) as error:
        load_sae("someone/some-saes", subfolder="layer_3")
    message = str(error.value)
    assert message.startswith("cannot load the SAE 'someone/some-saes': HF_HUB_OFFLINE=1 is set")
    assert hub_offline == []


def test_hub_unreachable_gives_one_error_naming_the_sae(tmp_path, monkeypatch, unreachable_hub):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(
        HubUnreachableError, match=r"cannot load the SAE 'someone/some-saes': the hub"
    ):
        load_sae("someone/some-saes")
    assert len(unreachable_hub) == 1  # the one probe


def test_hub_repository_with_the_sae_at_its_root(tmp_path, monkeypatch, releases):
    (releases / "layer_4" / "README.md").write_text("a Gemma Scope SAE")
    hub = serve(monkeypatch, tmp_path, "someone/one-sae", releases / "layer_4")
    sae = load_sae("someone/one-sae", layer=4)
    assert (sae.format, sae.layer) == ("gemma_scope", 4)
    assert hub.downloads == [["params.npz"]]


def test_hub_repository_with_saes_in_subfolders(tmp_path, monkeypatch, releases):
    hub = serve(monkeypatch, tmp_path, "someone/many-saes", releases)
    sae = load_sae("someone/many-saes", subfolder="layer_3/width_16k/average_l0_50")
    assert (sae.format, sae.layer) == ("gemma_scope", 3)
    assert hub.downloaded() == ["layer_3/width_16k/average_l0_50/params.npz"]
    assert load_sae("someone/many-saes", subfolder="mlsae").format == "mlsae"
    assert hub.downloaded() == ["mlsae/README.md", "mlsae/config.json", "mlsae/model.safetensors"]


def test_hub_repository_without_an_sae_at_its_root_lists_subfolders(
    tmp_path, monkeypatch, releases
):
    (releases / "README.md").write_text("many SAEs")
    serve(monkeypatch, tmp_path, "someone/many-saes", releases)
    with pytest.raises(SAEFileError) as error:
        load_sae("someone/many-saes")
    assert str(error.value) == (
        "the hub repository someone/many-saes has no SAE at its root; pass subfolder= one of "
        "layer_3, layer_4, mlsae, plain"
    )


def test_hub_repository_without_the_subfolder_lists_where_the_path_stops(
    tmp_path, monkeypatch, releases
):
    serve(monkeypatch, tmp_path, "someone/many-saes", releases)
    with pytest.raises(SAEFileError) as error:
        load_sae("someone/many-saes", subfolder="layer_3/width_16k/average_l0_5")
    assert str(error.value).endswith(
        "has no SAE under layer_3/width_16k/average_l0_5; pass subfolder= one of "
        "layer_3/width_16k/average_l0_50"
    )


def test_device_and_dtype(releases):
    sae = load_sae(releases / "layer_4", device="cpu", dtype=torch.float64)
    assert sae.W_enc.dtype == torch.float64
    assert sae.encode(torch.randn(2, 3, D_IN, dtype=torch.float64)).dtype == torch.float64


def test_a_mistake_is_one_error_line(releases, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_command(lambda: load_sae(releases, subfolder="layer_5"))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "has no subfolder layer_5" in err
