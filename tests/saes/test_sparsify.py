"""sparsify checkpoints: tiny coders written here and by sparsify itself
(scripts/crosscheck_sparsify.py), loaded with `load_sae` and checked against the formula of
sparsify's `SparseCoder` written out in plain torch."""

import fnmatch
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

from mlsae.saes import SAEFileError, load_sae
from mlsae.saes.formats.sparsify import where_from_hookpoint

OWNER = Path(__file__).resolve().parents[1] / "data" / "saes" / "sparsify"
D_IN, D_SAE, K = 4, 12, 3


def write_coder(
    folder: Path,
    seed: int,
    *,
    transcode: bool = False,
    skip: bool = False,
    activation: str = "topk",
    k: int = K,
    **cfg_changes,
) -> dict[str, torch.Tensor]:
    """A coder as sparsify saves it: decoder rows of norms far from 1, biases non-zero,
    a W_skip that is not symmetric."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=generator),
        "encoder.bias": torch.randn(D_SAE, generator=generator) * 0.3,
        "W_dec": torch.randn(D_SAE, D_IN, generator=generator)
        * torch.linspace(0.3, 3.0, D_SAE)[:, None],
        "b_dec": torch.randn(D_IN, generator=generator),
    }
    if skip:
        tensors["W_skip"] = torch.randn(D_IN, D_IN, generator=generator)
    cfg = {
        "activation": activation,
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": D_SAE,
        "k": k,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": transcode,
        "d_in": D_IN,
        **cfg_changes,
    }
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, folder / "sae.safetensors")
    return tensors


def reference_pre(t: dict[str, torch.Tensor], x: torch.Tensor, transcode: bool) -> torch.Tensor:
    centred = x if transcode else x - t["b_dec"]
    return torch.relu(
        torch.einsum("...i,si->...s", centred, t["encoder.weight"]) + t["encoder.bias"]
    )


def reference_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Each vector keeps the latents whose value fewer than k others exceed."""
    rank = (pre[..., None, :] > pre[..., :, None]).sum(-1)
    return torch.where(rank < k, pre, torch.zeros(()))


def reference_groupmax(pre: torch.Tensor, k: int) -> torch.Tensor:
    size = pre.shape[-1] // k
    out = torch.zeros_like(pre)
    for group in range(k):
        part = pre[..., group * size : (group + 1) * size]
        keep = part == part.max(-1, keepdim=True).values
        out[..., group * size : (group + 1) * size] = part * keep
    return out


def reference_decode(t: dict[str, torch.Tensor], acts: torch.Tensor) -> torch.Tensor:
    return torch.einsum("...s,si->...i", acts, t["W_dec"]) + t["b_dec"]


