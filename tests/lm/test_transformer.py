from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mlsae.lm.architecture import find_decoder_blocks, validate_layers
from mlsae.lm.transformer import Transformer
from tests.model.tiny_models import FAMILIES, FINAL_NORMS, N_LAYERS, VOCAB_SIZE, save_tiny_model

GOLDENS = Path(__file__).parents[1] / "data" / "goldens"
GOLDEN_MODEL = GOLDENS / "tiny-gpt-neox-2"
N_SPECIAL = 3  # ids below this may be special; random test tokens avoid them


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: save_tiny_model(family, root / family) for family in FAMILIES}


def random_tokens(batch: int = 2, pos: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(N_SPECIAL, VOCAB_SIZE, (batch, pos), generator=generator)


def reference_logits(transformer: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return transformer.model(tokens, use_cache=False).logits


def without_final_norm(transformer: Transformer, family: str, tokens: torch.Tensor) -> torch.Tensor:
    """The output of the last block, from the model with its final norm swapped out."""
    parent_name, _, norm_name = FINAL_NORMS[family].rpartition(".")
    parent = transformer.model.get_submodule(parent_name)
    norm = getattr(parent, norm_name)
    setattr(parent, norm_name, nn.Identity())
    try:
        with torch.no_grad():
            return transformer.model.base_model(tokens, use_cache=False).last_hidden_state
    finally:
        setattr(parent, norm_name, norm)


def count_block_calls(transformer: Transformer) -> tuple[Counter[int], list]:
    """Count calls into the submodules of each block (a skipped block calls none)."""
    calls: Counter[int] = Counter()
    handles = []
    for index, block in enumerate(transformer.blocks):
        for submodule in block.children():

            def hook(*_: object, index: int = index) -> None:
                calls[index] += 1

            handles.append(submodule.register_forward_hook(hook))
    return calls, handles


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_returns_block_outputs(model_dirs: dict[str, Path], family: str) -> None:
    transformer = Transformer(str(model_dirs[family]), layers=[3, 1], skip_special_tokens=False)
    tokens = random_tokens()
    outputs = transformer(tokens)

    assert outputs.shape == (2, 2, 12, transformer.d_model)
    assert outputs.dtype == torch.float32
    with torch.no_grad():
        hidden_states = transformer.model(tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(outputs[1], hidden_states[2], rtol=0, atol=1e-6)
    torch.testing.assert_close(outputs[0], without_final_norm(transformer, family, tokens))
    # The last hidden state of HF has the final norm applied: ours must not.
    assert not torch.allclose(outputs[0], hidden_states[-1], atol=1e-3)


def test_hidden_states_are_every_block_unmasked(model_dirs: dict[str, Path]) -> None:
    transformer = Transformer(str(model_dirs["llama"]), layers=[2])
    tokens = random_tokens()
    tokens[0, 0] = transformer.tokenizer.bos_token_id
    hidden_states = transformer.hidden_states(tokens)
    with torch.no_grad():
        expected = transformer.model(tokens, output_hidden_states=True).hidden_states
    assert len(hidden_states) == N_LAYERS
    for index in range(N_LAYERS - 1):
        assert torch.equal(hidden_states[index], expected[index + 1])
    assert (hidden_states[2][0, 0] != 0).any()
    assert torch.equal(transformer(tokens)[0, 0, 0], torch.zeros(transformer.d_model))


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_at_layer_reproduces_the_model(model_dirs: dict[str, Path], family: str) -> None:
    for layers in ([3, 1], None):
        transformer = Transformer(str(model_dirs[family]), layers=layers, skip_special_tokens=False)
        tokens = random_tokens(seed=1)
        expected_logits = reference_logits(transformer, tokens)
        expected_loss = -(
            expected_logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None]).mean()
        )
        # The first call splices with a hook; once a block output has been seen, later calls
        # skip the blocks before the splice.
        transformer.forward_at_layer(torch.zeros(transformer.n_layers, 2, 12, 32), 0, "logits")
        assert transformer._block_returns_tuple is not None

        outputs = transformer(tokens)
        for skip in (True, False):
            transformer.skip_blocks_before_splice = skip
            for position in range(transformer.n_layers):
                loss, logits = transformer.forward_at_layer(outputs, position, "both", tokens)
                torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
                torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-5)
                only_loss = transformer.forward_at_layer(outputs, position, "loss", tokens)
                assert torch.equal(only_loss, loss)
                by_default = transformer.forward_at_layer(outputs, position, tokens=tokens)
                assert torch.equal(by_default[0], loss) and torch.equal(by_default[1], logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_blocks_gives_the_same_splice(model_dirs: dict[str, Path], family: str) -> None:
    transformer = Transformer(str(model_dirs[family]), layers=[2, 0], skip_special_tokens=False)
    tokens = random_tokens(seed=2)
    replaced = torch.randn(
        2, 2, 12, transformer.d_model, generator=torch.Generator().manual_seed(0)
    )
    transformer(tokens)

    for position in range(2):
        transformer.skip_blocks_before_splice = False
        with_hook = transformer.forward_at_layer(replaced, position, "logits", tokens)
        transformer.skip_blocks_before_splice = True
        skipped = transformer.forward_at_layer(replaced, position, "logits", tokens)
        torch.testing.assert_close(skipped, with_hook, rtol=0, atol=1e-6)
        assert not torch.allclose(skipped, reference_logits(transformer, tokens), atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_at_layer_runs_only_later_blocks(model_dirs: dict[str, Path], family: str) -> None:
    transformer = Transformer(str(model_dirs[family]), layers=[3, 1])
    tokens = random_tokens()
    outputs = transformer(tokens)

    calls, handles = count_block_calls(transformer)
    transformer.forward_at_layer(outputs, 1, "logits", tokens)  # splices after block 1
    for handle in handles:
        handle.remove()
    assert calls[0] == calls[1] == 0
    assert calls[2] > 0 and calls[3] > 0
    # The blocks' own forward is back in place.
    assert all("forward" not in block.__dict__ for block in transformer.blocks)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_stops_after_the_deepest_selected_block(
    model_dirs: dict[str, Path], family: str
) -> None:
    transformer = Transformer(str(model_dirs[family]), layers=[1, 0])
    head_calls = []
    head = transformer.model.get_output_embeddings()
    head_handle = head.register_forward_hook(lambda *_: head_calls.append(1))
    calls, handles = count_block_calls(transformer)
    transformer(random_tokens())
    for handle in [*handles, head_handle]:
        handle.remove()

    assert calls[0] > 0 and calls[1] > 0
    assert calls[2] == calls[3] == 0
    assert not head_calls


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_special_tokens_are_zeroed(model_dirs: dict[str, Path], family: str) -> None:
    transformer = Transformer(str(model_dirs[family]))
    tokenizer = transformer.tokenizer
    special_ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    special_ids.discard(None)
    tokens = random_tokens()
    positions = [(0, 0), (0, 5), (1, 11), (1, 3)]
    for (row, column), token_id in zip(positions, sorted(special_ids) * 4, strict=False):
        tokens[row, column] = token_id
    expected_mask = torch.zeros_like(tokens, dtype=torch.bool)
    for row, column in positions:
        expected_mask[row, column] = True

    mask = transformer.special_token_mask(tokens)
    assert torch.equal(mask, expected_mask)
    masked = transformer(tokens)
    transformer.skip_special_tokens = False
    unmasked = transformer(tokens)
    assert torch.equal(masked[:, mask], torch.zeros_like(masked[:, mask]))
    assert torch.equal(masked[:, ~mask], unmasked[:, ~mask])
    assert (unmasked[:, mask] != 0).any()
    # The mask says which tokens are special, whether or not forward zeroes them.
    assert torch.equal(transformer.special_token_mask(tokens), expected_mask)


def test_special_token_ids_are_bos_eos_and_pad(model_dirs: dict[str, Path]) -> None:
    assert Transformer(str(model_dirs["gpt_neox"])).special_token_ids == [0]
    assert Transformer(str(model_dirs["qwen2"])).special_token_ids == [0, 1, 2]


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([], "at least one"),
        ([N_LAYERS], "out of range"),
        ([-1], "out of range"),
        ([1, 2, 1], "repeat"),
        ([1.0], "ints"),
        ([True], "ints"),
    ],
)
def test_invalid_layers_are_rejected(layers: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_layers(layers, N_LAYERS)


def test_layers_default_to_all_blocks(model_dirs: dict[str, Path]) -> None:
    transformer = Transformer(str(model_dirs["gpt2"]))
    assert transformer.layers == list(range(N_LAYERS))
    assert transformer.n_layers == N_LAYERS
    with pytest.raises(ValueError, match="out of range"):
        Transformer(str(model_dirs["gpt2"]), layers=[0, 7])


def test_forward_at_layer_rejects_bad_arguments(model_dirs: dict[str, Path]) -> None:
    transformer = Transformer(str(model_dirs["llama"]), layers=[3, 1])
    tokens = random_tokens()
    outputs = transformer(tokens)
    with pytest.raises(ValueError, match="needs the input tokens"):
        transformer.forward_at_layer(outputs, 0, "loss")
    with pytest.raises(ValueError, match="needs the input tokens"):
        transformer.forward_at_layer(outputs, 0, "both")
    with pytest.raises(ValueError, match="position in the stack"):
        transformer.forward_at_layer(outputs, 2, "logits")
    with pytest.raises(ValueError, match="n_layers=2"):
        transformer.forward_at_layer(outputs[0], 0, "logits")
    with pytest.raises(ValueError, match="tokens have shape"):
        transformer.forward_at_layer(outputs, 0, "loss", tokens[:, :5])
    with pytest.raises(ValueError, match="return_type"):
        transformer.forward_at_layer(outputs, 0, "probs", tokens)  # type: ignore[call-overload]
    logits = transformer.forward_at_layer(outputs, 1, "logits")
    assert logits.shape == (2, 12, VOCAB_SIZE)


def test_model_is_frozen_and_stays_in_eval_mode(model_dirs: dict[str, Path]) -> None:
    # GPT-2's dropout is 0.1: in train mode its outputs would be random.
    transformer = Transformer(str(model_dirs["gpt2"]))
    assert all(not parameter.requires_grad for parameter in transformer.parameters())
    assert all(parameter.dtype == torch.float32 for parameter in transformer.parameters())
    nn.Sequential(transformer).train()
    assert transformer.training and not transformer.model.training
    tokens = random_tokens()
    assert torch.equal(transformer(tokens), transformer(tokens))


def test_dtype_is_applied(model_dirs: dict[str, Path]) -> None:
    transformer = Transformer(str(model_dirs["qwen2"]), dtype=torch.bfloat16)
    tokens = random_tokens()
    outputs = transformer(tokens)
    assert outputs.dtype == torch.bfloat16
    loss = transformer.forward_at_layer(outputs, 0, "loss", tokens)
    assert loss.dtype == torch.float32


def test_accepts_a_built_model_and_tokenizer(model_dirs: dict[str, Path]) -> None:
    loaded = Transformer(str(model_dirs["llama"]))
    given = Transformer("any-name", model=loaded.model, tokenizer=loaded.tokenizer)
    assert given.model is loaded.model and given.tokenizer is loaded.tokenizer
    assert given.model_name == "any-name"


@pytest.mark.parametrize("family", FAMILIES)
def test_from_config_builds_random_weights_for_a_checkpoint(
    model_dirs: dict[str, Path], family: str
) -> None:
    loaded = Transformer(str(model_dirs[family]))
    rng_state = torch.random.get_rng_state()
    built = Transformer.from_config(str(model_dirs[family]))
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert type(built.model) is type(loaded.model)
    assert not torch.equal(
        built.model.get_input_embeddings().weight, loaded.model.get_input_embeddings().weight
    )

    built.load_state_dict(loaded.state_dict(), strict=True)
    tokens = random_tokens()
    assert torch.equal(built(tokens), loaded(tokens))


def test_state_dict_uses_the_published_gpt_neox_names(model_dirs: dict[str, Path]) -> None:
    transformer = Transformer(str(model_dirs["gpt_neox"]))
    keys = set(transformer.state_dict())
    assert "model.embed_out.weight" in keys
    assert "model.gpt_neox.layers.0.attention.dense.weight" in keys
    assert not any(key.startswith("blocks.") for key in keys)

    # A state dict with the other name of the head loads too.
    head_name = next(
        name
        for name, module in transformer.model.named_modules()
        if module is transformer.model.get_output_embeddings()
    )
    state = {
        key.replace("model.embed_out.", f"model.{head_name}."): value
        for key, value in transformer.state_dict().items()
    }
    built = Transformer.from_config(str(model_dirs["gpt_neox"]))
    built.load_state_dict(state, strict=True)
    assert torch.equal(
        built.model.get_output_embeddings().weight, transformer.model.get_output_embeddings().weight
    )


def test_unsupported_architecture_is_reported() -> None:
    with pytest.raises(ValueError, match="Unsupported architecture"):
        find_decoder_blocks(nn.Sequential(nn.Linear(2, 2)), 4)
    ambiguous = nn.Module()
    ambiguous.first = nn.ModuleList([nn.Linear(2, 2) for _ in range(4)])
    ambiguous.second = nn.ModuleList([nn.Linear(2, 2) for _ in range(4)])
    with pytest.raises(ValueError, match="first, second"):
        find_decoder_blocks(ambiguous, 4)


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(GOLDENS / "golden-tfm.safetensors")


def test_golden_residual_stream(golden: dict[str, torch.Tensor]) -> None:
    transformer = Transformer(str(GOLDEN_MODEL), max_length=32, batch_size=2)
    tokens = golden["tokens"]
    torch.testing.assert_close(transformer(tokens), golden["inputs"], rtol=0, atol=1e-5)
    assert torch.equal(~transformer.special_token_mask(tokens), golden["special_mask"].bool())
    transformer.skip_special_tokens = False
    torch.testing.assert_close(transformer(tokens), golden["hidden_states"], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        reference_logits(transformer, tokens), golden["hf_logits"], rtol=0, atol=1e-5
    )


def test_golden_forward_at_layer(golden: dict[str, torch.Tensor]) -> None:
    transformer = Transformer(str(GOLDEN_MODEL), max_length=32, batch_size=2)
    tokens = golden["tokens"]
    for skip in (False, True):
        transformer.skip_blocks_before_splice = skip
        for layer in range(4):
            loss, logits = transformer.forward_at_layer(golden["inputs"], layer, "both", tokens)
            torch.testing.assert_close(loss, golden["loss_true"][layer], rtol=0, atol=1e-5)
            torch.testing.assert_close(logits, golden["logits_true"][layer], rtol=0, atol=1e-5)


def test_golden_checkpoint_loads_into_a_model_built_from_config() -> None:
    checkpoint = load_file(GOLDENS / "mlsae-tfm-trained" / "model.safetensors")
    prefix = "transformer."
    state = {
        key[len(prefix) :]: value for key, value in checkpoint.items() if key.startswith(prefix)
    }
    assert "model.embed_out.weight" in state

    built = Transformer.from_config(str(GOLDEN_MODEL))
    built.load_state_dict(state, strict=True)
    loaded = Transformer(str(GOLDEN_MODEL))
    tokens = random_tokens(pos=32)
    assert torch.equal(built(tokens), loaded(tokens))
    assert set(built.state_dict()) == set(state)


def test_context_length_from_the_config_else_the_tokenizer():
    """The position limit of the model's config; without one, the tokenizer's limit."""
    tiny_transformer = Transformer(str(GOLDEN_MODEL), max_length=32)
    assert tiny_transformer.context_length == tiny_transformer.config.max_position_embeddings
    tiny_transformer.config = SimpleNamespace(n_ctx=96)  # GPT-2's name for it
    assert tiny_transformer.context_length == 96
    tiny_transformer.config = SimpleNamespace()
    tiny_transformer.tokenizer.model_max_length = 77
    assert tiny_transformer.context_length == 77
    tiny_transformer.tokenizer.model_max_length = int(1e30)
    assert tiny_transformer.context_length is None
