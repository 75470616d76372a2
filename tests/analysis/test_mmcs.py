import csv

import numpy as np
import pytest
import torch

from mlsae.analysis.mmcs import load_decoder, main, max_cos_sim, mmcs
from mlsae.cli import run_command
from mlsae.model.lightning import MLSAETransformer
from tests.analysis import GOLDEN_MODEL, GOLDEN_TRANSFORMER
from tests.goldens import GOLDENS


def normalised(decoder: torch.Tensor) -> np.ndarray:
    columns = decoder.double().numpy()
    return columns / np.linalg.norm(columns, axis=0, keepdims=True)


def brute_force(decoder: torch.Tensor, other: torch.Tensor | None = None, rows: int = 2048):
    """Max cosine similarity per column, densely in float64, `rows` columns at a time (a
    20,000-wide matrix would not fit the test's memory at once)."""
    columns = normalised(decoder)
    candidates = columns if other is None else normalised(other)
    values, partners = [], []
    for start in range(0, columns.shape[1], rows):
        similarities = columns[:, start : start + rows].T @ candidates
        if other is None:
            for row in range(similarities.shape[0]):
                similarities[row, start + row] = -np.inf
        values.append(similarities.max(1))
        partners.append(similarities.argmax(1))
    return np.concatenate(values), np.concatenate(partners)


def assert_matches_brute_force(decoder, other=None, chunk_size=None):
    result = max_cos_sim(decoder, other, chunk_size)
    expected_values, _ = brute_force(decoder, other)
    np.testing.assert_allclose(result.values.numpy(), expected_values, atol=1e-6)
    # The partner reaches the maximum (up to float32 rounding; near-ties may differ).
    columns = normalised(decoder)
    candidates = columns if other is None else normalised(other)
    partners = result.partners.numpy()
    reached = (columns * candidates[:, partners]).sum(0)
    np.testing.assert_allclose(reached, expected_values, atol=1e-6)
    if other is None:
        assert np.all(partners != np.arange(decoder.shape[1]))
    return result


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 100, 1000])
def test_width_100_matches_brute_force(chunk_size):
    decoder = torch.randn(16, 100, generator=torch.Generator().manual_seed(0))
    result = assert_matches_brute_force(decoder, chunk_size=chunk_size)
    _, expected_partners = brute_force(decoder)
    assert torch.equal(result.partners, torch.from_numpy(expected_partners))


def test_wide_decoder_chunked_matches_brute_force():
    # Wider than 16,384, where the original's chunked mask went wrong, and a chunk size
    # that does not divide the width.
    decoder = torch.randn(16, 20_011, generator=torch.Generator().manual_seed(1))
    assert_matches_brute_force(decoder, chunk_size=3001)


def test_duplicate_columns_have_max_cos_sim_one():
    decoder = torch.randn(16, 300, generator=torch.Generator().manual_seed(2))
    decoder[:, 250] = decoder[:, 3]
    decoder[:, 299] = 2.5 * decoder[:, 17]  # Cosine similarity ignores the norm.
    result = assert_matches_brute_force(decoder, chunk_size=64)
    for a, b in ((3, 250), (17, 299)):
        assert result.values[a] == pytest.approx(1.0, abs=1e-6)
        assert result.values[b] == pytest.approx(1.0, abs=1e-6)
        assert result.partners[a] == b and result.partners[b] == a
    others = torch.ones(300, dtype=torch.bool)
    others[[3, 250, 17, 299]] = False
    assert result.values[others].max() < 0.999


def test_cross_decoder_matches_brute_force():
    generator = torch.Generator().manual_seed(3)
    decoder, other = (
        torch.randn(16, 100, generator=generator),
        torch.randn(16, 57, generator=generator),
    )
    result = assert_matches_brute_force(decoder, other, chunk_size=13)
    _, expected_partners = brute_force(decoder, other)
    assert torch.equal(result.partners, torch.from_numpy(expected_partners))
    # A decoder against itself as `other` finds every column itself.
    assert mmcs(decoder, decoder.clone()) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="different widths"):
        max_cos_sim(decoder, torch.randn(8, 10))


