"""`python -m mlsae.saes.export` and `export_saelens`: the exported files are the ones
SAELens 6 was run on (tests/data/saes/export, recorded by
scripts/crosscheck_saelens_export.py), SAELens' outputs on them are the MLSAE's own, they read
back through `load_sae` as the same layer and site, and what SAELens cannot express is
refused in one line."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from mlsae.model import MLSAE
from mlsae.model.autoencoder import standardize, unstandardize
from mlsae.saes import SAEFileError, load_sae
from mlsae.saes import export as export_module
from mlsae.saes.export import (
    BRIDGE_HOOKS,
    ExportError,
    ExportSource,
    export_saelens,
    hook_metadata,
    main,
    saelens_files,
)
from mlsae.saes.formats.saelens_config import hook_location
from tests.goldens import GOLDENS
from tests.saes.fake_hub import serve
from tests.test_user_errors import error_line

DATA = GOLDENS.parent / "saes" / "export"
TFM = GOLDENS / "mlsae-tfm-trained"
TINY_LM = GOLDENS / "tiny-gpt-neox-2"
PLAIN = DATA / "sources" / "plain-no-standardize"
STANDARDIZED = DATA / "sources" / "standardized"
THRESHOLD = 0.25
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def expected(name):
    return load_file(DATA / name / "expected.safetensors")


def batchtopk(model, threshold=THRESHOLD, **options):
    """A BatchTopK MLSAE (every latent a candidate unless `options` say otherwise) with the
    weights of `model` and `threshold`, in eval mode."""
    options = {"batchtopk_capacity": model.n_latents, **options}
    new = MLSAE(
        model.n_inputs,
        model.n_latents,
        model.k,
        auxk=None,
        standardize=model.standardize,
        architecture="batchtopk",
        **options,
    )
    new.load_state_dict(model.state_dict(), strict=False)
    new.batchtopk_threshold.fill_(threshold)
    return new.eval()


def export_again(name, tmp_path):
    """The export of tests/data/saes/export/<name>, written again by the current code."""
    out = tmp_path / name
    if name == "tfm_layer_norm":
        return export_saelens(str(TFM), 2, out)
    if name == "plain_no_standardize":
        return export_saelens(str(PLAIN), 1, out)
    return export_saelens(batchtopk(MLSAE.from_pretrained(STANDARDIZED)), 0, out)


def dense(topk, n_latents):
    return torch.zeros(*topk.values.shape[:-1], n_latents).scatter(
        -1, topk.indices.long(), topk.values
    )


def jumprelu_reference(model, x, threshold):
    """The MLSAE's maths with a JumpReLU at `threshold` in place of the top k."""
    x_std, stats = standardize(x)
    pre = (x_std - model.pre_encoder_bias) @ model.encoder.weight.T
    acts = pre.relu() * (pre > threshold)
    return acts, unstandardize(acts @ model.decoder.weight.T + model.pre_encoder_bias, stats)


@pytest.mark.parametrize("name", ["tfm_layer_norm", "plain_no_standardize", "batchtopk_jumprelu"])
def test_the_export_is_the_one_saelens_was_run_on(name, tmp_path):
    out = export_again(name, tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    committed = DATA / name
    assert json.loads((out / "cfg.json").read_text()) == json.loads(
        (committed / "cfg.json").read_text()
    )
    ours, theirs = (load_file(f / "sae_weights.safetensors") for f in (out, committed))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


@torch.no_grad()
@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("tfm_layer_norm", lambda: load_sae(TFM).autoencoder),
        ("plain_no_standardize", lambda: MLSAE.from_pretrained(PLAIN)),
    ],
)
def test_saelens_computes_what_the_mlsae_computes(name, model):
    model, recorded = model(), expected(name)
    out = model(recorded["x"])
    torch.testing.assert_close(recorded["encode"], dense(out.topk, model.n_latents), **TOLERANCE)
    torch.testing.assert_close(recorded["forward"], out.recons, **TOLERANCE)
    torch.testing.assert_close(recorded["decode"], out.recons, **TOLERANCE)


