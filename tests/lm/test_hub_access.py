"""Telling local paths from hub ids, and whether the hub can be reached, before any lookup."""

import pytest
import torch

from mlsae.lm import hub_access
from mlsae.lm.documents import document_parts


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("EleutherAI/pythia-70m-deduped", False),
        ("gpt2", False),
        ("quickstart/dat", True),  # its first component is a folder here
        ("a/b/c", True),  # a hub id has at most one /
        ("./model", True),
        ("../model", True),
        ("~/model", True),
        ("/abs/model", True),
        ("dir\\model", True),
    ],
)
def test_what_looks_local(tmp_path, monkeypatch, name, local):
    (tmp_path / "quickstart").mkdir()
    monkeypatch.chdir(tmp_path)
    assert hub_access.looks_local(name) is local


def test_the_hub_is_probed_once_per_process(unreachable_hub):
    first = hub_access.offline_reason()
    assert first == "the hub (huggingface.co) cannot be reached (Name or service not known)"
    assert hub_access.offline_reason() == first
    assert unreachable_hub == ["huggingface.co"]


def test_hub_offline_is_honoured_without_a_probe(hub_offline):
    assert hub_access.offline_reason() == "HF_HUB_OFFLINE=1 is set"
    assert hub_offline == []


def test_behind_a_proxy_the_hub_client_decides(unreachable_hub, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert hub_access.offline_reason() is None
    assert unreachable_hub == []


def test_a_hub_dataset_without_the_hub_fails_when_read(hub_offline):
    (part,) = document_parts("someone/some-dataset", "train")
    with pytest.raises(hub_access.HubUnreachableError, match="'someone/some-dataset': HF_HUB"):
        part.load()
    assert hub_offline == []


def test_a_missing_local_data_folder_is_never_a_hub_dataset(tmp_path, monkeypatch, hub_offline):
    (tmp_path / "data" / "train").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'data/trian' \(did you mean 'data/train'\?\)"):
        document_parts("data/trian", "train")
    assert hub_offline == []


def _cache_hub_model(cache, repo_id: str, config) -> None:
    """Lay out `config` as the hub client caches a downloaded model."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    config.save_pretrained(repo / "snapshots" / ("0" * 40))


@pytest.mark.parametrize("load_weights", [False, True])
def test_a_cached_hub_model_is_built_without_the_hub(
    tmp_path, monkeypatch, hub_offline, load_weights
):
    from huggingface_hub import constants
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from mlsae.lm.architecture import build_model

    config = GPTNeoXConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    _cache_hub_model(tmp_path, "someone/tiny-neox", config)
    if load_weights:
        snapshot = tmp_path / "models--someone--tiny-neox" / "snapshots" / ("0" * 40)
        GPTNeoXForCausalLM(config).save_pretrained(snapshot)
    model = build_model("someone/tiny-neox", load_weights, torch.float32, None)
    assert model.config.num_hidden_layers == 2
    assert hub_offline == []
