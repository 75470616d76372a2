"""Every name the original exported from its packages imports from the same module, with
the original's meaning (or the corrected one that docs/differences.md describes)."""

import importlib
import inspect

import pytest
import torch

from tests.goldens import GOLDENS

ORIGINAL_EXPORTS = {
    "mlsae.model": [
        "DataConfig", "get_test_dataloader", "get_train_dataloader", "MLSAE", "MLSAEConfig",
        "MLSAETransformer", "Stats", "TopK", "Transformer",
    ],
    "mlsae.metrics": [
        "AuxiliaryLoss", "DeadLatents", "layerwise", "LayerwiseFVU", "LayerwiseL0Norm",
        "LayerwiseL1Norm", "LayerwiseLogitKLDiv", "LayerwiseLogitMSE", "LayerwiseLossDelta",
        "LayerwiseMSE", "LayerwiseWrapper", "MSELoss",
    ],
    "mlsae.trainer": ["initialize", "RunConfig", "SweepConfig", "test", "train", "TrainerConfig"],
    "mlsae.model.decoder": ["decode", "scatter_topk"],
    "mlsae.model.data": ["DataConfig", "get_test_dataloader", "get_train_dataloader"],
    "mlsae.utils": ["get_repo_id"],
}  # fmt: skip


@pytest.mark.parametrize(("module", "names"), ORIGINAL_EXPORTS.items())
def test_the_original_names_import(module, names):
    imported = importlib.import_module(module)
    for name in names:
        assert getattr(imported, name) is not None, f"{module}.{name}"


def test_the_trainer_exports_functions_as_the_original_did():
    from mlsae.trainer import test, train

    assert inspect.isfunction(train) and inspect.isfunction(test)
    assert list(inspect.signature(train).parameters)[0] == "config"


def test_sweep_config_is_the_product_of_its_lists():
    from mlsae.trainer import SweepConfig

    sweep = SweepConfig(model_name=["org/a", "org/b"], expansion_factor=[32, 64], k=[16])
    assert list(sweep) == [
        ("org/a", 32, 16),
        ("org/a", 64, 16),
        ("org/b", 32, 16),
        ("org/b", 64, 16),
    ]
    assert next(sweep.repo_ids()) == "tim-lawson/mlsae-a-x32-k16-tfm"
    lens = SweepConfig(model_name=["org/a"], expansion_factor=[8], k=[4], tuned_lens=True)
    assert list(lens.repo_ids(transformer=False)) == ["tim-lawson/mlsae-a-x8-k4-lens"]


def test_test_takes_the_originals_run_config():
    """`test(RunConfig)` evaluated the published model of that run on the test split."""
    from mlsae.trainer.config import RunConfig, TestConfig

    run = RunConfig(model_name="EleutherAI/pythia-160m-deduped", layers=None)
    run.autoencoder.expansion_factor, run.autoencoder.k = 32, 16
    config = TestConfig.from_run(run)
    assert list(config.repo_ids()) == ["tim-lawson/mlsae-pythia-160m-deduped-x32-k16-tfm"]
    assert config.data.path == "data/test.jsonl.zst"
    assert config.data.max_length == run.data.max_length


def test_the_original_dataloader_arguments():
    """`get_train_dataloader(path, model_name, max_length, batch_size, num_workers)` and
    `get_test_dataloader(model_name, max_length, batch_size, num_workers)` positionally."""
    from mlsae.model import get_test_dataloader, get_train_dataloader

    tokenizer, corpus = str(GOLDENS / "tiny-gpt-neox-2"), str(GOLDENS / "corpus.jsonl.zst")
    train = next(iter(get_train_dataloader(corpus, tokenizer, 32, 2, 0)))
    test = next(iter(get_test_dataloader(tokenizer, 32, 2, 0, path=corpus)))
    assert train["input_ids"].shape == (2, 32)
    assert torch.equal(train["input_ids"], test["input_ids"])


def test_mlsae_config_fields():
    from mlsae.model import MLSAEConfig

    config = MLSAEConfig()
    original_fields = {
        "dead_tokens_threshold", "expansion_factor", "k", "auxk", "auxk_coef",
        "dead_threshold", "lr", "standardize", "skip_special_tokens", "tuned_lens",
    }  # fmt: skip
    assert original_fields <= set(vars(config))
    assert (config.k, config.auxk, config.auxk_coef, config.lr) == (32, 256, 1 / 32, 1e-4)


def test_the_constructor_takes_the_originals_positional_arguments():
    """The original's train.py built MLSAETransformer with 15 positional arguments."""
    from mlsae.model import MLSAETransformer

    args = (str(GOLDENS / "tiny-gpt-neox-2"), [0, 1], 2, 4, 8, 0.5, 100, 1e-3, 1e-3)
    model = MLSAETransformer(*args, True, True, 32, 2, 1, False)
    assert (model.layers, model.expansion_factor, model.k, model.auxk) == ([0, 1], 2, 4, 8)
    assert (model.auxk_coef, model.max_length, model.batch_size) == (0.5, 32, 2)
    assert model.hparams_initial["accumulate_grad_batches"] == 1