@torch.no_grad()
def test_batchtopk_is_saelens_jumprelu_at_its_threshold():
    model, recorded = MLSAE.from_pretrained(STANDARDIZED), expected("batchtopk_jumprelu")
    acts, recons = jumprelu_reference(model, recorded["x"], THRESHOLD)
    assert 0 < int((acts > 0).sum()) < acts.numel()
    torch.testing.assert_close(recorded["encode"], acts, **TOLERANCE)
    torch.testing.assert_close(recorded["forward"], recons, **TOLERANCE)
    config, tensors = saelens_files(
        model.encoder.weight, model.decoder.weight, model.pre_encoder_bias, model.k, True, 0.25
    )
    assert (config["architecture"], config["normalize_activations"]) == ("jumprelu", "layer_norm")
    assert "k" not in config
    committed = load_file(DATA / "batchtopk_jumprelu" / "sae_weights.safetensors")
    assert all(torch.equal(tensors[key], committed[key]) for key in committed)
    assert torch.equal(tensors["threshold"], torch.full((model.n_latents,), 0.25))


@torch.no_grad()
@pytest.mark.parametrize(
    ("name", "layer", "hook"),
    [
        ("tfm_layer_norm", 2, "gpt_neox.layers.2"),
        ("plain_no_standardize", 1, "blocks.1.hook_out"),
        ("batchtopk_jumprelu", 0, "blocks.0.hook_out"),
    ],
)
def test_the_export_reads_back_as_the_same_layer_and_site(name, layer, hook, tmp_path):
    sae, recorded = load_sae(export_again(name, tmp_path)), expected(name)
    assert (sae.format, sae.layer, sae.site, sae.activation_source) == (
        "saelens",
        layer,
        "resid_post",
        None,
    )
    assert json.loads((tmp_path / name / "cfg.json").read_text())["metadata"]["hook_name"] == hook
    torch.testing.assert_close(sae.encode(recorded["x"]), recorded["encode"], **TOLERANCE)
    torch.testing.assert_close(sae(recorded["x"]), recorded["forward"], **TOLERANCE)


def test_the_tfm_metadata_names_the_hugging_face_block():
    metadata = json.loads((DATA / "tfm_layer_norm" / "cfg.json").read_text())["metadata"]
    assert metadata["hook_name"] == metadata["hf_hook_name"] == "gpt_neox.layers.2"
    assert metadata["model_class_name"] == "AutoModelForCausalLM"
    assert metadata["model_name"] == "tiny-gpt-neox-2"
    assert metadata["sae_lens_version"].startswith("6.")


@pytest.mark.parametrize("site", list(BRIDGE_HOOKS))
@pytest.mark.parametrize("blocks_path", [None, "model.layers"])
def test_every_site_has_a_hook_name_that_reads_back(site, blocks_path):
    names = hook_metadata(3, site, blocks_path)
    assert all(hook_location(name) == (3, site) for key, name in names.items() if "hook" in key)
    hf = blocks_path is not None and site == "resid_post"
    assert ("hf_hook_name" in names) == hf


