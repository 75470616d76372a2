"""The shared parts of the SAE interface: the sparse form of the latents and
`SAE.encode_sparse`, on an SAE written here."""

import pytest
import torch

from mlsae.saes import base
from mlsae.saes.base import SAE, SparseLatents, check_site


class ReluSAE(SAE):
    """`relu(x @ W - 0.3)`: many zeros, a count of non-zero latents that varies by vector;
    records the number of vectors of every `encode` call."""

    def __init__(self, d_in: int = 4, d_sae: int = 6) -> None:
        super().__init__(d_in, d_sae, layer=1, site="resid_pre")
        self.W = torch.randn(d_in, d_sae, generator=torch.Generator().manual_seed(0))
        self.calls: list[int] = []

    def encode(self, x):
        self.calls.append(x.reshape(-1, self.d_in).shape[0])
        return (x @ self.W - 0.3).relu()

    def decode(self, acts):
        return acts @ self.W.T


def sparse_of(dense: torch.Tensor) -> SparseLatents:
    """The sparse form of `dense`, built vector by vector."""
    rows = dense.reshape(-1, dense.shape[-1])
    values, indices, offsets = [], [], [0]
    for row in rows:
        latents = [i for i in range(row.numel()) if row[i] != 0]
        values += [row[i].item() for i in latents]
        indices += latents
        offsets.append(offsets[-1] + len(latents))
    return SparseLatents(
        torch.tensor(values),
        torch.tensor(indices, dtype=torch.long),
        torch.tensor(offsets),
        dense.shape,
    )


def test_to_dense_round_trip():
    dense = torch.randn(2, 3, 5).relu()
    dense[0, 1] = 0  # a vector with no active latent
    sparse = sparse_of(dense)
    assert torch.equal(sparse.to_dense(), dense)


def test_encode_sparse_is_encode_vector_by_vector():
    sae = ReluSAE()
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1))
    sparse = sae.encode_sparse(x)
    expected = sparse_of(sae.encode(x))
    assert sparse.shape == (2, 5, 6)
    assert torch.equal(sparse.offsets, expected.offsets)
    assert torch.equal(sparse.indices, expected.indices)
    assert torch.equal(sparse.values, expected.values)


def test_encode_sparse_encodes_chunks_of_sparse_chunk_vectors(monkeypatch):
    monkeypatch.setattr(base, "SPARSE_CHUNK", 3)
    sae = ReluSAE()
    x = torch.randn(2, 5, 4)
    sparse = sae.encode_sparse(x)
    assert sae.calls == [3, 3, 3, 1]
    assert torch.equal(sparse.to_dense(), sae.encode(x))


@pytest.mark.parametrize("shape", [(0, 4), (2, 0, 4)])
def test_encode_sparse_of_no_vectors(shape):
    sparse = ReluSAE().encode_sparse(torch.randn(shape))
    assert sparse.values.numel() == sparse.indices.numel() == 0
    assert sparse.indices.dtype == torch.long
    assert sparse.offsets.tolist() == [0]
    assert sparse.shape == (*shape[:-1], 6)
    assert sparse.to_dense().shape == (*shape[:-1], 6)


def test_encode_sparse_of_one_vector_without_leading_dims():
    sae = ReluSAE()
    x = torch.randn(4)
    sparse = sae.encode_sparse(x)
    assert sparse.shape == (6,)
    assert torch.equal(sparse.to_dense(), sae.encode(x))


def test_encode_sparse_refuses_vectors_of_another_width():
    # 2 vectors of width 8 would otherwise be read as 4 vectors of width 4.
    with pytest.raises(ValueError, match=r"width 4.*\(2, 8\)"):
        ReluSAE().encode_sparse(torch.randn(2, 8))


def test_sites_are_checked():
    assert check_site(None, "site") is None
    assert check_site("attn_z", "site") == "attn_z"
    with pytest.raises(ValueError, match="output_site: unknown site 'resid'"):
        check_site("resid", "output_site")
    sae = ReluSAE()
    assert not sae.is_transcoder
    assert "layer=1, site=resid_pre" in repr(sae)
