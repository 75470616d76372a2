"""The training step's fast paths against their plain references: `fast_topk` (native
kernel and torch ops) against `torch.topk`, `maintain_decoder` against the two
maintenance functions, the encoder's bias gradient and `sparse_transpose_product`
against dense autograd, the column-sliced `bag_sum` against one `embedding_bag`, and the
decode's cached latent-major copy against fresh decodes."""

import pytest
import torch
import torch.nn.functional as F

from mlsae.model.maintenance import maintain_decoder, unit_norm_decoder, unit_norm_decoder_gradient
from mlsae.sparse import encoder, gather
from mlsae.sparse.decoder import decode
from mlsae.sparse.encoder import select_latents, topk_encode
from mlsae.sparse.latent_order import LatentOrder, sparse_transpose_product
from mlsae.sparse.layout import latent_major_linear
from mlsae.sparse.topk import fast_topk
from mlsae.sparse.tuning import TUNING
from mlsae.types import TopK


def _sorted(indices: torch.Tensor) -> torch.Tensor:
    return indices.sort(dim=-1).values


@pytest.fixture(params=["native", "torch"])
def use_native(request) -> bool:
    """`fast_topk` by the native kernel, then by its torch ops."""
    return request.param == "native"


@pytest.mark.parametrize(
    ("n", "k"), [(8192, 32), (4096, 256), (1024, 8), (1000, 5), (64, 16), (48, 3), (128, 0)]
)
def test_fast_topk_selects_the_same_latents_as_torch_topk(n, k, use_native):
    generator = torch.Generator().manual_seed(n + k)
    x = torch.randn(37, n, generator=generator)
    values, indices = fast_topk(x, k, use_native)
    ref_values, ref_indices = x.topk(k, dim=-1, sorted=False)
    assert torch.equal(_sorted(indices), _sorted(ref_indices))
    assert torch.equal(values.sort(dim=-1).values, ref_values.sort(dim=-1).values)
    assert torch.equal(x.gather(1, indices), values)


def test_fast_topk_on_a_column_slice_and_with_clustered_maxima(use_native):
    x = torch.randn(9, 8192)
    # The largest values all in one interleaved block: the blocks' bound must still hold.
    x[:, 5::512] += 100.0
    x[:, 7] += 50.0
    for view in (x, x[:, 4096:]):
        values, indices = fast_topk(view, 24, use_native)
        assert torch.equal(_sorted(indices), _sorted(view.topk(24, dim=-1).indices))
        assert torch.equal(view.gather(1, indices), values)


def test_fast_topk_ties_keep_the_selected_values(use_native):
    x = torch.zeros(3, 4096)
    x[:, 100:140] = 1.0
    values, indices = fast_topk(x, 32, use_native)
    assert torch.equal(values, torch.ones(3, 32))
    assert ((indices >= 100) & (indices < 140)).all()
    assert all(row.unique().numel() == 32 for row in indices)


