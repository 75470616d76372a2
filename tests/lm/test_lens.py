import json

import pytest
import torch

from mlsae.lm.lens import TunedLens, load_tuned_lens
from mlsae.model.lightning import MLSAETransformer
from tests.goldens import GOLDENS

TINY_NEOX = str(GOLDENS / "tiny-gpt-neox-2")


def write_release(folder, d_model=48, n_blocks=4, seed=0):
    """A tuned lens in the tuned-lens release layout: params.pt and config.json."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(n_blocks):
        state[f"{i}.weight"] = 0.1 * torch.randn(d_model, d_model, generator=generator)
        state[f"{i}.bias"] = 0.1 * torch.randn(d_model, generator=generator)
    folder.mkdir(parents=True)
    torch.save(state, folder / "params.pt")
    config = {"base_model_name_or_path": "x", "d_model": d_model, "num_hidden_layers": n_blocks}
    (folder / "config.json").write_text(json.dumps(config))
    return state


def test_translation_and_inverse_round_trip(tmp_path):
    state = write_release(tmp_path / "lens")
    lens = load_tuned_lens("x", 48, 4, str(tmp_path / "lens"))
    x = torch.randn(2, 3, 5, 48)
    translated = lens(x, [3, 1])
    expected = x[0] + x[0] @ state["3.weight"].T + state["3.bias"]
    torch.testing.assert_close(translated[0], expected)
    torch.testing.assert_close(lens.inverse(translated, [3, 1]), x, rtol=1e-5, atol=1e-5)
    assert not translated.data_ptr() == x.data_ptr()


def test_release_layout_under_lens_folder(tmp_path):
    write_release(tmp_path / "lens" / "some-model")
    lens = load_tuned_lens("some-model", 48, 4, str(tmp_path))
    assert isinstance(lens, TunedLens)
    with pytest.raises(ValueError, match="d_model"):
        load_tuned_lens("some-model", 32, 4, str(tmp_path))
    with pytest.raises(FileNotFoundError):
        load_tuned_lens("other", 48, 4, str(tmp_path))


def test_lens_model_encodes_translated_stream_and_saves_lens(tmp_path):
    state = write_release(tmp_path / "lens")
    model = MLSAETransformer(
        TINY_NEOX, expansion_factor=2, k=4, auxk=8, max_length=16,
        tuned_lens=True, tuned_lens_path=str(tmp_path / "lens"),
    )  # fmt: skip
    tokens = torch.randint(1, 512, (2, 16))
    stream = model.residual_stream(tokens)
    raw = stream.raw.clone()
    expected = raw[2] + raw[2] @ state["2.weight"].T + state["2.bias"]
    torch.testing.assert_close(stream.inputs[2], expected)
    assert torch.equal(stream.raw, raw)  # never edited in place
    with torch.no_grad():
        recons = model(tokens).recons
        ae_recons = model.autoencoder(stream.inputs).recons
    torch.testing.assert_close(recons, model.lens.inverse(ae_recons, model.layers))

    model.save_pretrained(tmp_path / "saved")
    loaded = MLSAETransformer.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(
        loaded.lens.layer_translators[2].weight, state["2.weight"], rtol=0, atol=0
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).recons, recons)
