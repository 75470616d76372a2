"""The naming scheme of `mlsae.names`: published ids, runs, and reading them back."""

from mlsae.lm.sites import SITES
from mlsae.names import OTHER_SITES, get_repo_id, parse_repo_id, run_name


def test_published_names_read_back():
    repo_id = get_repo_id("EleutherAI/pythia-70m-deduped", 64, 32, tuned_lens=True)
    assert repo_id == "tim-lawson/mlsae-pythia-70m-deduped-x64-k32-lens-tfm"
    parsed = parse_repo_id(repo_id)
    assert (parsed.model, parsed.expansion_factor, parsed.k) == ("pythia-70m-deduped", 64, 32)
    assert (parsed.tuned_lens, parsed.transformer, parsed.site) == (True, True, "resid_post")


def test_a_site_other_than_the_block_output_is_in_the_names_and_read_back():
    repo_id = get_repo_id("EleutherAI/pythia-70m-deduped", 64, 32, site="mlp_out")
    assert repo_id == "tim-lawson/mlsae-pythia-70m-deduped-x64-k32-mlp_out-tfm"
    assert parse_repo_id(repo_id).site == "mlp_out"
    single = get_repo_id("m", 8, 4, layers=[3], site="attn_z")
    assert single == "tim-lawson/sae-m-x8-k4-attn_z-tfm-layers-3"
    assert (parse_repo_id(single).site, parse_repo_id(single).layers) == ("attn_z", "3")
    assert run_name("org/m", 8, 4, [1, 2], "resid_pre") == "mlsae-m-x8-k4-resid_pre-layers-1-2"
    assert run_name("org/m", 8, 4, None) == "mlsae-m-x8-k4"
    assert run_name("org/m", 8, 4, [0], "mlp_out", "batchtopk") == (
        "mlsae-m-x8-k4-batchtopk-mlp_out-layers-0"
    )


def test_names_know_every_site():
    assert {"resid_post", *OTHER_SITES} == set(SITES)