def _maintain_like_the_two_functions(decoder: torch.nn.Linear) -> None:
    """`maintain_decoder(decoder)`, checked against `unit_norm_decoder` followed by
    `unit_norm_decoder_gradient` on a plain copy."""
    plain = torch.nn.Linear(decoder.in_features, decoder.out_features, bias=False)
    plain.weight.data.copy_(decoder.weight.data)
    plain.weight.grad = decoder.weight.grad.contiguous()
    maintain_decoder(decoder)
    unit_norm_decoder(plain)
    unit_norm_decoder_gradient(plain)
    torch.testing.assert_close(decoder.weight, plain.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(decoder.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-6)


def test_maintain_decoder_equals_the_two_functions():
    torch.manual_seed(0)
    fused = torch.nn.Linear(300, 48, bias=False)
    fused.weight.data.mul_(3.0)
    fused.weight.grad = torch.randn(48, 300)
    _maintain_like_the_two_functions(fused)


def test_maintain_decoder_needs_a_gradient():
    with pytest.raises(ValueError, match="gradient"):
        maintain_decoder(torch.nn.Linear(8, 4, bias=False))


@pytest.mark.parametrize("inputs_grad", [False, True])
def test_encoder_bias_gradient_matches_dense_autograd(inputs_grad):
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(11, 9, generator=generator, dtype=torch.float64)
    weight = torch.randn(40, 9, generator=generator, dtype=torch.float64)
    bias = torch.randn(9, generator=generator, dtype=torch.float64)
    dead = torch.tensor([2, 3, 17, 30, 31, 39])

    x1 = inputs.clone().requires_grad_(inputs_grad)
    w1, b1 = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    topk, aux = topk_encode(x1, w1, 4, 3, dead, bias=b1)
    x2 = inputs.clone().requires_grad_(inputs_grad)
    w2, b2 = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    pre = (x2 - b2) @ w2.T
    is_dead = torch.zeros(40, dtype=torch.bool)
    is_dead[dead] = True
    ref_top = pre.gather(1, topk.indices)
    ref_aux = pre.gather(1, aux.indices)
    assert torch.equal(_sorted(topk.indices), _sorted(pre.topk(4, dim=-1).indices))
    masked = pre.masked_fill(~is_dead, float("-inf"))
    assert torch.equal(_sorted(aux.indices), _sorted(masked.topk(3, dim=-1).indices))

    scale_top = torch.linspace(-1, 2, 4, dtype=torch.float64)
    scale_aux = torch.linspace(3, -2, 3, dtype=torch.float64)
    ((topk.values * scale_top).sum() + (aux.values * scale_aux).sum()).backward()
    ((ref_top * scale_top).sum() + (ref_aux * scale_aux).sum()).backward()
    torch.testing.assert_close(b1.grad, b2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)
    if inputs_grad:
        torch.testing.assert_close(x1.grad, x2.grad)


def test_sparse_transpose_product_matches_dense():
    generator = torch.Generator().manual_seed(5)
    grad_out = torch.randn(13, 6, generator=generator, dtype=torch.float64)
    values = torch.randn(13, 4, generator=generator, dtype=torch.float64)
    indices = torch.stack([torch.randperm(20, generator=generator)[:4] for _ in range(13)])
    dense = torch.zeros(13, 20, dtype=torch.float64).scatter(1, indices, values)
    torch.testing.assert_close(
        sparse_transpose_product(grad_out, values, indices, 20), dense.T @ grad_out
    )


def test_decode_reuses_the_latent_major_copy_only_for_the_same_weight_version():
    """Decodes of one (not latent-major) weight share its latent-major copy; an in-place
    update of the weight makes the next decode see the new values, even while earlier
    decodes' graphs, which hold the cached copy, are alive."""
    torch.manual_seed(0)
    weight = torch.randn(16, 256, requires_grad=True)  # row-major: decode copies it
    values = torch.rand(5, 8, requires_grad=True)
    indices = torch.stack([torch.randperm(256)[:8] for _ in range(5)])
    dense = torch.zeros(5, 256).scatter(1, indices, values.detach())
    first = decode(TopK(values, indices), weight, "embedding_bag")
    torch.testing.assert_close(first, dense @ weight.detach().T)
    second = decode(TopK(values * 2, indices), weight, "embedding_bag")
    torch.testing.assert_close(second, 2 * first)
    with torch.no_grad():
        weight.mul_(3.0)  # a new version, while both graphs hold the copy: the cache must miss
    third = decode(TopK(values, indices), weight, "embedding_bag")
    torch.testing.assert_close(third, 3 * first)
    (first.sum() + second.sum() + third.sum()).backward()
    torch.testing.assert_close(weight.grad, (4 * dense).sum(0).expand(16, 256))


def test_maintain_decoder_in_column_blocks_and_latent_major(monkeypatch):
    monkeypatch.setattr(TUNING, "column_block", 7)
    torch.manual_seed(1)
    fused = latent_major_linear(50, 12)
    fused.weight.data.mul_(2.5)
    fused.weight.grad = torch.randn(50, 12).t()
    _maintain_like_the_two_functions(fused)
    assert fused.weight.t().is_contiguous() and fused.weight.grad.t().is_contiguous()


@pytest.mark.parametrize(
    ("n_rows", "n_entries", "n_bags", "expected"),
    [
        (4096, 4096 * 3, 100, 512),  # rows barely reused: one gather over all columns
        (4096, 4096 * 64, 100, 64),  # 4096 rows x 64 fp32 columns = the 1 MiB budget
        (1024, 1024 * 64, 100, 256),
        (16, 16 * 64, 100, 512),  # the whole table fits
        (100_000, 100_000 * 8, 100, 64),  # never narrower than min_column_chunk
        (1536, 1536 * 32, 32768, 512),  # mostly empty bags: writing the output dominates
    ],
)
def test_column_chunk_widths(n_rows, n_entries, n_bags, expected):
    assert gather.column_chunk(512, n_rows, n_entries, n_bags) == expected


@pytest.mark.parametrize("with_offsets", [False, True])
def test_bag_sum_in_column_slices_is_identical_to_embedding_bag(monkeypatch, with_offsets):
    monkeypatch.setattr(TUNING, "cache_budget_bytes", 30 * 16 * 4)
    monkeypatch.setattr(TUNING, "min_column_chunk", 16)
    generator = torch.Generator().manual_seed(2)
    wide = torch.randn(30, 100, generator=generator)
    table = wide[:, 10:90]  # unit column stride, row stride 100: a slice
    indices = torch.randint(0, 30, (40, 9), generator=generator)
    weights = torch.randn(40, 9, generator=generator)
    assert gather.column_chunk(80, 30, indices.numel(), 40) == 16
    if with_offsets:
        indices, weights = indices.reshape(-1), weights.reshape(-1)
        offsets = torch.tensor([0, 0, 5, 100, 101, 360])  # empty bags included
    else:
        offsets = None
    expected = F.embedding_bag(
        indices, table.contiguous(), offsets, per_sample_weights=weights, mode="sum"
    )
    assert torch.equal(gather.bag_sum(table, indices, weights, offsets), expected)


def test_latent_order_segment_sums_and_row_dots_match_dense():
    generator = torch.Generator().manual_seed(4)
    indices = torch.stack([torch.randperm(70, generator=generator)[:6] for _ in range(25)])
    values = torch.randn(25, 6, generator=generator, dtype=torch.float64)
    rows = torch.randn(25, 11, generator=generator, dtype=torch.float64)
    table = torch.randn(70, 11, generator=generator, dtype=torch.float64)
    order = LatentOrder(indices, 70)
    assert torch.equal(indices.reshape(-1)[order.order].diff() >= 0, torch.ones(149, dtype=bool))
    dense = torch.zeros(25, 70, dtype=torch.float64).scatter(1, indices, values)
    torch.testing.assert_close(order.segment_sums(rows, values), dense.T @ rows)
    torch.testing.assert_close(
        order.row_dots(rows, table), (table[indices] * rows[:, None]).sum(-1)
    )


@pytest.mark.parametrize("n_latents", [200, 40_000])
def test_latent_order_sorts_on_narrow_keys_stably(n_latents):
    generator = torch.Generator().manual_seed(n_latents)
    indices = torch.randint(0, n_latents, (300, 4), generator=generator)
    indices[:, 0] = n_latents - 1  # the largest latent must survive the narrowing
    order = LatentOrder(indices, n_latents).order
    assert torch.equal(order, torch.sort(indices.reshape(-1), stable=True).indices)


@pytest.mark.parametrize("n_latents", [70, 32_768])
def test_latent_order_keep_leaves_out_the_unmarked_entries(n_latents):
    generator = torch.Generator().manual_seed(5)
    indices = torch.stack([torch.randperm(n_latents, generator=generator)[:6] for _ in range(25)])
    indices[0, 0] = n_latents - 1
    keep = torch.rand(25, 6, generator=generator) < 0.6
    keep[3] = False  # a vector with nothing kept
    values = torch.randn(25, 6, generator=generator, dtype=torch.float64)
    rows = torch.randn(25, 11, generator=generator, dtype=torch.float64)
    table = torch.randn(n_latents, 11, generator=generator, dtype=torch.float64)
    order = LatentOrder(indices, n_latents, keep=keep)
    kept = keep.reshape(-1).nonzero().squeeze(1)
    expected_order = kept[torch.sort(indices.reshape(-1)[kept], stable=True).indices]
    assert torch.equal(order.order, expected_order)
    assert torch.equal(order.latents, indices.reshape(-1)[expected_order])
    assert torch.equal(
        order.offsets.diff(append=torch.tensor([kept.numel()])),
        torch.bincount(indices[keep], minlength=n_latents),
    )
    masked = values * keep
    dense = torch.zeros(25, n_latents, dtype=torch.float64).scatter(1, indices, masked)
    torch.testing.assert_close(order.segment_sums(rows, values), dense.T @ rows)
    expected_dots = (table[indices] * rows[:, None]).sum(-1) * keep
    torch.testing.assert_close(order.row_dots(rows, table), expected_dots)


def test_latent_order_keeping_nothing_is_empty():
    indices = torch.tensor([[1, 2], [0, 2]])
    order = LatentOrder(indices, 3, keep=torch.zeros(2, 2, dtype=torch.bool))
    assert order.order.numel() == 0 and torch.equal(order.offsets, torch.zeros(3, dtype=torch.long))
    rows = torch.randn(2, 4)
    assert torch.equal(order.segment_sums(rows, torch.ones(2, 2)), torch.zeros(3, 4))
    assert torch.equal(order.row_dots(rows, torch.randn(3, 4)), torch.zeros(2, 2))


@pytest.mark.parametrize("backend", ["embedding_bag", "triton"])
@pytest.mark.parametrize("layout", ["latent_major", "column_major"])
def test_decode_gradients_keep_the_weight_layout(layout, backend):
    torch.manual_seed(3)
    weight = torch.randn(300, 24)  # [n_latents, n_inputs]
    weight = weight.t() if layout == "latent_major" else weight.t().contiguous()
    weight.requires_grad_()
    values = torch.rand(9, 5, requires_grad=True)
    indices = torch.stack([torch.randperm(300)[:5] for _ in range(9)])
    grad_out = torch.randn(9, 24)
    decode(TopK(values, indices), weight, backend).backward(grad_out)
    dense = torch.zeros(9, 300).scatter(1, indices, values.detach())
    torch.testing.assert_close(weight.grad, grad_out.T @ dense)
    torch.testing.assert_close(
        values.grad, (weight.detach().T[indices] * grad_out[:, None]).sum(-1)
    )
    if layout == "latent_major":
        assert weight.grad.stride() == weight.stride()


@pytest.mark.parametrize(
    ("n_vectors", "n_dead"),
    [
        (5, 7),  # few dead latents: their pre-activation columns are gathered
        (60, 50),  # many: the encoder's rows are reordered dead-last
        (9, 64),  # all of them
        (8, 4),  # fewer than AuxK's slots: AuxK takes every dead latent, no top-k
    ],
)
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_select_latents_auxk_over_gathered_or_reordered_dead_columns(
    n_vectors, n_dead, chunk_rows, monkeypatch
):
    if chunk_rows:  # the pre-activations a few rows at a time
        monkeypatch.setattr(TUNING, "encode_chunk_bytes", chunk_rows * 64 * 8)
        monkeypatch.setattr(TUNING, "min_encode_chunk_rows", 1)
        assert len(encoder.encode_chunks(n_vectors, 64 * 8, torch.device("cpu"))) > 1
    generator = torch.Generator().manual_seed(n_vectors)
    x = torch.randn(n_vectors, 10, generator=generator, dtype=torch.float64)
    weight = torch.randn(64, 10, generator=generator, dtype=torch.float64)
    dead = torch.randperm(64, generator=generator)[:n_dead].sort().values
    values, indices, auxk_values, auxk_indices = select_latents(x, weight, 4, 6, dead)
    pre = x @ weight.T
    assert torch.equal(_sorted(indices), _sorted(pre.topk(4, dim=-1).indices))
    torch.testing.assert_close(pre.gather(1, indices), values, rtol=1e-14, atol=0)
    masked = torch.full_like(pre, float("-inf"))
    masked[:, dead] = pre[:, dead]
    n_aux = min(6, n_dead)
    assert auxk_indices.shape == (n_vectors, n_aux)
    assert torch.equal(_sorted(auxk_indices), _sorted(masked.topk(n_aux, dim=-1).indices))
    torch.testing.assert_close(pre.gather(1, auxk_indices), auxk_values, rtol=1e-14, atol=0)


@pytest.mark.parametrize("autocast", [False, True])
def test_select_latents_in_chunks_into_one_buffer_equals_the_whole(monkeypatch, autocast):
    """Every latent dead and AuxK wider than them: AuxK keeps each chunk's pre-activations,
    which must survive the next chunk's matmul into the same buffer."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(11, 10, generator=generator)
    weight = torch.randn(64, 10, generator=generator)
    dead = torch.arange(64)
    whole = select_latents(x, weight, 4, 64, dead)
    monkeypatch.setattr(TUNING, "encode_chunk_bytes", 3 * 64 * 4)
    monkeypatch.setattr(TUNING, "min_encode_chunk_rows", 1)
    assert len(encoder.encode_chunks(11, 64 * 4, torch.device("cpu"))) == 4
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        chunked = select_latents(x, weight, 4, 64, dead)
    pre = x @ weight.T
    if autocast:  # the chunks' matmuls ran in bf16, as autocast asks
        assert chunked[2].dtype == torch.bfloat16
        pre_bf16 = x.bfloat16().float() @ weight.bfloat16().float().T
        torch.testing.assert_close(chunked[2], pre_bf16.bfloat16(), atol=1e-2, rtol=1.6e-2)
        return
    values, indices, auxk_values, auxk_indices = chunked
    assert torch.equal(_sorted(indices), _sorted(whole[1]))
    torch.testing.assert_close(values, pre.gather(1, indices))
    torch.testing.assert_close(auxk_values, pre)  # AuxK's values: every pre-activation
    assert torch.equal(auxk_indices, dead.expand(11, 64))


@pytest.mark.parametrize(
    ("n_vectors", "row_bytes"),
    [
        (3072, 8192 * 4),
        (1000, 32768 * 4),
        (1536, 32768 * 4),
        (3072, 24576 * 4),
        (7, 10),
        (5, 2**30),
        (100_000, 10),
    ],
)
def test_encode_chunks_cover_the_rows_within_the_budget(n_vectors, row_bytes):
    chunks = encoder.encode_chunks(n_vectors, row_bytes, torch.device("cpu"))
    assert chunks[0].start == 0 and chunks[-1].stop == n_vectors
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:], strict=False))
    sizes = [c.stop - c.start for c in chunks]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    rows_allowed = max(TUNING.min_encode_chunk_rows, TUNING.encode_chunk_bytes // row_bytes)
    assert max(sizes) <= rows_allowed
    assert len(chunks) == -(-n_vectors // rows_allowed)  # no more chunks than needed
    assert encoder.encode_chunks(n_vectors, row_bytes, torch.device("meta")) == [
        slice(0, n_vectors)
    ]
