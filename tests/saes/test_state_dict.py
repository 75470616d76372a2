"""Plain state dicts of `nn.Linear` encoder and decoder modules: ReLU latents, no centring."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mlsae.saes import SAEFileError, load_sae

D_IN, D_SAE = 5, 7


def write_marker(path: str) -> None:
    Path(path).write_text("code ran")


class RunsCodeWhenUnpickled:
    """A pickled object whose loading would call `write_marker(path)`."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return write_marker, (self.path,)


def linear_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=generator),
        "encoder.bias": torch.randn(D_SAE, generator=generator) * 0.5,
        "decoder.weight": torch.randn(D_IN, D_SAE, generator=generator) * 3,
        "decoder.bias": torch.randn(D_IN, generator=generator),
    }


def check_formula(sae, state):
    x = torch.randn(2, 3, D_IN)
    acts = torch.relu(x @ state["encoder.weight"].T + state["encoder.bias"])
    recons = acts @ state["decoder.weight"].T + state["decoder.bias"]
    assert (acts == 0).any() and (acts > 0).any()
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae.decode(acts), recons)
    torch.testing.assert_close(sae(x), recons)
    torch.testing.assert_close(sae.encode_sparse(x).to_dense(), acts)


@pytest.mark.parametrize("name", ["sae.pt", "sae.pth", "sae.safetensors"])
def test_formula_from_each_file_kind(tmp_path, name):
    state = linear_state()
    file = tmp_path / name
    save_file(state, file) if name.endswith(".safetensors") else torch.save(state, file)
    sae = load_sae(file, layer=9, site="resid_post")
    assert sae.format == "state_dict"
    assert (sae.d_in, sae.d_sae, sae.layer, sae.site) == (D_IN, D_SAE, 9, "resid_post")
    check_formula(sae, state)


def test_folder_of_one_file_with_format_given(tmp_path):
    state = linear_state()
    torch.save(state, tmp_path / "sae.pt")
    (tmp_path / "README.md").write_text("notes")
    check_formula(load_sae(tmp_path, format="state_dict"), state)


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "marker"
    state = {**linear_state(), "encoder.bias": RunsCodeWhenUnpickled(marker)}
    torch.save(state, tmp_path / "sae.pt")
    with pytest.raises(SAEFileError, match=r"refusing to load .*sae\.pt.*write_marker") as error:
        load_sae(tmp_path / "sae.pt")
    assert not marker.exists()
    assert "weights_only" not in str(error.value)
    # The file is a real attack: unpickled, it runs the code.
    torch.load(tmp_path / "sae.pt", weights_only=False)
    assert marker.read_text() == "code ran"


def test_missing_keys_are_named(tmp_path):
    state = linear_state()
    del state["decoder.bias"]
    save_file(state, tmp_path / "sae.safetensors")
    with pytest.raises(SAEFileError, match=r"sae\.safetensors lacks decoder\.bias \(found "):
        load_sae(tmp_path / "sae.safetensors")


def test_unused_keys_are_refused(tmp_path):
    # A JumpReLU threshold read as a ReLU SAE would give wrong latents without a word.
    state = {**linear_state(), "threshold": torch.ones(D_SAE)}
    save_file(state, tmp_path / "sae.safetensors")
    with pytest.raises(SAEFileError, match=r"sae\.safetensors holds threshold, which a plain"):
        load_sae(tmp_path / "sae.safetensors")


def test_wrong_shapes_are_named(tmp_path):
    state = {**linear_state(), "decoder.weight": torch.zeros(D_SAE, D_IN)}
    save_file(state, tmp_path / "sae.safetensors")
    with pytest.raises(SAEFileError, match=r"decoder\.weight has shape \(7, 5\).* needs \[5, 7\]"):
        load_sae(tmp_path / "sae.safetensors")


def test_encoder_weight_of_wrong_rank_is_named(tmp_path):
    state = {**linear_state(), "encoder.weight": torch.zeros(D_SAE * D_IN)}
    save_file(state, tmp_path / "sae.safetensors")
    with pytest.raises(SAEFileError, match=r"sae\.safetensors: encoder\.weight has shape \(35,\)"):
        load_sae(tmp_path / "sae.safetensors")


def test_folder_with_two_files_asks_for_one(tmp_path):
    torch.save(linear_state(), tmp_path / "a.pt")
    save_file(linear_state(), tmp_path / "b.safetensors")
    with pytest.raises(SAEFileError, match=r"holds 2 state dict files \(a\.pt, b\.safetensors\)"):
        load_sae(tmp_path, format="state_dict")


def test_folder_without_a_file_says_what_it_looked_for(tmp_path):
    (tmp_path / "README.md").write_text("notes")
    with pytest.raises(SAEFileError, match=r"holds no state dict file \(\.pt, \.pth"):
        load_sae(tmp_path, format="state_dict")


def test_a_file_that_is_no_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(SAEFileError, match=r"list\.pt holds no plain state dict of tensors"):
        load_sae(tmp_path / "list.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SAEFileError, match=r"bad\.safetensors"):
        load_sae(tmp_path / "bad.safetensors")