def inputs(seed: int = 7) -> torch.Tensor:
    return torch.randn(2, 4, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


def assert_sparse_matches(sae, x: torch.Tensor, dense: torch.Tensor) -> None:
    sparse = sae.encode_sparse(x)
    assert sparse.shape == (*x.shape[:-1], D_SAE)
    torch.testing.assert_close(sparse.to_dense(), dense)
    assert sparse.values.numel() == int((dense != 0).sum())


def test_autoencoder_subtracts_b_dec_and_keeps_top_k(tmp_path):
    t = write_coder(tmp_path / "run" / "layers.3", seed=1)
    x = inputs()
    expected = reference_topk(reference_pre(t, x, transcode=False), K)
    assert ((expected > 0).sum(-1) == K).all()
    for sae in (
        load_sae(tmp_path / "run", hookpoint="layers.3"),
        load_sae(tmp_path / "run", subfolder="layers.3"),
        load_sae(tmp_path / "run" / "layers.3"),
        load_sae(tmp_path / "run" / "layers.3" / "sae.safetensors"),
        load_sae(str(tmp_path / "run" / "layers.3"), format="sparsify"),
    ):
        assert (sae.format, sae.layer, sae.site, sae.output_site) == (
            "sparsify",
            3,
            "resid_post",
            None,
        )
        assert (sae.d_in, sae.d_sae, sae.is_transcoder) == (D_IN, D_SAE, False)
        torch.testing.assert_close(sae.encode(x), expected)
        torch.testing.assert_close(sae.decode(expected), reference_decode(t, expected))
        torch.testing.assert_close(sae(x), reference_decode(t, expected))
        assert_sparse_matches(sae, x, expected)


def test_transcoder_reads_the_raw_input_and_adds_the_skip_connection(tmp_path):
    t = write_coder(tmp_path / "layers.2.mlp", seed=2, transcode=True, skip=True)
    assert not torch.allclose(t["W_skip"], t["W_skip"].T)
    x = inputs()
    acts = reference_topk(reference_pre(t, x, transcode=True), K)
    sae = load_sae(tmp_path, hookpoint="layers.2.mlp")
    assert (sae.layer, sae.site, sae.output_site, sae.is_transcoder) == (
        2,
        "mlp_in",
        "mlp_out",
        True,
    )
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae.decode(acts), reference_decode(t, acts))
    skip = torch.einsum("...i,oi->...o", x, t["W_skip"])
    torch.testing.assert_close(sae(x), reference_decode(t, acts) + skip)
    assert_sparse_matches(sae, x, acts)


def test_groupmax_keeps_the_largest_latent_of_each_group(tmp_path):
    t = write_coder(tmp_path / "layers.0.self_attn", seed=3, activation="groupmax", k=4)
    x = inputs()
    acts = reference_groupmax(reference_pre(t, x, transcode=False), 4)
    sae = load_sae(tmp_path / "layers.0.self_attn")
    assert (sae.layer, sae.site) == (0, "attn_out")
    assert "activation=groupmax" in repr(sae)
    torch.testing.assert_close(sae.encode(x), acts)
    assert ((sae.encode(x) > 0).unflatten(-1, (4, -1)).sum(-1) <= 1).all()
    torch.testing.assert_close(sae(x), reference_decode(t, acts))
    assert_sparse_matches(sae, x, acts)


@pytest.mark.parametrize(
    ("hookpoint", "transcode", "expected"),
    [
        ("layers.7", False, (7, "resid_post", None)),
        ("layers.7", True, (7, "resid_pre", "resid_post")),
        ("layers.12.mlp", False, (12, "mlp_out", None)),
        ("layers.12.mlp", True, (12, "mlp_in", "mlp_out")),
        ("layers.1.self_attn", False, (1, "attn_out", None)),
        ("layers.1.self_attn", True, (1, None, "attn_out")),
        ("gpt_neox.layers.4.attention", False, (4, "attn_out", None)),
        ("h.3.attn", False, (3, "attn_out", None)),
        ("h.3.mlp", False, (3, "mlp_out", None)),
        ("embed_tokens", False, (0, "resid_pre", None)),
        ("layers.5.mlp.act_fn", False, (5, None, None)),
        ("lm_head", False, (None, None, None)),
    ],
)
def test_layer_and_site_from_the_hookpoint(hookpoint, transcode, expected):
    where = where_from_hookpoint(hookpoint, transcode)
    assert (where["layer"], where["site"], where["output_site"]) == expected


def test_options_and_seed_folders(tmp_path):
    write_coder(tmp_path / "layers.6" / "seed1", seed=4)
    sae = load_sae(tmp_path, hookpoint="layers.6/seed1")
    assert (sae.layer, sae.site) == (6, "resid_post")
    write_coder(tmp_path / "h.2.mlp.act", seed=4)
    sae = load_sae(tmp_path, hookpoint="h.2.mlp.act", site="mlp_in", layer=9)
    assert (sae.layer, sae.site) == (9, "mlp_in")
    with pytest.raises(SAEFileError, match="no option scale"):
        load_sae(tmp_path / "h.2.mlp.act", scale=2)