def copy_tfm(tmp_path, **config_changes):
    folder = tmp_path / "model-tfm"
    shutil.copytree(TFM, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def test_load_sae_reads_the_site_of_a_tfm_config(tmp_path):
    folder = copy_tfm(tmp_path, site="mlp_out", layers=[1, 3])
    sae = load_sae(folder)
    assert (sae.site, sae.layers) == ("mlp_out", [1, 3])
    assert load_sae(TFM).site == "resid_post"
    out = export_saelens(str(folder), 3, tmp_path / "out")
    assert json.loads((out / "cfg.json").read_text())["metadata"]["hook_name"] == (
        "blocks.3.mlp.hook_out"
    )
    exported = load_sae(out)
    assert (exported.layer, exported.site, exported.activation_source) == (3, "mlp_out", None)


def test_an_unknown_site_in_a_tfm_config_is_refused(tmp_path):
    with pytest.raises(SAEFileError, match=r"config\.json: site must be one of .* 'nowhere'"):
        load_sae(copy_tfm(tmp_path, site="nowhere"))


@pytest.fixture(scope="module")
def transformer():
    from mlsae.model.lightning import MLSAETransformer

    return MLSAETransformer.from_pretrained(str(TFM), model_name=str(TINY_LM))


@torch.no_grad()
def test_an_mlsae_transformer_is_exported_as_its_folder_is(transformer, tmp_path):
    out = export_saelens(transformer, 2, tmp_path / "out")
    metadata = json.loads((out / "cfg.json").read_text())["metadata"]
    assert metadata["hook_name"] == "gpt_neox.layers.2"
    ours, theirs = (
        load_file(f / "sae_weights.safetensors") for f in (out, DATA / "tfm_layer_norm")
    )
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_a_tuned_lens_is_refused(transformer, tmp_path):
    lens = SimpleNamespace(
        autoencoder=transformer.autoencoder,
        layers=[0, 1],
        hyperparameters=SimpleNamespace(site="resid_post", model_name="m", tuned_lens=True),
        transformer=SimpleNamespace(blocks_path="gpt_neox.layers"),
    )
    with pytest.raises(ExportError, match="tuned lens, which SAELens cannot express"):
        export_saelens(lens, 0, tmp_path / "out")
    with pytest.raises(SAEFileError, match="tuned lens"):
        export_saelens(str(copy_tfm(tmp_path, tuned_lens=True)), 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (7, r"not trained on layer 7: it was trained on layers \[0, 1, 2, 3\]"),
        (-1, "block index"),
        (True, "block index"),
    ],
)
def test_a_layer_it_was_not_trained_on_is_refused(layer, message, tmp_path):
    with pytest.raises(ExportError, match=message):
        export_saelens(str(TFM), layer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_architectures_saelens_cannot_express_are_refused(tmp_path):
    model = MLSAE.from_pretrained(STANDARDIZED)
    model.architecture = "gated"
    with pytest.raises(ExportError, match="architecture 'gated' has no SAELens equivalent"):
        export_saelens(model, 0, tmp_path / "out")
    for threshold in (float("nan"), -0.5):
        model = batchtopk(MLSAE.from_pretrained(STANDARDIZED), threshold=threshold)
        with pytest.raises(ExportError, match="threshold is .*, not a finite number >= 0"):
            export_saelens(model, 0, tmp_path / "out")
    with pytest.raises(ExportError, match="cannot export a dict"):
        export_saelens({}, 0, tmp_path / "out")
    source = ExportSource(MLSAE.from_pretrained(PLAIN), None, site="nowhere")
    with pytest.raises(ExportError, match="unknown site 'nowhere'"):
        export_saelens(source, 0, tmp_path / "out")


def test_a_folder_that_is_not_empty_is_replaced_only_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    export_saelens(str(PLAIN), 1, out)  # empty: written
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty: pass --overwrite"):
        export_saelens(str(PLAIN), 1, out)
    assert (out / "notes.txt").exists()
    export_saelens(str(PLAIN), 1, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match="is a file"):
        export_saelens(str(PLAIN), 1, tmp_path / "file", overwrite=True)


def test_a_failed_write_leaves_the_old_folder(tmp_path, monkeypatch):
    out = export_saelens(str(PLAIN), 1, tmp_path / "out")
    before = (out / "cfg.json").read_text()

    def fail(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(export_module, "save_file", fail)
    with pytest.raises(OSError, match="disk on fire"):
        export_saelens(str(TFM), 2, out, overwrite=True)
    assert (out / "cfg.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_command_writes_the_export(tmp_path, capsys):
    out = main(["--repo_id", str(TFM), "--layer", "2", "--output_dir", str(tmp_path / "o")])
    assert "Wrote layer 2 of" in capsys.readouterr().out
    sae, recorded = load_sae(out), expected("tfm_layer_norm")
    torch.testing.assert_close(sae(recorded["x"]), recorded["forward"], **TOLERANCE)


def test_the_command_reads_a_hub_id(tmp_path, monkeypatch):
    serve(monkeypatch, tmp_path, "someone/mlsae-tfm", TFM)
    out = main(
        ["--repo_id", "someone/mlsae-tfm", "--layer", "2", "--output_dir", str(tmp_path / "o")]
    )
    assert json.loads((out / "cfg.json").read_text())["metadata"]["hook_name"] == (
        "gpt_neox.layers.2"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--format", "sparsify"],
            "error: --format sparsify is not supported; the formats written are saelens",
        ),
        (["--layer", "9"], "error: the MLSAE was not trained on layer 9"),
        (["--repo_id", str(DATA / "tfm_layer_norm")], "is no saved MLSAE: it holds no config.json"),
        (["--repo_id", "lens"], "tuned lens"),
        (["--output_dir", "full"], "exists and is not empty: pass --overwrite"),
    ],
)
def test_the_command_refuses_in_one_line(args, message, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    lens = copy_tfm(tmp_path, tuned_lens=True)
    options = {"--repo_id": str(TFM), "--layer": "2", "--output_dir": str(tmp_path / "o")}
    given = dict(zip(args[::2], args[1::2], strict=True))
    given = {
        k: {"lens": str(lens), "full": str(tmp_path / "full")}.get(v, v) for k, v in given.items()
    }
    line = error_line(
        capsys, main, [item for pair in {**options, **given}.items() for item in pair]
    )
    assert message in line
    assert not (tmp_path / "o").exists()


@torch.no_grad()
def test_a_batchtopk_mlsae_is_exported_as_it_computes(tmp_path):
    model, recorded = batchtopk(MLSAE.from_pretrained(STANDARDIZED)), expected("batchtopk_jumprelu")
    out = export_saelens(model, 0, tmp_path / "out")
    committed = load_file(DATA / "batchtopk_jumprelu" / "sae_weights.safetensors")
    assert all(
        torch.equal(t, committed[key])
        for key, t in load_file(out / "sae_weights.safetensors").items()
    )
    recons = model(recorded["x"]).recons
    torch.testing.assert_close(recorded["forward"], recons, **TOLERANCE)
    torch.testing.assert_close(load_sae(out)(recorded["x"]), recons, **TOLERANCE)


@torch.no_grad()
def test_a_batchtopk_capacity_below_every_latent_exports_the_same_jumprelu(tmp_path):
    """At inference the MLSAE's JumpReLU keeps every latent above the threshold, however
    many candidates it starts from."""
    model = batchtopk(MLSAE.from_pretrained(STANDARDIZED), threshold=0.0, batchtopk_capacity=8)
    x = torch.randn(4, 5, model.n_inputs, generator=torch.Generator().manual_seed(0))
    sae = load_sae(export_saelens(model, 0, tmp_path / "out"))
    torch.testing.assert_close(sae(x), model(x).recons, **TOLERANCE)
    assert (sae.encode(x) > 0).sum(-1).max() > 8  # more than the capacity fired


@torch.no_grad()
def test_a_matryoshka_mlsae_selecting_the_top_k_is_exported_as_topk(tmp_path):
    plain = MLSAE.from_pretrained(STANDARDIZED)
    model = MLSAE(
        8,
        32,
        plain.k,
        auxk=None,
        architecture="matryoshka",
        matryoshka_widths=[8, 32],
        matryoshka_selection="topk",
    )
    model.load_state_dict(plain.state_dict())
    out = export_saelens(model.eval(), 0, tmp_path / "out")
    config = json.loads((out / "cfg.json").read_text())
    assert (config["architecture"], config["k"]) == ("topk", plain.k)
    x = expected("batchtopk_jumprelu")["x"]
    torch.testing.assert_close(load_sae(out)(x), model(x).recons, **TOLERANCE)


def test_the_threshold_is_rounded_so_float32_comparisons_agree():
    value = 0.1  # not a float32
    rounded = export_module.float32_below(value)
    below, above = torch.tensor(rounded), torch.nextafter(torch.tensor(rounded), torch.tensor(1.0))
    assert below.double() < value < above.double()
    assert export_module.float32_below(0.25) == 0.25
