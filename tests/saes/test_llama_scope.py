"""Llama Scope / lm_saes 1.0 SAEs: written into tmp_path, loaded with `load_sae`, checked
against lm_saes 1.0's maths written out here in the trained (normalised) space, and against
outputs of lm_saes 1.0 itself (tests/data/saes/llama_scope, written by
scripts/crosscheck_llama_scope.py)."""

import json
import math
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

import mlsae.saes.load as load_module
from mlsae.saes.load import load_sae
from mlsae.saes.registry import SAEFileError

D_MODEL, D_SAE = 6, 10
DATA = Path(__file__).parent.parent / "data" / "saes" / "llama_scope"

SAE_HP = {
    "d_model": D_MODEL,
    "d_sae": D_SAE,
    "hook_point_in": "blocks.5.hook_resid_post",
    "hook_point_out": "blocks.5.hook_resid_post",
    "use_decoder_bias": True,
    "apply_decoder_bias_to_pre_encoder": False,
    "act_fn": "jumprelu",
    "jump_relu_threshold": 0.4,
    "norm_activation": "dataset-wise",
    "dataset_average_activation_norm": {"in": 7.5, "out": 7.5},
    "sparsity_include_decoder_norm": True,
    "use_glu_encoder": False,
    "top_k": 3,
    "dtype": "torch.bfloat16",
    "device": "cuda:0",
}
TRANSCODER_HP = {
    **SAE_HP,
    "hook_point_in": "blocks.2.ln2.hook_normalized",
    "hook_point_out": "blocks.2.hook_mlp_out",
    "act_fn": "topk",
    "jump_relu_threshold": 0.25,
    "dataset_average_activation_norm": {"in": 2.0, "out": 0.6},
}


def raw_weights(seed: int = 0, d_sae: int = D_SAE) -> dict[str, torch.Tensor]:
    """Weights as trained: decoder columns of norms far from 1, non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    decoder = torch.randn(D_MODEL, d_sae, generator=g)
    return {
        "encoder.weight": torch.randn(d_sae, D_MODEL, generator=g) * 0.6,
        "encoder.bias": torch.randn(d_sae, generator=g) * 0.3,
        "decoder.weight": decoder / decoder.norm(dim=0) * torch.linspace(0.2, 3.0, d_sae),
        "decoder.bias": torch.randn(D_MODEL, generator=g) * 0.2,
    }


def write_sae(
    folder: Path,
    hp: dict,
    weights: dict[str, torch.Tensor] | None = None,
    checkpoint: str = "checkpoints/final.safetensors",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """An lm_saes SAE's files; the weights as saved, in float32."""
    saved = {k: v.to(dtype) for k, v in (raw_weights() if weights is None else weights).items()}
    (folder / checkpoint).parent.mkdir(parents=True, exist_ok=True)
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    if checkpoint.endswith(".safetensors"):
        save_file(saved, folder / checkpoint)
    else:
        torch.save({"sae": saved, "version": "1.0.0"}, folder / checkpoint)
    return {k: v.float() for k, v in saved.items()}


def inputs(hp: dict, seed: int = 1) -> torch.Tensor:
    """Two leading dims; raw activations about as large as the site's average norm."""
    g = torch.Generator().manual_seed(seed)
    norm = hp.get("dataset_average_activation_norm", {"in": 3.0})["in"]
    return torch.randn(2, 3, D_MODEL, generator=g) * norm / math.sqrt(D_MODEL)


