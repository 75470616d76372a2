"""This library's own models behind the SAE interface: a plain `MLSAE` folder and an
`MLSAETransformer` (`-tfm`) folder, checked against the original implementation's outputs
on the golden model and against `MLSAE` itself."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlsae.model import MLSAE
from mlsae.saes import SAEFileError, load_sae
from mlsae.saes import base as saes_base
from mlsae.saes.formats import mlsae_files
from mlsae.saes.formats.mlsae_files import count_blocks
from tests.goldens import GOLDENS, load_golden
from tests.saes.fake_hub import serve

AE = GOLDENS / "mlsae-ae-trained"
TFM = GOLDENS / "mlsae-tfm-trained"


@pytest.fixture(scope="module")
def golden_ae():
    return load_golden("golden-ae.safetensors")


@pytest.fixture(scope="module")
def golden_tfm():
    return load_golden("golden-tfm.safetensors")


def dense(indices, values, n_latents):
    return torch.zeros(*values.shape[:-1], n_latents).scatter(-1, indices, values.relu())


def copy_tfm(tmp_path, **config_changes):
    folder = tmp_path / "model-tfm"
    shutil.copytree(TFM, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


@torch.no_grad()
def test_plain_mlsae_matches_the_original(golden_ae):
    sae = load_sae(AE)
    assert (sae.format, sae.d_in, sae.d_sae, sae.site) == ("mlsae", 48, 384, "resid_post")
    assert (sae.layers, sae.layer) == (None, None)
    x = golden_ae["x"]
    acts = sae.encode(x)
    torch.testing.assert_close(acts, golden_ae["fwd.topk_dense"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae(x), golden_ae["fwd.recons"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(acts), golden_ae["fwd.recons"], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_plain_mlsae_is_mlsae_itself(golden_ae):
    sae, model = load_sae(AE), MLSAE.from_pretrained(AE)
    x = golden_ae["x"][:, :2]
    out = model(x)
    assert torch.equal(sae.encode(x), dense(out.topk.indices, out.topk.values, 384))
    assert torch.equal(sae(x), out.recons)
    torch.testing.assert_close(sae.decode(sae.encode(x)), out.recons)


@torch.no_grad()
def test_transformer_folder_matches_the_original(golden_tfm):
    sae = load_sae(TFM)
    assert (sae.format, sae.d_in, sae.d_sae) == ("mlsae", 48, 384)
    assert (sae.layers, sae.layer, sae.site) == ([0, 1, 2, 3], None, "resid_post")
    x = golden_tfm["inputs"]
    acts = sae.encode(x)
    kept = acts.topk(6, dim=-1)
    indices, order = kept.indices.sort(dim=-1)
    assert torch.equal(indices, golden_tfm["fwd.topk_indices"])
    torch.testing.assert_close(
        kept.values.gather(-1, order), golden_tfm["fwd.topk_values"].relu(), rtol=1e-5, atol=1e-5
    )
    assert ((acts != 0).sum(-1) <= 6).all()
    torch.testing.assert_close(sae(x), golden_tfm["fwd.recons"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(acts), golden_tfm["fwd.recons"], rtol=1e-5, atol=1e-5)


def test_transformer_folder_reads_only_the_autoencoder(tmp_path, monkeypatch, unreachable_hub):
    # A language model that is nowhere: it is never looked for.
    folder = copy_tfm(tmp_path, model_name="./no-such-language-model")
    read = []
    real_safe_open = mlsae_files.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.file = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.file.get_tensor(key)

    monkeypatch.setattr(mlsae_files, "safe_open", Recording)
    sae = load_sae(folder)
    assert sorted(read) == [
        "autoencoder.decoder.weight",
        "autoencoder.encoder.weight",
        "autoencoder.pre_encoder_bias",
    ]
    weights = load_file(TFM / "model.safetensors")
    assert torch.equal(sae.autoencoder.encoder.weight, weights["autoencoder.encoder.weight"])
    assert torch.equal(sae.autoencoder.decoder.weight, weights["autoencoder.decoder.weight"])
    assert unreachable_hub == []


def test_transformer_weights_in_a_pytorch_bin(tmp_path, golden_tfm):
    folder = copy_tfm(tmp_path)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    sae = load_sae(folder)
    assert sae.layers == [0, 1, 2, 3]
    x = golden_tfm["inputs"][0]
    torch.testing.assert_close(sae(x), golden_tfm["fwd.recons"][0], rtol=1e-5, atol=1e-5)


def test_layers_of_a_transformer_folder_from_its_config(tmp_path):
    sae = load_sae(copy_tfm(tmp_path, layers=[2]))
    assert (sae.layers, sae.layer) == ([2], 2)
    assert load_sae(copy_tfm(tmp_path / "b", layers=[1, 3])).layers == [1, 3]
    with pytest.raises(
        SAEFileError, match=r"was trained on layers \[1, 3\]; layers=\[2\] disagrees"
    ):
        load_sae(tmp_path / "b" / "model-tfm", layers=2)


def test_layers_of_a_plain_mlsae_from_the_option():
    sae = load_sae(AE, layers=5)
    assert (sae.layers, sae.layer) == ([5], 5)
    sae = load_sae(AE, layers=[0, 2])
    assert (sae.layers, sae.layer) == ([0, 2], None)
    with pytest.raises(SAEFileError, match="layers= must be a block index or a list of them"):
        load_sae(AE, layers="all")


def test_blocks_counted_from_the_language_model_tensors():
    def keys(path, n):
        return [f"transformer.model.{path}.{i}.mlp.weight" for i in range(n)]

    assert count_blocks(keys("transformer.h", 12) + ["transformer.model.lm_head.weight"]) == 12
    nested = [f"transformer.model.model.layers.0.mlp.experts.{i}.w" for i in range(8)]
    assert count_blocks(keys("model.layers", 3) + nested) == 3
    assert count_blocks(keys("a.layers", 2) + keys("b.layers", 3)) is None
    assert count_blocks(["autoencoder.encoder.weight"]) is None


@torch.no_grad()
def test_decode_needs_the_statistics_of_the_vectors(golden_ae):
    sae = load_sae(AE)
    x = golden_ae["x"][0]
    with pytest.raises(ValueError, match="call encode first or pass stats="):
        sae.decode(torch.zeros(3, 10, 384))
    acts = sae.encode(x)
    with pytest.raises(ValueError, match=r"leading shape \(2, 10\).*\(3, 10\)"):
        sae.decode(acts[:2])
    stats = sae.autoencoder.encode(x[:2]).stats
    torch.testing.assert_close(sae.decode(acts[:2], stats), sae(x[:2]))
    # forward, like encode, leaves the statistics of its vectors for decode.
    torch.testing.assert_close(sae.decode(acts[:2]), sae(x[:2]))


@torch.no_grad()
def test_decode_of_edited_latents(golden_ae):
    """Any latents, not only a top-k: more than k active, negative ones."""
    sae = load_sae(AE)
    weights = load_file(AE / "model.safetensors")
    x = golden_ae["x"][0]
    acts = sae.encode(x)
    acts[0, 0, :20] = torch.linspace(-1, 1, 20)
    acts[0, 1] = 0
    mean = x.mean(-1, keepdim=True)
    std = (x - mean).std(-1, keepdim=True)
    expected = (acts @ weights["decoder.weight"].T + weights["pre_encoder_bias"]) * std + mean
    torch.testing.assert_close(sae.decode(acts), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_an_mlsae_without_standardisation(tmp_path):
    torch.manual_seed(0)
    model = MLSAE(8, 32, 3, auxk=4, standardize=False)
    torch.nn.init.normal_(model.pre_encoder_bias)
    model.save_pretrained(tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    x = torch.randn(2, 5, 8)
    out = model(x)
    pre = (x - model.pre_encoder_bias) @ model.encoder.weight.T
    top = pre.topk(3, dim=-1)
    acts = torch.zeros(2, 5, 32).scatter(-1, top.indices, top.values.relu())
    torch.testing.assert_close(sae.encode(x), acts)
    recons = acts @ model.decoder.weight.T + model.pre_encoder_bias
    torch.testing.assert_close(load_sae(tmp_path / "sae").decode(acts), recons)
    torch.testing.assert_close(sae(x), out.recons)
    torch.testing.assert_close(out.recons, recons)


@torch.no_grad()
def test_encode_sparse_from_the_top_k(golden_ae, monkeypatch):
    sae = load_sae(AE)
    x = golden_ae["x"][:, :2]
    acts = sae.encode(x)
    monkeypatch.setattr(saes_base, "SPARSE_CHUNK", 7)
    sparse = sae.encode_sparse(x)
    assert sparse.shape == (4, 2, 10, 384)
    assert torch.equal(sparse.to_dense(), acts)
    rows = acts.reshape(-1, 384)
    assert torch.equal(sparse.offsets.diff(), (rows != 0).sum(-1))
    assert torch.equal(sparse.indices, rows.nonzero()[:, 1])


@torch.no_grad()
def test_no_vectors():
    sae = load_sae(AE)
    assert sae.encode(torch.zeros(2, 0, 48)).shape == (2, 0, 384)
    assert sae.decode(torch.zeros(2, 0, 384)).shape == (2, 0, 48)
    sparse = sae.encode_sparse(torch.zeros(0, 48))
    assert sparse.offsets.tolist() == [0] and sparse.values.numel() == 0
    with pytest.raises(ValueError, match="last dimension n_inputs=48"):
        sae.encode_sparse(torch.zeros(3, 47))


def test_dtype(golden_ae):
    sae = load_sae(AE, dtype=torch.float64)
    x = golden_ae["x"][0].double()
    assert sae.encode(x).dtype == sae(x).dtype == torch.float64


def test_from_the_hub(tmp_path, monkeypatch, golden_tfm):
    hub = serve(monkeypatch, tmp_path, "someone/mlsae-tfm", TFM)
    sae = load_sae("someone/mlsae-tfm")
    assert hub.downloaded() == ["config.json", "model.safetensors"]
    assert sae.layers == [0, 1, 2, 3]
    x = golden_tfm["inputs"][1]
    torch.testing.assert_close(sae(x), golden_tfm["fwd.recons"][1], rtol=1e-5, atol=1e-5)


def test_tuned_lens_models_are_refused(tmp_path):
    with pytest.raises(SAEFileError, match=r"config\.json: this MLSAE reads .* tuned lens"):
        load_sae(copy_tfm(tmp_path, tuned_lens=True))


def test_bad_transformer_configs(tmp_path):
    with pytest.raises(SAEFileError, match=r"config\.json: expansion_factor must be a positive"):
        load_sae(copy_tfm(tmp_path / "a", expansion_factor=0.5))
    with pytest.raises(SAEFileError, match=r"config\.json: k must be a positive integer"):
        load_sae(copy_tfm(tmp_path / "b", k=0))
    with pytest.raises(SAEFileError, match=r"config\.json: standardize must be true or false"):
        load_sae(copy_tfm(tmp_path / "c", standardize="yes"))
    folder = copy_tfm(tmp_path / "d")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(SAEFileError, match=r"config\.json is not readable JSON"):
        load_sae(folder, format="mlsae")


def test_transformer_weights_that_do_not_fit(tmp_path):
    folder = copy_tfm(tmp_path, expansion_factor=4)
    with pytest.raises(
        SAEFileError, match=r"model\.safetensors \(autoencoder\.\*\) does not match"
    ):
        load_sae(folder)
    weights = load_file(TFM / "model.safetensors")
    del weights["autoencoder.encoder.weight"], weights["autoencoder.pre_encoder_bias"]
    save_file(weights, tmp_path / "model-tfm" / "model.safetensors")
    with pytest.raises(SAEFileError, match=r"lacks autoencoder\.encoder\.weight"):
        load_sae(folder)
    save_file({"other": torch.zeros(1)}, folder / "model.safetensors")
    with pytest.raises(SAEFileError, match=r"model\.safetensors holds no autoencoder\.\* tensors"):
        load_sae(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(SAEFileError, match=r"no weights \(model\.safetensors or pytorch_model"):
        load_sae(folder)


def test_plain_mlsae_weights_that_do_not_fit(tmp_path):
    folder = tmp_path / "sae"
    shutil.copytree(AE, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_latents": 100}))
    with pytest.raises(SAEFileError, match=r"model\.safetensors does not match MLSAE"):
        load_sae(folder)


def test_a_config_of_another_kind_given_as_mlsae(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"d_in": 3}))
    with pytest.raises(SAEFileError, match=r"config\.json describes no MLSAE"):
        load_sae(tmp_path, format="mlsae")


@pytest.mark.parametrize(
    "options",
    [
        {"architecture": "batchtopk", "batchtopk_capacity": 4},
        {"architecture": "matryoshka", "matryoshka_widths": [8, 16]},
    ],
)
@torch.no_grad()
def test_a_batchtopk_mlsae_encodes_with_its_threshold(tmp_path, options):
    """At inference a BatchTopK selection is JumpReLU at the learnt threshold: every latent
    above it, however many (here more than the capacity of 4 candidates)."""
    torch.manual_seed(0)
    model = MLSAE(8, 32, 2, auxk=None, **options)
    model.batchtopk_threshold.fill_(0.1)
    model.save_pretrained(tmp_path / "model")
    sae = load_sae(tmp_path / "model")
    x = torch.randn(5, 8)
    mean = x.mean(-1, keepdim=True)
    std = (x - mean).std(-1, keepdim=True)
    pre = ((x - mean) / (std + 1e-5) - model.pre_encoder_bias) @ model.encoder.weight.T
    expected = torch.where(pre.double() > 0.1, pre, 0.0)
    torch.testing.assert_close(sae.encode(x), expected)
    assert (sae.encode(x) > 0).sum(-1).max() > 4
    recons = (expected @ model.decoder.weight.T + model.pre_encoder_bias) * std + mean
    torch.testing.assert_close(sae(x), recons, rtol=1e-5, atol=1e-5)
    sparse = sae.encode_sparse(x)
    torch.testing.assert_close(sparse.to_dense(), expected)
