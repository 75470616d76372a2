"""The figure scripts on hand-made inputs: every PNG is an image, every CSV equals a
direct computation."""

import csv
import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from figures import (
    dists_cos_sim,
    dists_heatmaps,
    dists_layer_mean,
    dists_layer_std,
    mmcs,
    prompt_heatmaps,
    resid_cos_sim,
    test_tables,
)
from figures.common import describe_model, model_label
from mlsae.analysis.dists import Dists
from mlsae.analysis.heatmaps import prompt_latents
from mlsae.names import cache_path
from tests.analysis import CORPUS, GOLDEN_MODEL, GOLDEN_TRANSFORMER, golden_source

REPO_ID = "someone/mlsae-fake-x2-k1-tfm"
OTHER_REPO_ID = "someone/mlsae-other-x4-k2-tfm"

# [layer, latent]: latent 0 only at layer 0, latent 1 never fires, latent 2 spread over
# layers 1 and 2, latent 3 only at layer 2, latent 4 at every layer, latent 5 mostly at 1.
COUNTS = torch.tensor(
    [
        [3.0, 0.0, 0.0, 0.0, 1.0, 1.0],
        [0.0, 0.0, 2.0, 0.0, 1.0, 5.0],
        [0.0, 0.0, 2.0, 4.0, 1.0, 1.0],
    ]
)
TOTALS = torch.tensor(
    [
        [1.5, 0.0, 0.0, 0.0, 1.0, 0.5],
        [0.0, 0.0, 1.0, 0.0, 1.0, 3.0],
        [0.0, 0.0, 3.0, 2.0, 2.0, 0.5],
    ]
)


def expected_probs() -> np.ndarray:
    totals = TOTALS.double().numpy()
    with np.errstate(invalid="ignore"):
        return totals / totals.sum(0)


def expected_layer_mean() -> np.ndarray:
    return (expected_probs() * np.arange(3)[:, None]).sum(0)


def expected_layer_std() -> np.ndarray:
    probs = expected_probs()
    mean = expected_layer_mean()
    return np.sqrt((probs * np.arange(3)[:, None] ** 2).sum(0) - mean**2)


def write_dists(analysis_dir: Path, repo_id: str, counts=COUNTS, totals=TOTALS) -> None:
    Dists({"counts": counts, "totals": totals}).save(
        cache_path(repo_id, "dists", "safetensors", str(analysis_dir))
    )


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def assert_image(path: Path) -> None:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    analysis_dir, output_dir = tmp_path / "out", tmp_path / "figures"
    write_dists(analysis_dir, REPO_ID)
    return analysis_dir, output_dir


def common_args(dirs: tuple[Path, Path], *repo_ids: str) -> list[str]:
    """The options of a dists figure of `repo_ids` (default REPO_ID)."""
    analysis_dir, output_dir = dirs
    return [
        "--repo_id",
        *(repo_ids or [REPO_ID]),
        f"--analysis_dir={analysis_dir}",
        f"--output_dir={output_dir}",
        "--device=cpu",
    ]


def test_dists_heatmap_rows_in_ascending_mean_layer(dirs):
    paths = dists_heatmaps.main([*common_args(dirs), "--histogram"])
    output_dir = dirs[1]
    assert paths == [
        output_dir / "dists_heatmap_mlsae-fake-x2-k1.csv",
        output_dir / "dists_heatmap_mlsae-fake-x2-k1.png",
    ]
    assert_image(paths[1])

    rows = read_rows(paths[0])
    layer_mean = expected_layer_mean()
    fired = [latent for latent in range(6) if latent != 1]
    expected_order = sorted(fired, key=lambda latent: (layer_mean[latent], latent))
    assert [int(row["latent"]) for row in rows] == expected_order
    probs = expected_probs()
    for row in rows:
        latent = int(row["latent"])
        assert float(row["layer_mean"]) == pytest.approx(layer_mean[latent], abs=1e-6)
        assert float(row["layer_std"]) == pytest.approx(expected_layer_std()[latent], abs=1e-3)
        assert int(row["count"]) == int(COUNTS[:, latent].sum())
        for layer in range(3):
            assert float(row[f"prob_layer_{layer}"]) == pytest.approx(probs[layer, latent])


