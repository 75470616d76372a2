"""`load_sae_stack`: one SAE per layer, from a list or a `{layer}` pattern, and what it
refuses (one line naming the SAE)."""

import pytest
import torch

from mlsae.names import stack_name
from mlsae.saes import SAEFileError, SAEStack, load_sae, load_sae_stack
from tests.saes.stack_files import write_saelens, write_stack

D_IN = 8


@pytest.fixture
def stack_root(tmp_path):
    write_stack(tmp_path, [2, 0, 1], D_IN, [12, 16, 10])
    return tmp_path


def test_a_pattern_takes_the_matching_folders_in_order_of_their_layers(stack_root):
    (stack_root / "layer_x").mkdir()  # not a block index: not an SAE of the pattern
    stack = load_sae_stack(str(stack_root / "layer_{layer}"))
    assert isinstance(stack, SAEStack)
    assert stack.layers == [0, 1, 2]
    assert stack.sites == ["resid_post"] * 3
    assert [sae.d_sae for sae in stack] == [16, 10, 12]
    assert stack.n_latents == 16
    assert stack.names == [str(stack_root / f"layer_{layer}") for layer in (0, 1, 2)]
    assert stack.source_name == str(stack_root / "layer_{layer}")


def test_layers_pick_which_to_load(stack_root):
    stack = load_sae_stack(stack_root / "layer_{layer}", layers=[2, 0])
    assert stack.layers == [0, 2]
    assert [sae.d_sae for sae in stack] == [16, 12]


def test_a_list_is_ordered_by_layer_and_loads_as_load_sae_does(stack_root):
    paths = [stack_root / f"layer_{layer}" for layer in (2, 0)]
    stack = load_sae_stack(paths)
    assert stack.layers == [0, 2]
    x = torch.randn(3, D_IN)
    torch.testing.assert_close(stack[1].encode(x), load_sae(paths[0]).encode(x))


def test_the_pattern_gives_the_layer_where_the_files_say_none(tmp_path):
    for layer in (0, 3):
        state = {
            "encoder.weight": torch.randn(6, D_IN),
            "encoder.bias": torch.zeros(6),
            "decoder.weight": torch.randn(D_IN, 6),
            "decoder.bias": torch.zeros(D_IN),
        }
        torch.save(state, tmp_path / f"sae_{layer}.pt")
    stack = load_sae_stack(str(tmp_path / "sae_{layer}.pt"), site="mlp_out")
    assert (stack.layers, stack.sites) == ([0, 3], ["mlp_out", "mlp_out"])
    with pytest.raises(SAEFileError, match=r"sae_0.pt does not say which layer it reads"):
        load_sae_stack([tmp_path / "sae_0.pt"], site="mlp_out")
    with pytest.raises(SAEFileError, match=r"sae_0.pt does not say which site it reads"):
        load_sae_stack(str(tmp_path / "sae_{layer}.pt"))


def test_a_file_that_disagrees_with_its_path_is_named(tmp_path):
    write_saelens(tmp_path / "layer_1", 5, D_IN, 4)
    with pytest.raises(SAEFileError, match=r"layer_1 reads block 5 .*not the 1 of its path"):
        load_sae_stack(str(tmp_path / "layer_{layer}"))


def test_two_saes_at_one_layer_and_site_are_refused(tmp_path):
    write_saelens(tmp_path / "a", 1, D_IN, 4)
    write_saelens(tmp_path / "b", 1, D_IN, 4)
    write_saelens(tmp_path / "c", 1, D_IN, 4, site="mlp_out")
    assert load_sae_stack([tmp_path / "a", tmp_path / "c"]).sites == ["resid_post", "mlp_out"]
    with pytest.raises(SAEFileError, match=r"/a and .*/b both read resid_post of block 1"):
        load_sae_stack([tmp_path / "a", tmp_path / "b"])


@pytest.mark.parametrize(
    ("saes", "layers", "message"),
    [
        ("missing_{layer}", None, r"no local file or folder matches .*missing_\{layer\}.*--layers"),
        (["layer_{layer}", "layer_0"], None, r"one pattern with \{layer\} or a list"),
        (["layer_0"], [0], r"layers expand a pattern .* layer_0 has none"),
        ([], None, r"no SAEs given"),
        ("layer_{layer}", [], r"no layers to expand"),
    ],
)
def test_mistakes_are_one_line(stack_root, monkeypatch, saes, layers, message):
    monkeypatch.chdir(stack_root)
    with pytest.raises(SAEFileError, match=message) as error:
        load_sae_stack(saes, layers)
    assert "\n" not in str(error.value)


def test_the_output_name_ends_in_stack():
    assert stack_name("saes/run/layer_{layer}") == "run-layer_L-stack"
    assert stack_name("owner/sae-{layer}") == "owner-sae-L-stack"
    assert stack_name("/abs/path/sae0/") == "path-sae0-stack"
