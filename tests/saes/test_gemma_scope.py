"""Gemma Scope's `params.npz`: JumpReLU latents, no centring, the layer and site from the
release's path."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mlsae.saes import SAEFileError, load_sae

D_IN, D_SAE = 6, 10


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