def scales(hp: dict, x: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """The factors that bring raw inputs and outputs to norm sqrt(d_model) in training."""
    if hp["norm_activation"] == "dataset-wise":
        norms = hp["dataset_average_activation_norm"]
        return math.sqrt(D_MODEL) / norms["in"], math.sqrt(D_MODEL) / norms["out"]
    if hp["norm_activation"] == "token-wise":
        factor = math.sqrt(D_MODEL) / x.norm(dim=-1, keepdim=True)
        return factor, factor
    return 1.0, 1.0


def latent_scale(w: dict, hp: dict, x: torch.Tensor) -> torch.Tensor:
    """How much larger lm_saes 1.0's inference latents are than the trained ones: each
    latent times its decoder norm in the space its rewrite leaves, on the raw input scale
    where the dataset norms are folded into the weights."""
    s_in, s_out = scales(hp, x)
    norms = w["decoder.weight"].norm(dim=0)
    if hp["norm_activation"] == "dataset-wise":
        return (
            norms / s_out if hp["sparsity_include_decoder_norm"] else 1 / s_in * torch.ones(D_SAE)
        )
    return norms if hp["sparsity_include_decoder_norm"] else torch.ones(D_SAE)


def expected_encode(w: dict, hp: dict, x: torch.Tensor) -> torch.Tensor:
    s_in, s_out = scales(hp, x)
    x_normalised = s_in * x
    if hp["apply_decoder_bias_to_pre_encoder"]:
        x_normalised = x_normalised - w["decoder.bias"] * (s_in / s_out)
    trained_pre = x_normalised @ w["encoder.weight"].T + w["encoder.bias"]
    pre = trained_pre * latent_scale(w, hp, x)
    act_fn = hp["act_fn"]
    if act_fn == "jumprelu":
        return torch.where(pre > hp["jump_relu_threshold"], pre, torch.zeros_like(pre))
    if act_fn == "topk":
        kept = pre.clamp(min=0).topk(hp["top_k"], dim=-1).indices
        mask = torch.zeros_like(pre).scatter(-1, kept, 1.0)
        return pre.clamp(min=0) * mask
    return pre.clamp(min=0)


def expected_decode(w: dict, hp: dict, acts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    _, s_out = scales(hp, x)
    trained_acts = acts / latent_scale(w, hp, x)
    return (trained_acts @ w["decoder.weight"].T + w["decoder.bias"]) / s_out


def check_against_formula(sae, w: dict, hp: dict, x: torch.Tensor) -> None:
    acts = sae.encode(x)
    want = expected_encode(w, hp, x)
    torch.testing.assert_close(acts, want, atol=1e-5, rtol=1e-5)
    assert 0 < int((want > 0).sum()) < want.numel()  # the activation decides something
    torch.testing.assert_close(sae(x), expected_decode(w, hp, want, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(acts), sae(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sae.encode_sparse(x).to_dense(), acts)


def test_llama_scope_sae_matches_lm_saes_formula(tmp_path: Path) -> None:
    w = write_sae(tmp_path, SAE_HP)
    sae = load_sae(tmp_path)
    assert sae.format == "llama_scope"
    assert (sae.d_in, sae.d_sae, sae.layer, sae.site) == (D_MODEL, D_SAE, 5, "resid_post")
    assert not sae.is_transcoder
    check_against_formula(sae, w, SAE_HP, inputs(SAE_HP))


def test_unit_decoder_norms_and_scalar_threshold(tmp_path: Path) -> None:
    write_sae(tmp_path, SAE_HP)
    sae = load_sae(tmp_path)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    assert sae.activation == "jumprelu"
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), 0.4))


def test_transcoder_topk_keeps_top_k_despite_threshold(tmp_path: Path) -> None:
    """lm_saes 1.0 prints that it converts such a top-k SAE to JumpReLU, yet runs top-k."""
    w = write_sae(tmp_path, TRANSCODER_HP)
    sae = load_sae(tmp_path)
    assert sae.is_transcoder and (sae.activation, sae.k) == ("topk", 3)
    assert (sae.layer, sae.site, sae.output_site) == (2, "mlp_in", "mlp_out")
    check_against_formula(sae, w, TRANSCODER_HP, inputs(TRANSCODER_HP))


@pytest.mark.parametrize("include_decoder_norm", [True, False])
def test_topk_without_threshold_subtracting_decoder_bias(
    tmp_path: Path, include_decoder_norm: bool
) -> None:
    hp = {
        **SAE_HP,
        "act_fn": "topk",
        "jump_relu_threshold": 0.0,
        "apply_decoder_bias_to_pre_encoder": True,
        "sparsity_include_decoder_norm": include_decoder_norm,
    }
    w = write_sae(tmp_path, hp)
    sae = load_sae(tmp_path)
    assert (sae.activation, sae.k) == ("topk", 3)
    check_against_formula(sae, w, hp, inputs(hp))
    assert int((sae.encode(inputs(hp)) > 0).sum(-1).max()) == 3


def test_token_wise_relu_restores_each_vector_scale(tmp_path: Path) -> None:
    hp = {**SAE_HP, "norm_activation": "token-wise", "act_fn": "relu"}
    hp["apply_decoder_bias_to_pre_encoder"] = True
    w = write_sae(tmp_path, hp)
    sae = load_sae(tmp_path)
    x = inputs(hp) * torch.tensor([1.0, 5.0]).view(2, 1, 1)
    check_against_formula(sae, w, hp, x)


def test_defaults_of_lm_saes_config(tmp_path: Path) -> None:
    """Absent fields take SAEConfig's defaults: token-wise, ReLU, decoder bias subtracted,
    decoder norm folded in, d_sae = d_model * expansion_factor."""
    hp = {"d_model": D_MODEL, "expansion_factor": 2, "hook_point_in": "blocks.1.hook_mlp_out"}
    w = write_sae(tmp_path, hp, raw_weights(d_sae=2 * D_MODEL))
    sae = load_sae(tmp_path)
    assert (sae.d_sae, sae.layer, sae.site, sae.activation) == (12, 1, "mlp_out", "relu")
    defaults = {
        "norm_activation": "token-wise",
        "act_fn": "relu",
        "jump_relu_threshold": 0.0,
        "apply_decoder_bias_to_pre_encoder": True,
        "sparsity_include_decoder_norm": True,
    }
    check_against_formula(sae, w, {**hp, **defaults}, inputs(hp))


def test_pt_checkpoint_and_ways_to_name_the_sae(tmp_path: Path) -> None:
    folder = tmp_path / "L5R"
    w = write_sae(folder, SAE_HP, checkpoint="checkpoints/final.pt")
    x = inputs(SAE_HP)
    want = expected_encode(w, SAE_HP, x)
    for path, options in [
        (folder, {}),
        (folder / "hyperparams.json", {}),
        (folder / "checkpoints" / "final.pt", {"format": "llama_scope"}),
        (tmp_path, {"subfolder": "L5R"}),
    ]:
        torch.testing.assert_close(load_sae(path, **options).encode(x), want)


def test_lm_saes_checkpoint_order(tmp_path: Path) -> None:
    """A pruned checkpoint wins over the final one, as in lm_saes 1.0's `from_config`."""
    write_sae(tmp_path, SAE_HP)
    pruned = write_sae(tmp_path, SAE_HP, raw_weights(seed=7), "checkpoints/pruned.safetensors")
    x = inputs(SAE_HP)
    torch.testing.assert_close(
        load_sae(tmp_path).encode(x), expected_encode(pruned, SAE_HP, x), atol=1e-5, rtol=1e-5
    )


def test_options_name_an_unknown_hook(tmp_path: Path) -> None:
    write_sae(tmp_path, {**SAE_HP, "hook_point_in": "model.layers.5", "hook_point_out": None})
    with pytest.raises(SAEFileError, match=r"hyperparams\.json.*model\.layers\.5.*layer="):
        load_sae(tmp_path)
    sae = load_sae(tmp_path, layer=5, site="resid_post")
    assert (sae.layer, sae.site, sae.is_transcoder) == (5, "resid_post", False)


def test_hub_subfolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`load_sae(repo, subfolder=)` fetches the one SAE folder of a Llama Scope repository."""
    repo = tmp_path / "repo"
    w = write_sae(
        repo / "Llama3_1-8B-Base-L15R-8x",
        {
            **SAE_HP,
            "hook_point_in": "blocks.15.hook_resid_post",
            "hook_point_out": "blocks.15.hook_resid_post",
        },
    )
    write_sae(repo / "Llama3_1-8B-Base-L16R-8x", SAE_HP, raw_weights(seed=3))
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    fetched: list[list[str]] = []

    def snapshot_download(repo_id: str, allow_patterns: list[str], **kwargs) -> str:
        assert repo_id == "fnlp/Llama3_1-8B-Base-LXR-8x"
        fetched.append(allow_patterns)
        return str(repo)

    monkeypatch.setattr(load_module, "offline_reason", lambda: None)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id: files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    sae = load_sae("fnlp/Llama3_1-8B-Base-LXR-8x", subfolder="Llama3_1-8B-Base-L15R-8x")
    assert fetched == [
        [
            "Llama3_1-8B-Base-L15R-8x/checkpoints/final.safetensors",
            "Llama3_1-8B-Base-L15R-8x/hyperparams.json",
        ]
    ]
    assert (sae.format, sae.layer, sae.site) == ("llama_scope", 15, "resid_post")
    x = inputs(SAE_HP)
    torch.testing.assert_close(sae.encode(x), expected_encode(w, SAE_HP, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"norm_activation": "batch-wise"}, r"hyperparams\.json: norm_activation 'batch-wise'"),
        ({"norm_activation": "layer"}, r"hyperparams\.json: norm_activation 'layer'"),
        ({"dataset_average_activation_norm": None}, r"hyperparams\.json.*no 'in' norm"),
        ({"dataset_average_activation_norm": {"in": 0}}, r"hyperparams\.json.*positive"),
        ({"act_fn": "gelu"}, r"hyperparams\.json: act_fn 'gelu'"),
        ({"use_glu_encoder": True}, r"hyperparams\.json: .*use_glu_encoder"),
        ({"jump_relu_threshold": -0.5}, r"hyperparams\.json: a negative jump_relu_threshold"),
        ({"d_model": "six"}, r"hyperparams\.json: d_model is 'six', not an integer"),
        ({"hook_point_in": "blocks.5.hook_resid_mid"}, r"hyperparams\.json.*hook_resid_mid"),
        ({"d_sae": 12}, r"final\.safetensors: encoder\.weight has shape \[10, 6\].*\[12, 6\]"),
    ],
)
def test_bad_config(tmp_path: Path, change: dict, message: str) -> None:
    write_sae(tmp_path, {**SAE_HP, **change})
    with pytest.raises(SAEFileError, match=message):
        load_sae(tmp_path)


def test_transcoder_needs_its_output_norm(tmp_path: Path) -> None:
    write_sae(tmp_path, {**TRANSCODER_HP, "dataset_average_activation_norm": {"in": 2.0}})
    with pytest.raises(SAEFileError, match=r"hyperparams\.json: a transcoder.*'out'"):
        load_sae(tmp_path)


@pytest.mark.parametrize(
    ("tensor", "replacement", "message"),
    [
        ("decoder.bias", None, r"final\.safetensors lacks decoder\.bias"),
        ("decoder.weight", torch.zeros(D_SAE, D_MODEL), r"decoder\.weight has shape \[10, 6\]"),
    ],
)
def test_bad_weights(tmp_path: Path, tensor: str, replacement, message: str) -> None:
    weights = raw_weights()
    if replacement is None:
        del weights[tensor]
    else:
        weights[tensor] = replacement
    write_sae(tmp_path, SAE_HP, weights)
    with pytest.raises(SAEFileError, match=message):
        load_sae(tmp_path)


def test_missing_or_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "hyperparams.json").write_text(json.dumps(SAE_HP))
    with pytest.raises(SAEFileError, match=r"holds hyperparams\.json but no weights"):
        load_sae(tmp_path)
    (tmp_path / "hyperparams.json").write_text("{not json")
    with pytest.raises(SAEFileError, match=r"hyperparams\.json is not readable JSON"):
        load_sae(tmp_path)
    write_sae(tmp_path, SAE_HP)
    (tmp_path / "checkpoints" / "final.safetensors").write_bytes(b"garbage")
    with pytest.raises(SAEFileError, match=r"final\.safetensors is not a readable lm_saes"):
        load_sae(tmp_path)


def test_no_decoder_bias(tmp_path: Path) -> None:
    weights = raw_weights()
    del weights["decoder.bias"]
    hp = {**SAE_HP, "use_decoder_bias": False}
    w = write_sae(tmp_path, hp, weights)
    w["decoder.bias"] = torch.zeros(D_MODEL)
    check_against_formula(load_sae(tmp_path), w, hp, inputs(hp))


@pytest.mark.parametrize("case", ["sae", "transcoder", "topk", "bf16", "tokenwise"])
def test_matches_lm_saes_outputs(case: str) -> None:
    """Our outputs equal those lm_saes 1.0 itself computed on the committed files."""
    owner = json.loads((DATA / "owner.json").read_text())
    assert owner["package"] == "lm_saes" and owner["tag"] == "v1.0.0"
    expected = load_file(DATA / "expected" / f"{case}.safetensors")
    sae = load_sae(DATA / case)
    torch.testing.assert_close(sae.encode(expected["x"]), expected["encode"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sae(expected["x"]), expected["forward"], atol=1e-6, rtol=1e-5)
    assert int((expected["encode"] > 0).sum()) > 0
