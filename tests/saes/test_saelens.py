"""SAELens SAEs: tiny SAEs written here and by SAELens itself (scripts/crosscheck_saelens.py),
loaded with `load_sae` and checked against SAELens' outputs and against its formulas written
out in plain torch."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlsae.saes import SAEFileError, load_sae
from mlsae.saes.formats.saelens_config import hook_location
from tests.saes.fake_hub import serve

OWNER = Path(__file__).resolve().parents[1] / "data" / "saes" / "saelens"
D_IN, D_SAE = 6, 10
OWNER_SAES = json.loads((OWNER / "owner.json").read_text())["saes"]


def owner_sae(name: str, **options):
    if name.startswith("matryoshka/"):
        return load_sae(OWNER / "matryoshka", subfolder=name.removeprefix("matryoshka/"))
    return load_sae(OWNER / name, **options)


@pytest.mark.parametrize("name", sorted(OWNER_SAES))
def test_matches_saelens_outputs(name):
    expected = load_file(OWNER / name / "expected.safetensors")
    options = {"norm_scaling_factor": 2.5} if "expected_average" in name else {}
    sae = owner_sae(name, **options)
    x = expected["x"]
    acts = sae.encode(x)
    assert int((acts != 0).sum()) > 0 and int((acts == 0).sum()) > 0
    torch.testing.assert_close(acts, expected["encode"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sae.decode(acts), expected["decode"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sae(x), expected["forward"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sae.encode_sparse(x).to_dense(), acts)


def test_unscaled_input_without_a_scaling_factor_warns_and_matches_load_from_disk():
    expected = load_file(OWNER / "jumprelu_expected_average" / "expected.safetensors")
    with pytest.warns(UserWarning, match="not given .norm_scaling_factor=., so inputs are used"):
        sae = load_sae(OWNER / "jumprelu_expected_average")
    x = expected["x"]
    torch.testing.assert_close(sae.encode(x), expected["encode_unscaled"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sae(x), expected["forward_unscaled"], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(expected["forward_unscaled"], expected["forward"])


def test_scaling_factor_given_loads_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_sae(OWNER / "jumprelu_expected_average", norm_scaling_factor=2.5)


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("standard", (1, "resid_pre", None)),
        ("standard_layer_norm", (2, "mlp_out", None)),
        ("topk_norm_rescale", (0, "resid_post", None)),
        ("topk_rescaled_hook_z", (3, "attn_z", None)),
        ("jumprelu_skip_transcoder", (1, "mlp_in", "mlp_out")),
        ("transcoder", (2, "mlp_in", "mlp_out")),
        ("flat_topk", (4, "resid_pre", None)),
        ("matryoshka/standard/blocks.12.hook_resid_post", (12, "resid_post", None)),
    ],
)
def test_owner_files_say_where_the_sae_reads(name, where):
    sae = owner_sae(name)
    assert (sae.format, sae.layer, sae.site, sae.output_site) == ("saelens", *where)
    assert sae.is_transcoder == (where[2] is not None)


def test_matryoshka_release_folder_loads_by_folder_file_and_format():
    folder = OWNER / "matryoshka" / "standard" / "blocks.12.hook_resid_post"
    x = load_file(folder / "expected.safetensors")["x"]
    expected = load_file(folder / "expected.safetensors")["forward"]
    for sae in (
        load_sae(folder),
        load_sae(folder / "cfg.json"),
        load_sae(folder / "sae_weights.safetensors"),
        load_sae(str(folder), format="saelens"),
    ):
        assert (sae.d_in, sae.d_sae, sae.layer, sae.site) == (8, 16, 12, "resid_post")
        torch.testing.assert_close(sae(x), expected, atol=1e-6, rtol=1e-5)


def test_matryoshka_release_loads_one_sae_from_the_hub(monkeypatch, tmp_path):
    repo = "chanind/gemma-2-2b-batch-topk-matryoshka-saes-w-32k-l0-40"
    hub = serve(monkeypatch, tmp_path, repo, OWNER / "matryoshka")
    sae = load_sae(repo, subfolder="standard/blocks.12.hook_resid_post")
    expected = load_file(
        OWNER / "matryoshka/standard/blocks.12.hook_resid_post/expected.safetensors"
    )
    torch.testing.assert_close(sae(expected["x"]), expected["forward"], atol=1e-6, rtol=1e-5)
    assert all(f.startswith("standard/blocks.12.hook_resid_post/") for f in hub.downloaded())
    assert (sae.format, sae.layer, sae.site) == ("saelens", 12, "resid_post")


# --- SAEs written here, against SAELens' formulas -------------------------------------


def write_sae(folder: Path, cfg_changes: dict, seed: int = 0, **tensor_changes) -> dict:
    """An SAELens 6 SAE: decoder rows of norms far from 1, biases and thresholds non-zero."""
    architecture = cfg_changes.get("architecture", "standard")
    d_out = cfg_changes.get("d_out", D_IN)
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=gen) * 0.6,
        "b_enc": torch.randn(D_SAE, generator=gen) * 0.3,
        "W_dec": torch.randn(D_SAE, d_out, generator=gen) * torch.linspace(0.3, 3, D_SAE)[:, None],
        "b_dec": torch.randn(d_out, generator=gen) * 0.5,
    }
    if architecture.startswith("jumprelu"):
        tensors["threshold"] = torch.linspace(0.1, 1.2, D_SAE)
    if architecture.endswith("skip_transcoder"):
        tensors["W_skip"] = torch.randn(d_out, D_IN, generator=gen) * 0.3
    tensors.update(tensor_changes)
    tensors = {name: t for name, t in tensors.items() if t is not None}
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": "transcoder" not in architecture,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.3.hook_resid_post"},
        "architecture": architecture,
        **cfg_changes,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, folder / "sae_weights.safetensors")
    return {"cfg": cfg, **tensors}


def reference_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Each vector keeps the latents that fewer than k others exceed, then ReLU."""
    rank = (pre[..., None, :] > pre[..., :, None]).sum(-1)
    return torch.where(rank < k, pre, torch.zeros(())).relu()


