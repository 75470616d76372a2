"""Gemma Scope's `params.npz`: JumpReLU latents, no centring, the layer and site from the
release's path; checked against the Gemma Scope tutorial's formulas and SAELens' Gemma Scope
loader (their outputs recorded by scripts/crosscheck_gemma_scope.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mlsae.saes import SAEFileError, load_sae
from mlsae.saes.formats.saelens_config import hook_location
from tests.saes.fake_hub import serve

D_IN, D_SAE = 6, 10
OWNER = Path(__file__).resolve().parents[1] / "data" / "saes" / "gemma_scope"
OWNER_SAES = json.loads((OWNER / "owner.json").read_text())["saes"]


def write_marker(path: str) -> None:
    Path(path).write_text("code ran")


class RunsCodeWhenUnpickled:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return write_marker, (self.path,)


def params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {
        "W_enc": rng.normal(size=(D_IN, D_SAE)).astype(np.float32),
        "W_dec": (rng.normal(size=(D_SAE, D_IN)) * 2.5).astype(np.float32),
        "b_enc": (rng.normal(size=D_SAE) * 0.3).astype(np.float32),
        "b_dec": rng.normal(size=D_IN).astype(np.float32),
        "threshold": rng.uniform(0.2, 1.5, size=D_SAE).astype(np.float32),
    }


def release_folder(root: Path, release: str = "gemma-scope-2b-pt-res", layer: int = 12) -> Path:
    folder = root / release / f"layer_{layer}" / "width_16k" / "average_l0_82"
    folder.mkdir(parents=True)
    return folder


def check_formula(sae, p):
    t = {name: torch.from_numpy(value) for name, value in p.items()}
    x = torch.randn(2, 4, D_IN, generator=torch.Generator().manual_seed(0))
    pre = x @ t["W_enc"] + t["b_enc"]
    acts = torch.relu(pre) * (pre > t["threshold"])
    recons = acts @ t["W_dec"] + t["b_dec"]
    assert ((pre > 0) & (pre <= t["threshold"])).any(), "a latent below its threshold"
    assert (acts > 0).any()
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae.decode(acts), recons)
    torch.testing.assert_close(sae(x), recons)
    torch.testing.assert_close(sae.encode_sparse(x).to_dense(), acts)


# --- SAEs whose outputs the tutorial's formulas and SAELens recorded ---------------------


def owner_loads(name: str) -> dict:
    """The SAE `name` (`<repository>/<sae id>`) loaded from its folder, its file and the
    repository folder with subfolder=."""
    release, sae_id = name.split("/", 1)
    return {
        "folder": load_sae(OWNER / name),
        "file": load_sae(OWNER / name / "params.npz"),
        "subfolder": load_sae(OWNER / release, subfolder=sae_id),
    }


def check_owner_outputs(sae, expected: dict) -> None:
    """encode, decode and forward against the tutorial's and SAELens' outputs, on a few
    vectors and on a [2, 3, d] batch."""
    for suffix in ("", "_vectors"):
        x = expected["x" + suffix]
        acts = sae.encode(x)
        torch.testing.assert_close(acts, expected["encode" + suffix], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(acts, expected["saelens_encode" + suffix], atol=1e-6, rtol=1e-5)
        for latents, key in (
            (acts, "decode"),
            (expected["saelens_encode" + suffix], "saelens_decode"),
        ):
            torch.testing.assert_close(
                sae.decode(latents), expected[key + suffix], atol=1e-6, rtol=1e-5
            )
        for key in ("decode", "saelens_forward"):
            torch.testing.assert_close(sae(x), expected[key + suffix], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(sae.encode_sparse(x).to_dense(), acts)


@pytest.mark.parametrize("name", sorted(OWNER_SAES))
def test_matches_the_tutorial_and_saelens(name):
    expected = load_file(OWNER / name / "expected.safetensors")
    acts = torch.cat([expected["encode"].flatten(0, 1), expected["encode_vectors"]])
    fires = (acts != 0).sum(0)
    assert fires[:12].min() > 0 and fires[12:15].tolist() == [1, 1, 1] and fires[15] == 0
    for how, sae in owner_loads(name).items():
        assert (sae.format, sae.d_in, sae.d_sae) == ("gemma_scope", 8, 16), how
        check_owner_outputs(sae, expected)


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_14", (3, "resid_post")),
        ("gemma-scope-2b-pt-mlp/layer_0/width_16k/average_l0_9", (0, "mlp_out")),
        ("gemma-scope-2b-pt-att/layer_3/width_16k/average_l0_117", (3, "attn_z")),
    ],
)
def test_layer_and_site_from_the_path_as_saelens_hooks_them(name, where):
    assert hook_location(OWNER_SAES[name]["hook_name"]) == where
    for sae in owner_loads(name).values():
        assert (sae.layer, sae.site) == where


def test_loads_one_sae_from_the_hub(monkeypatch, tmp_path):
    repo = "google/gemma-scope-2b-pt-res"
    sae_id = "layer_3/width_16k/average_l0_14"
    # the hub cache keeps a repository's files under models--<owner>--<name>
    cache = tmp_path / "models--google--gemma-scope-2b-pt-res"
    hub = serve(monkeypatch, cache, repo, OWNER / "gemma-scope-2b-pt-res")
    sae = load_sae(repo, subfolder=sae_id)
    assert all(f.startswith(sae_id + "/") for f in hub.downloaded())
    assert (sae.format, sae.layer, sae.site) == ("gemma_scope", 3, "resid_post")
    check_owner_outputs(
        sae, load_file(OWNER / "gemma-scope-2b-pt-res" / sae_id / "expected.safetensors")
    )


# --- SAEs written here, against the tutorial's formulas ----------------------------------


def test_folder_file_and_format_given(tmp_path):
    p = params()
    folder = release_folder(tmp_path)
    np.savez(folder / "params.npz", **p)
    for sae in (
        load_sae(folder),
        load_sae(folder / "params.npz"),
        load_sae(folder, format="gemma_scope"),
        load_sae(tmp_path / "gemma-scope-2b-pt-res", subfolder="layer_12/width_16k/average_l0_82"),
    ):
        assert sae.format == "gemma_scope"
        assert (sae.d_in, sae.d_sae, sae.layer, sae.site) == (D_IN, D_SAE, 12, "resid_post")
        check_formula(sae, p)


@pytest.mark.parametrize(
    ("release", "site"),
    [
        ("gemma-scope-9b-pt-res-canonical", "resid_post"),
        ("gemma-scope-2b-pt-mlp", "mlp_out"),
        ("gemma-scope-2b-pt-att-canonical", "attn_z"),
        ("models--google--gemma-scope-27b-pt-res", "resid_post"),
    ],
)
def test_site_from_the_release_name(tmp_path, release, site):
    folder = release_folder(tmp_path, release, layer=3)
    np.savez(folder / "params.npz", **params())
    sae = load_sae(folder)
    assert (sae.layer, sae.site) == (3, site)


def test_options_say_where_the_files_do_not(tmp_path):
    np.savez(tmp_path / "params.npz", **params())
    assert (load_sae(tmp_path).layer, load_sae(tmp_path).site) == (None, None)
    sae = load_sae(tmp_path, layer=4, site="mlp_out")
    assert (sae.layer, sae.site) == (4, "mlp_out")
    folder = release_folder(tmp_path, layer=7)
    np.savez(folder / "params.npz", **params())
    assert load_sae(folder, layer=8).layer == 8


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "marker"
    payload = np.array([RunsCodeWhenUnpickled(marker)], dtype=object)
    np.savez(tmp_path / "params.npz", **params(), extra=payload)
    with pytest.raises(SAEFileError, match=r"params\.npz is not a readable Gemma Scope"):
        load_sae(tmp_path)
    assert not marker.exists()
    with np.load(tmp_path / "params.npz", allow_pickle=True) as unpickled:
        unpickled["extra"]
    assert marker.read_text() == "code ran"


def test_missing_tensor_is_named(tmp_path):
    p = params()
    del p["threshold"]
    np.savez(tmp_path / "params.npz", **p)
    with pytest.raises(SAEFileError, match=r"params\.npz lacks the tensors threshold"):
        load_sae(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    p = {**params(), "b_dec": np.zeros(D_IN + 1, dtype=np.float32)}
    np.savez(tmp_path / "params.npz", **p)
    with pytest.raises(SAEFileError, match=r"params\.npz: b_dec has shape \(7,\).* needs \[6\]"):
        load_sae(tmp_path)
    np.savez(tmp_path / "params.npz", **{**params(), "W_enc": np.zeros(D_IN, dtype=np.float32)})
    with pytest.raises(SAEFileError, match=r"W_enc has shape \(6,\), not \[d_in, d_sae\]"):
        load_sae(tmp_path)


def test_a_single_array_file_is_no_params_npz(tmp_path):
    np.save(tmp_path / "W_enc.npy", params()["W_enc"])
    with pytest.raises(
        SAEFileError,
        match=r"W_enc\.npy is not a readable Gemma Scope params\.npz \(it holds one array",
    ):
        load_sae(tmp_path / "W_enc.npy", format="gemma_scope")


def test_non_numeric_tensor_is_named(tmp_path):
    np.savez(tmp_path / "params.npz", **{**params(), "b_enc": np.array(["a"] * D_SAE)})
    with pytest.raises(SAEFileError, match=r"params\.npz: b_enc holds <U1, not numbers"):
        load_sae(tmp_path)


def test_embedding_saes_are_refused_not_read_as_a_block_output(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "embedding" / "width_4k" / "average_l0_6"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **params())
    with pytest.raises(SAEFileError, match="embedding SAE, which reads the token embeddings"):
        load_sae(folder)