def test_dists_heatmap_image_rows_average_consecutive_latents():
    probs = torch.arange(10.0).repeat(2, 1).T
    rows = dists_heatmaps.image_rows(probs, max_rows=4)
    assert rows.shape == (4, 2)
    np.testing.assert_allclose(rows[:, 0], [1.0, 4.0, 6.5, 8.5])


@pytest.mark.parametrize("noninteger", [False, True])
@pytest.mark.parametrize("multi_layer_only", [False, True])
def test_layer_mean_histogram_counts(dirs, noninteger, multi_layer_only):
    args = common_args(dirs) + ["--bins_per_layer=2"]
    if noninteger:
        args.append("--noninteger")
    if multi_layer_only:
        args.append("--multi_layer_only")
    csv_path, png_path = dists_layer_mean.main(args)
    assert_image(png_path)
    assert "_noninteger" in csv_path.name if noninteger else "_noninteger" not in csv_path.name

    latents = [0, 2, 3, 4, 5]
    if multi_layer_only:
        latents = [2, 4, 5]
    values = expected_layer_mean()[latents]
    if noninteger:
        values = np.abs(values - np.round(values))
    expected_counts, expected_edges = np.histogram(
        values, bins=6, range=(0, 0.5) if noninteger else (0, 2)
    )
    rows = read_rows(csv_path)
    assert [int(row["count"]) for row in rows] == expected_counts.tolist()
    np.testing.assert_allclose([float(row["bin_left"]) for row in rows], expected_edges[:-1])
    widths = np.diff(expected_edges)
    densities = [float(row["density"]) for row in rows]
    assert sum(d * w for d, w in zip(densities, widths, strict=True)) == pytest.approx(1)


def test_dists_cos_sim_matrix(dirs):
    csv_path, png_path = dists_cos_sim.main(common_args(dirs))
    assert_image(png_path)
    rows = read_rows(csv_path)
    latents = [int(row["latent"]) for row in rows]
    layer_mean = expected_layer_mean()
    assert sorted(latents) == [0, 2, 3, 4, 5]
    assert all(np.diff(layer_mean[latents]) >= 0)
    probs = expected_probs()
    for row in rows:
        for other in latents:
            a, b = probs[:, int(row["latent"])], probs[:, other]
            expected = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
            assert float(row[str(other)]) == pytest.approx(expected, abs=1e-6)


def test_dists_cos_sim_samples_at_most_max_latents(dirs):
    csv_path, _ = dists_cos_sim.main([*common_args(dirs), "--max_latents=3"])
    rows = read_rows(csv_path)
    assert len(rows) == 3 and len(rows[0]) == 2 + 3
    assert {int(row["latent"]) for row in rows} <= {0, 2, 3, 4, 5}


def test_dists_layer_std_table_across_models(dirs):
    other_counts = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    other_totals = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    write_dists(dirs[0], OTHER_REPO_ID, other_counts, other_totals)
    paths = dists_layer_std.main(common_args(dirs, REPO_ID, OTHER_REPO_ID))
    stem = dirs[1] / "dists_layer_std"
    assert paths == [Path(f"{stem}.{extension}") for extension in ("csv", "md", "tex", "png")]
    assert_image(paths[3])

    rows = read_rows(paths[0])
    assert [row["model"] for row in rows] == ["mlsae-fake-x2-k1", "mlsae-other-x4-k2"]
    assert [row["expansion_factor"] for row in rows] == ["2", "4"]
    assert [row["k"] for row in rows] == ["1", "2"]
    layer_std = expected_layer_std()
    fired = layer_std[~np.isnan(layer_std)]
    assert float(rows[0]["mean"]) == pytest.approx(fired.mean(), abs=1e-4)
    assert float(rows[0]["sem"]) == pytest.approx(fired.std() / math.sqrt(6), abs=1e-4)
    assert float(rows[1]["mean"]) == pytest.approx(0.25, abs=1e-4)  # stds 0.5 and 0
    assert int(rows[1]["n_latents"]) == 2

    markdown = paths[1].read_text()
    assert markdown.startswith("| Model | Expansion factor | k | Latents | Layer std |")
    assert f"{fired.mean():.4g} ± " in markdown
    assert r"\pm" in paths[2].read_text()