def reference(t: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens' encode and forward, step by step."""
    cfg = t["cfg"]
    architecture, norm = cfg["architecture"], cfg["normalize_activations"]
    transcoder = "transcoder" in architecture
    h, undo = x, lambda y: y
    if norm == "layer_norm":
        mean = x.mean(-1, keepdim=True)
        std = (x - mean).std(-1, keepdim=True)
        h, undo = (x - mean) / (std + 1e-5), lambda y: y * std + mean
    elif norm == "constant_norm_rescale":
        coefficient = D_IN**0.5 / x.norm(dim=-1, keepdim=True)
        h, undo = x * coefficient, lambda y: y / coefficient
    if cfg["apply_b_dec_to_input"]:
        h = h - t["b_dec"]
    pre = torch.einsum("...i,is->...s", h, t["W_enc"]) + t["b_enc"]
    norms = t["W_dec"].norm(dim=-1)
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    if rescale:
        pre = pre * norms
    if architecture == "topk":
        acts = reference_topk(pre, cfg["k"])
    elif architecture.startswith("jumprelu"):
        acts = pre.relu() * (pre > t["threshold"])
    else:
        acts = pre.relu()
    out = torch.einsum("...s,so->...o", acts / norms if rescale else acts, t["W_dec"]) + t["b_dec"]
    out = out if transcoder else undo(out)
    if "W_skip" in t:
        out = out + torch.einsum("...i,oi->...o", x, t["W_skip"])
    return acts, out


def inputs(seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 4, D_IN, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


@pytest.mark.parametrize(
    "cfg",
    [
        {"architecture": "standard"},
        {"architecture": "standard", "apply_b_dec_to_input": False},
        {"architecture": "standard", "normalize_activations": "layer_norm"},
        {"architecture": "topk", "k": 3, "normalize_activations": "constant_norm_rescale"},
        {"architecture": "topk", "k": 3, "rescale_acts_by_decoder_norm": True},
        {"architecture": "jumprelu", "apply_b_dec_to_input": False},
        {"architecture": "jumprelu", "normalize_activations": "layer_norm"},
        {"architecture": "transcoder", "d_out": 4},
        {"architecture": "jumprelu_transcoder", "normalize_activations": "layer_norm"},
        {"architecture": "skip_transcoder", "normalize_activations": "constant_norm_rescale"},
        {"architecture": "jumprelu_skip_transcoder", "d_out": 7},
    ],
    ids=lambda cfg: "-".join(str(v) for v in cfg.values()),
)
def test_encode_decode_forward_follow_saelens_formulas(tmp_path, cfg):
    if "transcoder" in cfg["architecture"]:
        cfg = {
            **cfg,
            "metadata": {
                "sae_lens_version": "6.5.0",
                "hook_name": "blocks.3.ln2.hook_normalized",
                "hook_name_out": "blocks.3.hook_mlp_out",
            },
        }
    t = write_sae(tmp_path / "sae", cfg)
    sae = load_sae(tmp_path / "sae")
    x = inputs()
    acts, out = reference(t, x)
    assert 0 < int((acts != 0).sum()) < acts.numel()
    if cfg["architecture"] == "topk":
        assert ((acts != 0).sum(-1) == 3).all()
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae(x), out)
    if "skip" not in cfg["architecture"]:
        sae.encode(x)
        torch.testing.assert_close(sae.decode(acts), out)
    sparse = sae.encode_sparse(x)
    torch.testing.assert_close(sparse.to_dense(), acts)
    assert sparse.values.numel() == int((acts != 0).sum())


def test_rescaled_topk_selects_by_pre_activation_times_decoder_norm(tmp_path):
    cfg = {"architecture": "topk", "k": 2, "rescale_acts_by_decoder_norm": True}
    t = write_sae(tmp_path / "sae", cfg)
    x = inputs()
    pre = torch.einsum("...i,is->...s", x - t["b_dec"], t["W_enc"]) + t["b_enc"]
    norms = t["W_dec"].norm(dim=-1)
    by_scaled = reference_topk(pre * norms, 2) != 0
    assert (by_scaled != (reference_topk(pre, 2) != 0)).any()
    acts = load_sae(tmp_path / "sae").encode(x)
    assert torch.equal(acts != 0, by_scaled)
    torch.testing.assert_close(acts[by_scaled], (pre * norms)[by_scaled])


def test_expected_average_scales_input_and_output(tmp_path):
    t = write_sae(tmp_path / "sae", {"normalize_activations": "expected_average_only_in"})
    x = inputs()
    sae = load_sae(tmp_path / "sae", norm_scaling_factor=4.0)
    t_plain = {**t, "cfg": {**t["cfg"], "normalize_activations": "none"}}
    acts, out = reference(t_plain, x * 4.0)
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae(x), out / 4.0)