def test_legacy_config_and_bfloat16_weights(tmp_path):
    """Early sparsify configs (e.g. EleutherAI/sae-llama-3-8b-32x's) have `signed` and no
    activation, transcode or skip_connection; the latents come from `expansion_factor`."""
    folder = tmp_path / "layers.4"
    t = write_coder(folder, seed=12)
    rewrite_config(
        folder,
        activation=None,
        transcode=None,
        skip_connection=None,
        multi_topk=None,
        num_latents=0,
        expansion_factor=D_SAE // D_IN,
        signed=False,
    )
    rewrite_weights(folder, **{name: v.bfloat16() for name, v in t.items()})
    sae = load_sae(folder)
    assert sae.W_enc.dtype == torch.float32
    t = {name: v.bfloat16().float() for name, v in t.items()}
    x = inputs()
    expected = reference_topk(reference_pre(t, x, transcode=False), K)
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(sae(x), reference_decode(t, expected))


def test_a_whole_checkpoint_or_unknown_hookpoint_names_the_hookpoints(tmp_path):
    write_coder(tmp_path / "layers.0", seed=5)
    write_coder(tmp_path / "layers.1", seed=6)
    # What sparsify's trainer saves beside the coders.
    (tmp_path / "config.json").write_text(json.dumps({"sae": {"k": K}, "hookpoints": []}))
    torch.save({"global_step": 1}, tmp_path / "state.pt")
    with pytest.raises(SAEFileError, match=r"layers\.9.*layers\.0, layers\.1"):
        load_sae(tmp_path, hookpoint="layers.9")
    with pytest.raises(SAEFileError, match=r"several hookpoints; pass hookpoint= .*layers\.1"):
        load_sae(tmp_path, format="sparsify")
    with pytest.raises(SAEFileError, match="subfolder="):
        load_sae(tmp_path)


def rewrite_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))


def rewrite_weights(folder: Path, **changes) -> None:
    tensors = load_file(folder / "sae.safetensors")
    tensors.update(changes)
    save_file({k: v for k, v in tensors.items() if v is not None}, folder / "sae.safetensors")