def test_missing_dists_say_which_command_to_run(dirs, tmp_path):
    model_dir = tmp_path / "run" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    with pytest.raises(Exception, match="python -m mlsae.analysis.dists"):
        dists_heatmaps.main(
            [
                *common_args(dirs, str(model_dir)),
                "--dists_source=compute",
                "--path=data/test.jsonl.zst",
            ]
        )


def test_missing_dists_are_computed_and_cached(tmp_path):
    analysis_dir, output_dir = tmp_path / "out", tmp_path / "figures"
    csv_path, png_path = dists_heatmaps.main(
        [
            f"--repo_id={GOLDEN_MODEL}",
            f"--model_name={GOLDEN_TRANSFORMER}",
            f"--path={CORPUS}",
            "--max_length=32",
            "--batch_size=2",
            "--max_tokens=128",
            f"--analysis_dir={analysis_dir}",
            f"--output_dir={output_dir}",
            "--device=cpu",
        ]
    )
    cached = analysis_dir / "mlsae-tfm-trained-dists.safetensors"
    assert cached.exists()
    assert_image(png_path)
    dists = Dists.from_file(cached)
    fired = torch.isfinite(dists.layer_mean).nonzero().squeeze(1)
    expected = fired[dists.layer_mean[fired].argsort(stable=True)].tolist()
    assert [int(row["latent"]) for row in read_rows(csv_path)] == expected


def test_prompt_heatmap_matches_prompt_latents(tmp_path):
    prompt = "When Mary and John went to the store"
    csv_path, png_path = prompt_heatmaps.main(
        [
            f"--repo_id={GOLDEN_MODEL}",
            f"--model_name={GOLDEN_TRANSFORMER}",
            f"--prompt={prompt}",
            "--count_special_tokens",
            f"--output_dir={tmp_path}",
            "--device=cpu",
        ]
    )
    assert csv_path.name == "prompt_heatmap_mlsae-tfm-trained.csv"
    assert_image(png_path)
    expected = prompt_latents(golden_source().model, prompt)
    rows = read_rows(csv_path)
    n_layers, n_positions = expected.max_activation.shape
    assert len(rows) == n_layers * n_positions
    for row in rows:
        layer, position = int(row["layer"]), int(row["position"])
        assert row["token"] == expected.tokens[position]
        assert float(row["max_activation"]) == pytest.approx(
            float(expected.max_activation[layer, position]), abs=1e-5
        )


def write_decoder(folder: Path, decoder: torch.Tensor, expansion_factor: int, k: int) -> None:
    folder.mkdir(parents=True)
    save_file({"decoder.weight": decoder.contiguous()}, folder / "model.safetensors")
    config = {"model_name": "tiny", "expansion_factor": expansion_factor, "k": k}
    (folder / "config.json").write_text(json.dumps(config))