def test_flat_config_reads_hook_point_topk_kwargs_and_boolean_normalisation(tmp_path):
    t = write_sae(tmp_path / "sae", {"architecture": "topk", "k": 2})
    flat = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "hook_point": "blocks.7.hook_mlp_out",
        "hook_point_layer": 7,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 2},
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
        "finetuning_scaling_factor": False,
    }
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(flat))
    sae = load_sae(tmp_path / "sae")
    assert (sae.layer, sae.site, sae.k) == (7, "mlp_out", 2)
    torch.testing.assert_close(sae.encode(inputs()), reference(t, inputs())[0])


def test_hugging_face_hook_name_gives_the_site_when_the_lens_name_does_not(tmp_path):
    metadata = {
        "sae_lens_version": "6.5.0",
        "hook_name": "blocks.5.hook_mlp_in",
        "hf_hook_name": "model.layers.5.pre_feedforward_layernorm.output",
    }
    write_sae(tmp_path / "sae", {"metadata": metadata})
    sae = load_sae(tmp_path / "sae")
    assert (sae.layer, sae.site) == (5, "mlp_in")


def test_older_log_threshold_is_exponentiated(tmp_path):
    log_threshold = torch.linspace(-2.0, 0.2, D_SAE)
    t = write_sae(
        tmp_path / "sae", {"architecture": "jumprelu"}, threshold=None, log_threshold=log_threshold
    )
    t["threshold"] = log_threshold.exp()
    x = inputs()
    torch.testing.assert_close(load_sae(tmp_path / "sae").encode(x), reference(t, x)[0])


def test_scaling_factor_of_ones_is_ignored(tmp_path):
    t = write_sae(tmp_path / "sae", {}, scaling_factor=torch.ones(D_SAE))
    torch.testing.assert_close(load_sae(tmp_path / "sae")(inputs()), reference(t, inputs())[1])


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("blocks.0.hook_resid_pre", (0, "resid_pre")),
        ("blocks.11.hook_resid_post", (11, "resid_post")),
        ("blocks.2.hook_attn_out", (2, "attn_out")),
        ("blocks.2.hook_mlp_out", (2, "mlp_out")),
        ("blocks.4.attn.hook_z", (4, "attn_z")),
        ("blocks.4.ln2.hook_normalized", (4, "mlp_in")),
        ("blocks.3.hook_in", (3, "resid_pre")),
        ("blocks.3.hook_out", (3, "resid_post")),
        ("blocks.3.mlp.hook_in", (3, "mlp_in")),
        ("blocks.3.mlp.hook_out", (3, "mlp_out")),
        ("blocks.3.attn.hook_out", (3, "attn_out")),
        ("model.layers.9", (9, "resid_post")),
        ("model.layers.9.output", (9, "resid_post")),
        ("layers.5", (5, "resid_post")),
        ("layers.5.mlp", (5, "mlp_out")),
        ("model.layers.5.self_attn", (5, "attn_out")),
        ("model.layers.5.self_attn.o_proj.input", (5, "attn_z")),
        ("model.layers.5.post_feedforward_layernorm.output", (5, "mlp_out")),
        ("gpt_neox.layers.1", (1, "resid_post")),
        ("transformer.h.1.mlp", (1, "mlp_out")),
        ("blocks.0.hook_resid_mid", None),
        ("blocks.0.hook_mlp_in", None),
        ("blocks.0.mlp.hook_post", None),
        ("hook_embed", None),
    ],
)
def test_hook_names_map_to_layer_and_site(name, where):
    assert hook_location(name) == where


