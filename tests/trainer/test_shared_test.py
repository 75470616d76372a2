"""`test.py` with several models: those that read the same activations are evaluated together,
the frozen transformer's work done once per batch, and each writes the CSV it writes alone."""

import importlib
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import GPTNeoXForCausalLM

from mlsae.lm.transformer import Transformer
from mlsae.model.lightning import MLSAETransformer
from mlsae.trainer.shared_test import group_models, reads_same_activations
from tests.goldens import GOLDENS

test_command = importlib.import_module("mlsae.trainer.test")

LAYERS = [1, 3]  # of the tiny model's 4 blocks: fewer forward passes, a quicker test
N_LAYERS = len(LAYERS)
BATCHES = 2
ARGS = ["--model_name", "tiny-gpt-neox-2", "--max_length", "32", "--batch_size", "2",
        "--max_tokens", str(BATCHES * 2 * 32), "--precision", "32"]  # fmt: skip
SAME = ("x2-k4", "x4-k4", "x4-k8")
OTHER = "x2-k8"  # its transformer's weights changed
ORDER = ("x2-k4", "x2-k8", "x4-k4", "x4-k8")  # test.py's, from --expansion_factor 2 4 -k 4 8


def folder(name: str) -> str:
    return f"tim-lawson/mlsae-tiny-gpt-neox-2-{name}-tfm"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The tiny transformer, the corpus as data/test.jsonl.zst and four -tfm models under
    their published names: three that read the same activations, one of another
    transformer."""
    root = tmp_path_factory.mktemp("shared")
    shutil.copytree(GOLDENS / "tiny-gpt-neox-2", root / "tiny-gpt-neox-2")
    (root / "data").mkdir()
    shutil.copy(GOLDENS / "corpus.jsonl.zst", root / "data" / "test.jsonl.zst")
    generator = torch.Generator().manual_seed(0)
    for name in ORDER:
        expansion_factor, k = (int(part[1:]) for part in name.split("-"))
        model = MLSAETransformer(
            model_name=str(root / "tiny-gpt-neox-2"),
            expansion_factor=expansion_factor,
            k=k,
            layers=LAYERS,
            max_length=32,
            batch_size=2,
            auxk=8,
            dead_tokens_threshold=2000,
        )
        with torch.no_grad():
            bias = model.autoencoder.pre_encoder_bias
            bias.copy_(torch.randn(bias.shape, generator=generator) * 0.1)
            if name == OTHER:
                next(model.transformer.model.parameters()).add_(1e-3)
        model.save_pretrained(root / folder(name))
    return root


def evaluate(workdir: Path, output: Path, *args: str) -> dict[str, bytes]:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        written = test_command.main([*ARGS, *args, "--output_dir", str(output)])
    return {path.name: path.read_bytes() for path in written}


def kind_of_forward(model: GPTNeoXForCausalLM) -> str:
    """What a forward pass of the HF model does: `read` the stream (hooks on its blocks),
    run `spliced` (a block's forward replaced, mlsae.lm.sites.skip_blocks_up_to) or `clean`."""
    blocks = model.gpt_neox.layers
    if any("forward" in block.__dict__ for block in blocks):
        return "spliced"
    return "read" if any(block._forward_hooks for block in blocks) else "clean"


@pytest.fixture(scope="module", params=[False, True], ids=["mask", "original"])
def together(request, workdir, tmp_path_factory) -> tuple[bool, dict[str, bytes], Counter]:
    """The four models evaluated by one test.py, counting the forward passes by kind."""
    count_special_tokens = request.param
    counts: Counter = Counter()
    forward = GPTNeoXForCausalLM.forward

    def counted(self, *args, **kwargs):
        counts[kind_of_forward(self)] += 1
        return forward(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GPTNeoXForCausalLM, "forward", counted)
        csvs = evaluate(
            workdir,
            tmp_path_factory.mktemp("together"),
            *("--expansion_factor", "2", "4", "-k", "4", "8"),
            *("--count_special_tokens", str(count_special_tokens).lower()),
        )
    return count_special_tokens, csvs, counts


def test_each_csv_is_byte_identical_to_the_one_written_alone(together, workdir, tmp_path):
    count_special_tokens, csvs, _ = together
    assert list(csvs) == [f"test_mlsae-tiny-gpt-neox-2-{name}-tfm.csv" for name in ORDER]
    for name in SAME:  # the other model's path is the one a model alone takes
        expansion_factor, k = (part[1:] for part in name.split("-"))
        (alone,) = evaluate(
            workdir,
            tmp_path / name,
            *("--expansion_factor", expansion_factor, "-k", k),
            *("--count_special_tokens", str(count_special_tokens).lower()),
        ).items()
        assert csvs[alone[0]] == alone[1], name


def test_the_transformer_runs_once_per_batch_per_group(together):
    count_special_tokens, _, counts = together
    groups = [len(SAME), 1]  # the other transformer's model is a group of one
    # Per batch and group: one read of the stream; the clean logits once (with special
    # tokens counted, the original's, the true logits are the zeroed stream spliced in at
    # each layer, once per layer); each model's reconstruction spliced in at each layer;
    # the zero and mean ablations at each layer.
    true_logits = {"clean": 0, "spliced": N_LAYERS} if count_special_tokens else {"clean": 1}
    expected = Counter()
    for size in groups:
        expected["read"] += BATCHES
        expected["clean"] += BATCHES * true_logits["clean"]
        expected["spliced"] += BATCHES * (true_logits.get("spliced", 0) + (size + 2) * N_LAYERS)
    assert +counts == +expected
    alone = sum(groups) * BATCHES * (2 + 3 * N_LAYERS + (N_LAYERS - 1) * count_special_tokens)
    assert counts.total() < alone


def test_models_are_grouped_by_their_transformers_weights(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    models = [MLSAETransformer.from_pretrained(folder(name)) for name in ORDER]
    assert len({id(model.transformer) for model in models}) == 4  # each -tfm has its copy
    assert group_models(models) == [[0, 2, 3], [1]]
    # The copies are dropped: the group's models share its first model's transformer.
    first = models[0].transformer
    assert models[2].transformer is first and models[3].transformer is first
    assert models[1].transformer is not first
    assert not reads_same_activations(models[0], models[1])


def test_other_settings_are_not_grouped(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    a, b = (MLSAETransformer.from_pretrained(folder(name)) for name in SAME[:2])
    assert reads_same_activations(a, b)
    b.count_special_tokens = not a.count_special_tokens
    assert not reads_same_activations(a, b)
    b.count_special_tokens = a.count_special_tokens
    b.transformer = Transformer(str(workdir / "tiny-gpt-neox-2"), layers=LAYERS)
    assert reads_same_activations(a, b)  # equal weights, loaded from elsewhere
    b.layers = [1, 2]
    assert not reads_same_activations(a, b)