def test_mmcs_table_matches_brute_force(tmp_path):
    generator = torch.Generator().manual_seed(0)
    decoders = {
        "a-tfm": torch.randn(8, 16, generator=generator),
        "b-tfm": torch.randn(8, 32, generator=generator),
    }
    for name, decoder in decoders.items():
        write_decoder(tmp_path / name, decoder, decoder.shape[1] // 8, 3)
    paths = mmcs.main(
        [
            "--repo_id",
            *(str(tmp_path / name) for name in decoders),
            f"--output_dir={tmp_path / 'figures'}",
            "--device=cpu",
        ]
    )
    assert_image(tmp_path / "figures" / "mmcs.png")
    assert tmp_path / "figures" / "mmcs.md" in paths
    rows = read_rows(tmp_path / "figures" / "mmcs.csv")
    assert [row["model"] for row in rows] == ["a", "b"]
    assert [row["expansion_factor"] for row in rows] == ["2", "4"]
    for row, decoder in zip(rows, decoders.values(), strict=True):
        columns = decoder / decoder.norm(dim=0)
        similarities = (columns.T @ columns).fill_diagonal_(-2)
        expected = similarities.max(1).values
        assert float(row["mean"]) == pytest.approx(float(expected.mean()), abs=1e-5)
        assert int(row["n_latents"]) == decoder.shape[1]
    latents = read_rows(tmp_path / "figures" / "mmcs_a.csv")
    assert len(latents) == 16


GEOMETRY_ROWS = [
    {"layer": -1, "block": -1, "tokens": 10, "norm": 1.0, "cos_sim": 0.1, "cos_sim_std": 0.01,
     "centred_cos_sim": 0.2, "centred_cos_sim_std": 0.02},
    {"layer": 0, "block": 0, "tokens": 10, "norm": 2.0, "cos_sim": 0.8, "cos_sim_std": 0.03,
     "centred_cos_sim": 0.7, "centred_cos_sim_std": 0.04},
    {"layer": 1, "block": 1, "tokens": 10, "norm": 3.0, "cos_sim": 0.9, "cos_sim_std": 0.05,
     "centred_cos_sim": 0.6, "centred_cos_sim_std": 0.06},
    {"layer": 2, "block": 2, "tokens": 10, "norm": 4.0, "cos_sim": "nan", "cos_sim_std": "nan",
     "centred_cos_sim": "nan", "centred_cos_sim_std": "nan"},
]  # fmt: skip


@pytest.mark.parametrize("embeddings", [True, False])
def test_resid_cos_sim_from_a_cached_geometry(tmp_path, embeddings):
    analysis_dir = tmp_path / "out"
    analysis_dir.mkdir()
    with open(analysis_dir / "tiny-geometry.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(GEOMETRY_ROWS[0]))
        writer.writeheader()
        writer.writerows(GEOMETRY_ROWS)
    csv_path, png_path = resid_cos_sim.main(
        [
            "--model_name=someone/tiny",
            f"--embeddings={embeddings}",
            f"--analysis_dir={analysis_dir}",
            f"--output_dir={tmp_path / 'figures'}",
        ]
    )
    assert csv_path.name == "resid_cos_sim_tiny.csv"
    assert_image(png_path)
    rows = read_rows(csv_path)
    expected = GEOMETRY_ROWS if embeddings else GEOMETRY_ROWS[1:]
    assert [int(row["layer"]) for row in rows] == [row["layer"] for row in expected]
    transitions = ["emb->0", "0->1", "1->2", ""] if embeddings else ["0->1", "1->2", ""]
    assert [row["transition"] for row in rows] == transitions
    for row, source in zip(rows, expected, strict=True):
        for column in ("norm", "cos_sim", "centred_cos_sim_std"):
            assert float(row[column]) == pytest.approx(float(source[column]), nan_ok=True)


def test_resid_cos_sim_computes_a_missing_geometry(tmp_path):
    analysis_dir = tmp_path / "out"
    csv_path, png_path = resid_cos_sim.main(
        [
            f"--model_name={GOLDEN_TRANSFORMER}",
            f"--path={CORPUS}",
            "--max_length=32",
            "--batch_size=2",
            "--max_tokens=128",
            f"--analysis_dir={analysis_dir}",
            f"--output_dir={tmp_path / 'figures'}",
            "--device=cpu",
        ]
    )
    geometry = read_rows(analysis_dir / "tiny-gpt-neox-2-geometry.csv")
    rows = read_rows(csv_path)
    assert_image(png_path)
    assert [row["cos_sim"] for row in rows] == [row["cos_sim"] for row in geometry]
    assert rows[0]["transition"] == "emb->0"


def write_test_csv(path: Path, values: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(values)
        writer.writerow([repr(value) for value in values.values()])


def fake_metrics(scale: float, with_avg: bool) -> dict[str, float]:
    values = {"train/dead/rel": 0.25 * scale}
    for prefix in ("train/fvu", "train/mse", "train/l1", "val/logit/kldiv", "val/loss/delta"):
        layers = [scale * (layer + 1) for layer in range(3)]
        values |= {f"{prefix}/layer_{layer}": value for layer, value in enumerate(layers)}
        if with_avg:
            values[f"{prefix}/avg"] = sum(layers) / 3
    return values


def test_test_tables_average_and_per_layer(tmp_path):
    analysis_dir, output_dir = tmp_path / "out", tmp_path / "figures"
    write_test_csv(analysis_dir / "test_mlsae-fake-x2-k1-tfm.csv", fake_metrics(1.0, True))
    write_test_csv(analysis_dir / "test_mlsae-other-x4-k2-tfm.csv", fake_metrics(0.5, False))
    paths = test_tables.main(
        [
            "--repo_id",
            REPO_ID,
            OTHER_REPO_ID,
            f"--analysis_dir={analysis_dir}",
            f"--output_dir={output_dir}",
        ]
    )
    assert_image(output_dir / "test_layers.png")
    assert output_dir / "test_avg.tex" in paths

    averages = read_rows(output_dir / "test_avg.csv")
    assert [row["model"] for row in averages] == ["mlsae-fake-x2-k1", "mlsae-other-x4-k2"]
    assert [row["k"] for row in averages] == ["1", "2"]
    for row, scale in zip(averages, (1.0, 0.5), strict=True):
        for key in ("fvu", "mse", "l1", "loss_delta", "kl_div"):
            assert float(row[key]) == pytest.approx(2.0 * scale)
        assert float(row["dead"]) == pytest.approx(0.25 * scale)
        assert row["l0"] == "nan"

    layers = read_rows(output_dir / "test_layers.csv")
    assert [(row["model"], int(row["layer"])) for row in layers] == [
        (model, layer) for model in ("mlsae-fake-x2-k1", "mlsae-other-x4-k2") for layer in range(3)
    ]
    for row in layers:
        scale = 1.0 if row["model"] == "mlsae-fake-x2-k1" else 0.5
        assert float(row["fvu"]) == pytest.approx(scale * (int(row["layer"]) + 1))
        assert "dead" not in row

    markdown = (output_dir / "test_avg.md").read_text().splitlines()
    assert markdown[0].startswith("| Model | Expansion factor | k | FVU | MSE | L1 | L0 | Dead |")
    assert markdown[2].startswith("| mlsae-fake-x2-k1 | 2 | 1 | 2 | 2 | 2 |  | 0.25 |")
    assert r"$\Delta$ CE loss" in (output_dir / "test_avg.tex").read_text()


def test_test_tables_name_the_missing_commands(tmp_path):
    analysis_dir = tmp_path / "out"
    write_test_csv(analysis_dir / "test_mlsae-fake-x2-k1-tfm.csv", fake_metrics(1.0, True))
    args = [
        "--repo_id",
        REPO_ID,
        OTHER_REPO_ID,
        f"--analysis_dir={analysis_dir}",
        f"--output_dir={tmp_path / 'figures'}",
    ]
    with pytest.raises(FileNotFoundError, match=f"python test.py --repo_id {OTHER_REPO_ID}"):
        test_tables.main(args)
    test_tables.main([*args, "--skip_missing"])
    assert len(read_rows(tmp_path / "figures" / "test_avg.csv")) == 1


def test_model_descriptions(tmp_path):
    assert model_label("tim-lawson/mlsae-pythia-70m-deduped-x64-k32-tfm") == (
        "mlsae-pythia-70m-deduped-x64-k32"
    )
    spec = describe_model("tim-lawson/mlsae-pythia-70m-deduped-x64-k32-lens-tfm")
    assert (spec.model_name, spec.expansion_factor, spec.k, spec.tuned_lens) == (
        "pythia-70m-deduped",
        64,
        32,
        True,
    )
    run = tmp_path / "quickstart" / "model"
    write_decoder(run, torch.zeros(2, 2), 16, 8)
    spec = describe_model(str(run))
    assert (spec.label, spec.expansion_factor, spec.k) == ("quickstart", 16, 8)


@pytest.mark.parametrize(
    "module",
    [
        dists_heatmaps,
        dists_cos_sim,
        dists_layer_mean,
        dists_layer_std,
        prompt_heatmaps,
        mmcs,
        resid_cos_sim,
        test_tables,
    ],
)
def test_help_says_what_is_read_and_written(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "Reads" in help_text and "Writes" in help_text
    assert "--output_dir" in help_text


def test_dists_heatmap_labels_the_colour_bar_and_counts_the_tokens(tmp_path):
    """The colour bar says what it shows; the title says over how many tokens, which the
    dists file records (`Dists.save` / `from_file`)."""
    from mlsae.analysis.dists import Dists

    dists = Dists({"counts": COUNTS.clone(), "totals": COUNTS.clone().float()}, tokens=16384)
    dists.save(tmp_path / "d.safetensors")
    loaded = Dists.from_file(tmp_path / "d.safetensors")
    assert loaded.tokens == 16384
    figure = dists_heatmaps.plot_dists(
        loaded, dists_heatmaps.sort_by_layer_mean(loaded), "model", histogram=True
    )
    labels = [axes.get_ylabel() for axes in figure.axes]
    assert "P(layer | latent)" in labels
    assert figure._suptitle.get_text().endswith("latents fired over 16,384 tokens")