# --- mistakes ----------------------------------------------------------------------------


def test_missing_tensor_names_the_file(tmp_path):
    write_sae(tmp_path / "sae", {"architecture": "jumprelu"}, threshold=None)
    with pytest.raises(SAEFileError, match=r"sae_weights\.safetensors lacks threshold"):
        load_sae(tmp_path / "sae")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"b_dec": torch.zeros(D_IN + 1)}, r"b_dec has shape \(7,\)"),
        ({"W_enc": torch.zeros(D_IN, D_SAE + 1)}, r"W_enc has shape \(6, 11\)"),
        ({"W_dec": torch.zeros(D_SAE, D_IN + 2)}, r"W_dec has shape \(10, 8\)"),
    ],
)
def test_wrong_shape_names_the_file_and_tensor(tmp_path, changes, match):
    write_sae(tmp_path / "sae", {}, **changes)
    with pytest.raises(SAEFileError, match=r"sae_weights\.safetensors: " + match):
        load_sae(tmp_path / "sae")


def test_unknown_hookpoint_needs_a_site(tmp_path):
    metadata = {"sae_lens_version": "6.5.0", "hook_name": "blocks.2.hook_resid_mid"}
    write_sae(tmp_path / "sae", {"metadata": metadata})
    with pytest.raises(SAEFileError, match=r"cfg\.json: .*blocks\.2\.hook_resid_mid.*site="):
        load_sae(tmp_path / "sae")
    sae = load_sae(tmp_path / "sae", site="resid_post")
    assert (sae.layer, sae.site) == (2, "resid_post")


def test_single_head_sae_needs_a_site(tmp_path):
    metadata = {"sae_lens_version": "6.5.0", "hook_name": "blocks.2.attn.hook_z"}
    write_sae(tmp_path / "sae", {"metadata": {**metadata, "hook_head_index": 1}})
    with pytest.raises(SAEFileError, match=r"cfg\.json: the SAE reads head 1 of"):
        load_sae(tmp_path / "sae")


def test_transcoder_output_hook_must_be_a_site(tmp_path):
    metadata = {
        "sae_lens_version": "6.5.0",
        "hook_name": "blocks.1.ln2.hook_normalized",
        "hook_name_out": "blocks.1.mlp.hook_post",
    }
    write_sae(tmp_path / "sae", {"architecture": "transcoder", "metadata": metadata})
    with pytest.raises(SAEFileError, match=r"cfg\.json: the transcoder writes .*output_site="):
        load_sae(tmp_path / "sae")
    assert load_sae(tmp_path / "sae", output_site="mlp_out").output_site == "mlp_out"


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"architecture": "gated"}, r"architecture 'gated' is not one load_sae reads"),
        ({"architecture": "topk"}, r"a topk SAE needs a positive integer k, not None"),
        ({"architecture": "topk", "k": D_SAE + 1}, r"k 11 exceeds d_sae 10"),
        ({"d_in": "6"}, r"d_in must be a positive integer"),
        ({"normalize_activations": "covariance_whitening"}, r"normalize_activations 'covar"),
        (
            {"metadata": {}, "activation_fn_str": "tanh-relu"},
            r"activation function 'tanh-relu' is not",
        ),
    ],
)
def test_bad_config_names_the_file(tmp_path, changes, match):
    write_sae(tmp_path / "sae", changes)
    with pytest.raises(SAEFileError, match=r"cfg\.json: " + match):
        load_sae(tmp_path / "sae")


def test_unreadable_config_names_the_file(tmp_path):
    write_sae(tmp_path / "sae", {})
    (tmp_path / "sae" / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFileError, match=r"cfg\.json is not a readable JSON config"):
        load_sae(tmp_path / "sae", format="saelens")


def test_missing_config_with_format_given(tmp_path):
    write_sae(tmp_path / "sae", {})
    (tmp_path / "sae" / "cfg.json").unlink()
    with pytest.raises(SAEFileError, match=r"cfg\.json is missing"):
        load_sae(tmp_path / "sae", format="saelens")


def test_scaling_factor_for_an_sae_that_takes_none(tmp_path):
    write_sae(tmp_path / "sae", {})
    with pytest.raises(SAEFileError, match=r"cfg\.json: norm_scaling_factor= applies only"):
        load_sae(tmp_path / "sae", norm_scaling_factor=2.0)


def test_fine_tuning_scaling_factor_other_than_ones_is_refused(tmp_path):
    write_sae(tmp_path / "sae", {}, scaling_factor=torch.full((D_SAE,), 2.0))
    with pytest.raises(SAEFileError, match=r"sae_weights\.safetensors holds a fine-tuning"):
        load_sae(tmp_path / "sae")