def test_load_decoder_from_tfm_and_plain_autoencoder():
    tfm = load_decoder(GOLDEN_MODEL)
    plain = load_decoder(GOLDENS / "mlsae-ae-trained")
    assert tfm.shape == plain.shape == (48, 384)
    model = MLSAETransformer.from_pretrained(str(GOLDEN_MODEL), model_name=str(GOLDEN_TRANSFORMER))
    assert torch.equal(tfm, model.autoencoder.decoder.weight)


def test_command_writes_csv_for_one_and_two_models(tmp_path):
    other_model = MLSAETransformer(
        model_name=str(GOLDEN_TRANSFORMER), expansion_factor=2, k=4, auxk=8, max_length=32
    )
    other_model.save_pretrained(tmp_path / "other-tfm")
    # Widths differ (384 and 2 x 48 latents) but the model width is the same.
    rows = main(
        [
            "--repo_id",
            str(GOLDEN_MODEL),
            str(tmp_path / "other-tfm"),
            "--chunk_size=50",
            "--device=cpu",
            f"--output_dir={tmp_path}",
        ]
    )
    assert [(row["repo_id"], row["other_repo_id"]) for row in rows] == [
        (str(GOLDEN_MODEL), ""),
        (str(tmp_path / "other-tfm"), ""),
        (str(GOLDEN_MODEL), str(tmp_path / "other-tfm")),
        (str(tmp_path / "other-tfm"), str(GOLDEN_MODEL)),
    ]
    golden_decoder = load_decoder(GOLDEN_MODEL)
    other_decoder = other_model.autoencoder.decoder.weight.detach()
    expected_self, _ = brute_force(golden_decoder)
    expected_cross, _ = brute_force(golden_decoder, other_decoder)
    assert rows[0]["mean"] == pytest.approx(expected_self.mean(), abs=1e-6)
    assert rows[0]["n_latents"] == 384 and rows[1]["n_latents"] == 96
    assert rows[2]["mean"] == pytest.approx(expected_cross.mean(), abs=1e-6)

    with open(tmp_path / "mmcs.csv") as file:
        saved = list(csv.DictReader(file))
    assert float(saved[0]["mean"]) == pytest.approx(rows[0]["mean"])
    with open(tmp_path / "mlsae-tfm-trained-vs-other-mmcs.csv") as file:
        per_latent = list(csv.DictReader(file))
    assert len(per_latent) == 384
    np.testing.assert_allclose(
        [float(row["max_cos_sim"]) for row in per_latent], expected_cross, atol=1e-6
    )
    assert (tmp_path / "mlsae-tfm-trained-mmcs.csv").exists()
    assert (tmp_path / "other-mmcs.csv").exists()

    with pytest.raises(ValueError, match="one or two"):
        main(["--repo_id", "a", "b", "c", f"--output_dir={tmp_path}"])


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--repo_id", "--model_name", "--expansion_factor", "-k", "--chunk_size"):
        assert option in help_text
    for option in ("--output_dir", "--device"):
        assert option in help_text


def test_a_hub_model_without_the_hub_is_one_error_line_and_no_lookup(
    tmp_path, monkeypatch, capsys, hub_offline
):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as stopped:
        run_command(lambda: main(["--repo_id", "someone/not-cached"]))
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: cannot load the MLSAE 'someone/not-cached'")
    assert "HF_HUB_OFFLINE" in line
    assert hub_offline == []


def test_a_misspelled_model_folder_names_the_closest(tmp_path, monkeypatch, capsys, hub_offline):
    (tmp_path / "runs" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        run_command(lambda: main(["--repo_id", "runs/modle"]))
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "error: the model folder runs/modle does not exist (did you mean runs/model?)"
    assert hub_offline == []