@pytest.mark.parametrize(
    ("config", "weights", "file", "message"),
    [
        ({}, {"b_dec": None}, "sae.safetensors", "cfg.json: it lacks b_dec"),
        ({}, {"W_skip": torch.zeros(D_IN, D_IN)}, "sae.safetensors", "unexpected W_skip"),
        ({"skip_connection": True}, {}, "sae.safetensors", "lacks W_skip"),
        ({}, {"W_dec": torch.zeros(D_IN, D_SAE)}, "sae.safetensors", r"W_dec has shape \[4, 12\]"),
        ({"num_latents": 0}, {}, "sae.safetensors", r"encoder.weight has shape \[12, 4\]"),
        ({"d_in": 6}, {}, "sae.safetensors", r"needs \[12, 6\]"),
        ({"k": None}, {}, "cfg.json", "k is None"),
        ({"k": 13}, {}, "cfg.json", "more than the 12 latents"),
        ({"activation": "jumprelu"}, {}, "cfg.json", "activation 'jumprelu'"),
        ({"activation": "groupmax", "k": 5}, {}, "cfg.json", "divide"),
        ({"signed": True}, {}, "cfg.json", "signed"),
        ({"transcode": "yes"}, {}, "cfg.json", "transcode is 'yes', not true or false"),
        ({"num_latents": -1}, {}, "cfg.json", "num_latents is -1, not a count"),
        ({"d_in": True}, {}, "cfg.json", "d_in is True"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, config, weights, file, message):
    folder = tmp_path / "layers.0"
    write_coder(folder, seed=8)
    rewrite_config(folder, **config)
    rewrite_weights(folder, **weights)
    with pytest.raises(SAEFileError, match=message) as error:
        load_sae(folder)
    assert str(folder / file) in str(error.value)


def test_unreadable_config(tmp_path):
    folder = tmp_path / "layers.0"
    write_coder(folder, seed=8)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFileError, match="cfg.json is not a readable JSON config"):
        load_sae(folder)


def serve_repo(monkeypatch, repo: Path, requests: list) -> None:
    """The hub client answering from the local folder `repo`, recording each download."""

    def list_repo_files(repo_id, **kwargs):
        return sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **kwargs):
        requests.append((repo_id, list(allow_patterns), local_files_only))
        cache = repo.parent / "cache"
        for name in list_repo_files(repo_id):
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in allow_patterns):
                (cache / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(repo / name, cache / name)
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


@pytest.mark.parametrize("online", [True, False])
def test_hub_repository_of_hookpoint_subfolders(tmp_path, monkeypatch, online):
    repo = tmp_path / "repo"
    t = write_coder(repo / "layers.1", seed=9)
    write_coder(repo / "layers.1.mlp", seed=10)
    write_coder(repo / "layers.10", seed=11)
    (repo / "config.json").write_text("{}")
    requests: list = []
    serve_repo(monkeypatch, repo, requests)
    reason = None if online else "HF_HUB_OFFLINE=1 is set"
    monkeypatch.setattr("mlsae.saes.load.offline_reason", lambda: reason)
    sae = load_sae("EleutherAI/sae-llama-3-8b-32x", hookpoint="layers.1")
    assert (sae.layer, sae.site) == (1, "resid_post")
    x = inputs()
    expected = reference_topk(reference_pre(t, x, transcode=False), K)
    torch.testing.assert_close(sae.encode(x), expected)
    downloaded = sorted(
        str(p.relative_to(tmp_path / "cache")) for p in (tmp_path / "cache").rglob("*")
    )
    assert downloaded == ["layers.1", "layers.1/cfg.json", "layers.1/sae.safetensors"]
    assert requests[0][0] == "EleutherAI/sae-llama-3-8b-32x"
    assert requests[0][2] is not online
    if online:
        with pytest.raises(SAEFileError, match=r"layers\.2.*layers\.1\.mlp"):
            load_sae("EleutherAI/sae-llama-3-8b-32x", hookpoint="layers.2")


def owner_outputs(hookpoint: str) -> dict[str, torch.Tensor]:
    return load_file(OWNER / "outputs" / f"{hookpoint}.safetensors")


def test_owner_files_record_sparsify():
    owner = json.loads((OWNER / "owner.json").read_text())
    assert owner["package"] == "eai-sparsify"
    assert owner["version"].startswith("1.3")


@pytest.mark.parametrize("hookpoint", ["layers.1", "layers.1.mlp", "layers.0.self_attn"])
def test_matches_sparsify_outputs(hookpoint):
    """Our outputs equal sparsify's own `SparseCoder` on the coders it saved."""
    sae = load_sae(OWNER / "checkpoint", hookpoint=hookpoint)
    owner = owner_outputs(hookpoint)
    x = owner["x"]
    with torch.no_grad():
        acts = sae.encode(x)
        torch.testing.assert_close(acts, owner["encode_dense"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(
            sae.pre_activations(x).relu(), owner["pre_acts"], atol=1e-6, rtol=1e-6
        )
        torch.testing.assert_close(sae.decode(acts), owner["decode"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sae(x), owner["forward"], atol=1e-6, rtol=1e-6)
        sparse = sae.encode_sparse(x)
    active = owner["top_acts"] > 0
    assert sparse.values.numel() == int(active.sum())
    # The last input activates fewer than k latents: sparsify reports zeros for the rest.
    assert int(active[-1].sum()) < sae.k
    owner_latents = [
        sorted(owner["top_indices"][row][active[row]].tolist()) for row in range(len(x))
    ]
    bounds = sparse.offsets.tolist()
    ours = [sparse.indices[a:b].tolist() for a, b in zip(bounds, bounds[1:], strict=False)]
    assert ours == owner_latents
