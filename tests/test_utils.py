from mlsae.utils import get_repo_id


def test_get_repo_id_follows_published_names():
    assert (
        get_repo_id("EleutherAI/pythia-70m-deduped", 64, 32)
        == "tim-lawson/mlsae-pythia-70m-deduped-x64-k32-tfm"
    )
    assert (
        get_repo_id("EleutherAI/pythia-160m-deduped", 64, 32, tuned_lens=True, transformer=False)
        == "tim-lawson/mlsae-pythia-160m-deduped-x64-k32-lens"
    )
    assert (
        get_repo_id("EleutherAI/pythia-70m-deduped", 64, 32, layers=[3])
        == "tim-lawson/sae-pythia-70m-deduped-x64-k32-tfm-layers-3"
    )
