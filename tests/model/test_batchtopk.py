"""BatchTopK (docs/variants.md): the selection against a brute-force sort of the whole batch
(ties and masked vectors included), the capacity, gradients, the threshold's update and
JumpReLU at inference, strict loading of the threshold."""

import pytest
import torch

from mlsae.cli import ConfigError
from mlsae.files import CheckpointError
from mlsae.model.autoencoder import MLSAE
from mlsae.model.firing import StepMinimum
from mlsae.model.losses import mlsae_loss
from mlsae.model.reference import ReferenceSAE
from mlsae.model.variants import batchtopk, capped_vectors, min_positive, resolve_variant
from mlsae.sparse import scatter_topk
from mlsae.types import TopK
from tests.model.test_training import loaders, make_model, trainer

N_INPUTS, N_LATENTS, K = 16, 48, 3


def brute_force(acts: torch.Tensor, k: int, mask: torch.Tensor | None, pool: str) -> torch.Tensor:
    """Which of the dense `[layer, batch, pos, n_latents]` ReLU'd activations BatchTopK
    keeps, by sorting each pool whole (stable: the lower flat index first among ties)."""
    counted = torch.ones(acts.shape[:-1], dtype=torch.bool)
    if mask is not None:
        counted = mask.expand(acts.shape[:-1])
    pools = list(range(acts.shape[0])) if pool == "layer" else [slice(None)]
    keep = torch.zeros_like(acts, dtype=torch.bool)
    for rows in pools:
        scores = acts[rows].relu().masked_fill(~counted[rows][..., None], float("-inf"))
        order = scores.reshape(-1).sort(descending=True, stable=True).indices
        flat = torch.zeros(scores.numel(), dtype=torch.bool)
        flat[order[: k * int(counted[rows].sum())]] = True
        keep[rows] = flat.reshape(scores.shape)
    return keep


def candidates_of(dense: torch.Tensor, capacity: int, seed: int = 0) -> TopK:
    """The top-`capacity` entries of every vector of `dense`, in a shuffled order (so that
    the tie rule cannot lean on the order of a vector's candidates)."""
    values, indices = dense.topk(capacity, dim=-1, sorted=False)
    generator = torch.Generator().manual_seed(seed)
    shuffle = torch.stack(
        [torch.randperm(capacity, generator=generator) for _ in indices[..., 0].reshape(-1)]
    )
    shuffle = shuffle.reshape(indices.shape)
    return TopK(values.gather(-1, shuffle), indices.gather(-1, shuffle))


@pytest.mark.parametrize("pool", ["stack", "layer"])
@pytest.mark.parametrize("ties", [False, True])
def test_the_selection_is_a_sort_of_the_whole_batch(pool, ties):
    generator = torch.Generator().manual_seed(1)
    dense = torch.randn(3, 2, 5, N_LATENTS, generator=generator, dtype=torch.float64)
    if ties:  # few distinct values: ties at the cut, across vectors and within them
        dense = (dense * 2).round() / 2
    mask = torch.rand(2, 5, generator=generator) > 0.3
    mask[0, 0] = False
    selected = batchtopk(candidates_of(dense, N_LATENTS), K, mask, pool, N_LATENTS)
    keep = brute_force(dense, K, mask, pool)
    kept = scatter_topk(selected, N_LATENTS)
    assert torch.equal(kept != 0, keep & (dense > 0))
    torch.testing.assert_close(kept, dense.relu() * keep, rtol=0, atol=0)
    # Exactly k per vector on average over each pool's vectors that count (zeros included).
    n_kept = int(keep.sum())
    assert n_kept == K * int(mask.sum()) * 3
    assert not kept[:, ~mask].any()


def test_ties_at_the_cut_keep_the_lower_vector_then_the_lower_latent():
    dense = torch.zeros(1, 1, 3, 6, dtype=torch.float64)
    dense[..., 0, :] = torch.tensor([5.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    dense[..., 1, :] = torch.tensor([1.0, 1.0, 0.0, 0.0, 4.0, 0.0])
    dense[..., 2, :] = torch.tensor([1.0, 0.0, 0.0, 3.0, 0.0, 0.0])
    selected = batchtopk(candidates_of(dense, 6, seed=3), 2, None, "stack", 6)
    kept = scatter_topk(selected, 6)[0, 0] != 0
    # 6 to keep: 5, 4, 3, then three of the five 1s: vector 0's two, then vector 1's latent 0.
    expected = torch.zeros(3, 6, dtype=torch.bool)
    expected[0, :3] = expected[1, 0] = expected[1, 4] = expected[2, 3] = True
    assert torch.equal(kept, expected)


def test_a_binding_capacity_is_counted_and_exact_otherwise():
    dense = torch.rand(1, 1, 4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense[..., 0, :] += 10  # vector 0 would keep 8 of the 8 with an unbounded capacity
    keep = brute_force(dense, 2, None, "stack")
    assert int(keep[..., 0, :].sum()) == 8
    selected = batchtopk(candidates_of(dense, 3), 2, None, "stack", 12)
    kept = scatter_topk(selected, 12) != 0
    assert int(kept.sum()) == 8  # still k * n_vectors, the others take up the slack
    assert int(kept[..., 0, :].sum()) == 3
    capped, counted = capped_vectors(selected.values, 12)
    assert (int(capped), int(counted)) == (1, 4)
    # With room enough for every vector, nothing is capped and the selection is the sort's.
    selected = batchtopk(candidates_of(dense, 9), 2, None, "stack", 12)
    assert int(capped_vectors(selected.values, 12)[0]) == 0
    assert torch.equal(scatter_topk(selected, 12) != 0, keep)


def test_the_gradient_of_dropped_entries_is_zero():
    values = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    indices = torch.arange(8).expand(2, 3, 8)
    selected = batchtopk(TopK(values, indices), 2, None, "stack", 8)
    weights = torch.randn(2, 3, 8, dtype=torch.float64)
    (selected.values * weights).sum().backward()
    kept = selected.values > 0
    assert torch.equal(values.grad[~kept], torch.zeros_like(values.grad[~kept]))
    torch.testing.assert_close(values.grad[kept], weights[kept])


def mlsae(**options) -> MLSAE:
    torch.manual_seed(0)
    return MLSAE(N_INPUTS, N_LATENTS, K, auxk=8, **options).double()


@pytest.mark.parametrize("pool", ["stack", "layer"])
def test_loss_and_gradients_match_the_dense_reference(pool):
    model = mlsae(architecture="batchtopk", batchtopk_capacity=N_LATENTS, batchtopk_pool=pool)
    model.tokens_since_fired[:10] = model.dead_tokens_threshold  # some dead latents
    reference = ReferenceSAE.from_mlsae(model)
    x = torch.randn(3, 2, 5, N_INPUTS, dtype=torch.float64)
    mask = torch.rand(2, 5) > 0.2
    loss = mlsae_loss(x, model.forward_standardized(x, mask), mask, 1 / 32).total
    expected = reference.loss(x, model.dead_mask, 1 / 32, mask)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(model.encoder.weight.grad, reference.encoder.grad)
    torch.testing.assert_close(model.decoder.weight.grad, reference.decoder.grad)
    torch.testing.assert_close(model.pre_encoder_bias.grad, reference.pre_encoder_bias.grad)


def test_the_default_capacity_and_its_checks():
    assert resolve_variant("batchtopk", 3, 48).capacity == 12
    assert resolve_variant("batchtopk", 20, 48).capacity == 48
    assert resolve_variant("topk", 3, 48).capacity == 3
    with pytest.raises(ConfigError, match="at least k"):
        resolve_variant("batchtopk", 3, 48, capacity=2)
    with pytest.raises(ConfigError, match="must not exceed n_latents"):
        resolve_variant("batchtopk", 3, 48, capacity=49)
    with pytest.raises(ConfigError, match="--batchtopk_pool must be one of"):
        resolve_variant("batchtopk", 3, 48, pool="batch")
    with pytest.raises(ConfigError, match="apply to --architecture batchtopk"):
        resolve_variant("topk", 3, 48, capacity=8)
    with pytest.raises(ConfigError, match="--architecture must be one of"):
        resolve_variant("jumprelu", 3, 48)


def test_the_threshold_moves_once_per_step_by_the_steps_minimum():
    model = mlsae(architecture="batchtopk")
    step = StepMinimum()
    for minimum in (0.5, 0.2, 0.7):  # three micro-batches: one minimum
        step.add(torch.tensor(minimum, dtype=torch.float64))
    step.apply(model, torch.tensor(False), lambda t: t)
    assert model.batchtopk_threshold.dtype == torch.float64
    assert model.batchtopk_threshold.item() == pytest.approx(0.01 * 0.2, rel=1e-15)
    step.add(torch.tensor(0.4, dtype=torch.float64))
    step.apply(model, torch.tensor(False), lambda t: t)
    assert model.batchtopk_threshold.item() == pytest.approx(0.99 * 0.002 + 0.01 * 0.4)
    before = model.batchtopk_threshold.clone()
    step.add(torch.tensor(9.0, dtype=torch.float64))
    step.apply(model, torch.tensor(True), lambda t: t)  # a skipped step
    step.add(min_positive(torch.zeros(4, 3)))  # nothing positive: +inf
    step.apply(model, torch.tensor(False), lambda t: t)
    assert torch.equal(model.batchtopk_threshold, before)


def test_training_updates_the_threshold_with_the_minimum_over_micro_batches():
    model = make_model(architecture="batchtopk", accumulate_grad_batches=3)
    train, _ = loaders(model, 6)
    seen = []
    add = model.step_minimum.add
    training = []

    def record(value):
        seen.append(value.item())
        training.append(model.autoencoder.training)  # selecting by BatchTopK, not JumpReLU
        add(value)

    model.step_minimum.add = record
    trainer(2, accumulate_grad_batches=3).fit(model, train)
    assert len(seen) == 6 and all(0 < m < float("inf") for m in seen) and all(training)
    first = 0.01 * min(seen[:3])
    expected = 0.99 * first + 0.01 * min(seen[3:])
    assert model.autoencoder.batchtopk_threshold.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("capacity", [None, N_LATENTS])
def test_inference_is_jumprelu_at_the_threshold(capacity):
    model = mlsae(architecture="batchtopk", batchtopk_capacity=capacity).eval()
    x = torch.randn(2, 4, 6, N_INPUTS, dtype=torch.float64)
    with torch.no_grad():
        dense = ReferenceSAE.from_mlsae(model)(x).values  # JumpReLU at 0: every positive
        threshold = dense[dense > 0].quantile(0.9).item()
        model.batchtopk_threshold.fill_(threshold)
        reference = ReferenceSAE.from_mlsae(model)
        expected = reference(x)
        encoded = model.encode(x)
        output = model(x)
    assert encoded.topk.values.shape[-1] == model.variant.capacity
    assert int(capped_vectors(encoded.topk.values, N_LATENTS)[0]) == 0
    kept = scatter_topk(encoded.topk, N_LATENTS)
    assert torch.equal(kept != 0, expected.values != 0)
    torch.testing.assert_close(kept, expected.values)
    torch.testing.assert_close(output.recons, expected.recons)


@pytest.mark.parametrize("quantile", [0.0, 0.5])
def test_inference_looks_past_the_capacity_when_more_latents_pass(quantile):
    """A low threshold lets more latents through than the capacity holds candidates: the
    selection is taken again with more entries, so it is still exactly JumpReLU."""
    model = mlsae(architecture="batchtopk", batchtopk_capacity=K).eval()
    x = torch.randn(2, 4, 6, N_INPUTS, dtype=torch.float64)
    with torch.no_grad():
        dense = ReferenceSAE.from_mlsae(model)(x).values
        model.batchtopk_threshold.fill_(dense[dense > 0].quantile(quantile).item())
        expected = ReferenceSAE.from_mlsae(model)(x)
        encoded = model.encode(x)
        output = model(x)
    assert (expected.values > 0).sum(-1).max() > model.variant.capacity
    assert encoded.topk.values.shape[-1] > model.variant.capacity
    torch.testing.assert_close(scatter_topk(encoded.topk, N_LATENTS), expected.values)
    # The sparse decode accumulates in float32, the reference in float64.
    torch.testing.assert_close(output.recons, expected.recons, rtol=1e-5, atol=1e-5)


def test_the_threshold_is_saved_and_loaded_strictly(tmp_path):
    model = mlsae(architecture="batchtopk").float()
    model.batchtopk_threshold.fill_(0.25)
    model.save_pretrained(tmp_path / "batchtopk")
    loaded = MLSAE.from_pretrained(tmp_path / "batchtopk")
    assert loaded.architecture == "batchtopk"
    assert loaded.batchtopk_threshold.dtype == torch.float64
    assert loaded.batchtopk_threshold.item() == 0.25
    topk = mlsae().float()
    assert "batchtopk_threshold" not in topk.state_dict()
    topk.save_pretrained(tmp_path / "topk")
    config = (tmp_path / "topk" / "config.json").read_text()
    assert "architecture" not in config and "batchtopk" not in config
    # A TopK model does not take a threshold, a BatchTopK model needs one.
    (tmp_path / "topk" / "model.safetensors").replace(tmp_path / "swap")
    (tmp_path / "batchtopk" / "model.safetensors").replace(tmp_path / "topk" / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensors: batchtopk_threshold"):
        MLSAE.from_pretrained(tmp_path / "topk")
    (tmp_path / "swap").replace(tmp_path / "batchtopk" / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors: batchtopk_threshold"):
        MLSAE.from_pretrained(tmp_path / "batchtopk")


@pytest.mark.parametrize("backend", [None, "native", "fused", "sparse", "dense"])
@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
def test_every_backend_equals_the_dense_reference(backend, architecture):
    """Each backend's loss and gradients (float32, default capacity) against the reference."""
    torch.manual_seed(0)
    widths = [64] if architecture == "matryoshka" else None
    model = MLSAE(16, 256, 4, auxk=8, dead_tokens_threshold=10, architecture=architecture,
                  matryoshka_widths=widths)  # fmt: skip
    model.backend = backend
    model.update_dead_latents(torch.arange(256) % 2, 10)  # odd latents stay live
    x = torch.randn(2, 3, 5, 16)
    mask = torch.rand(3, 5) > 0.3
    result = model.forward_standardized(x, mask)
    assert int(capped_vectors(result.output.topk.values, 256, mask)[0]) == 0
    reference = ReferenceSAE.from_mlsae(model)
    expected = reference.loss(x, model.dead_mask, 1 / 32, mask)
    expected.backward()
    loss = mlsae_loss(x, result, mask, 1 / 32)
    loss.total.backward()
    torch.testing.assert_close(loss.total, expected.detach(), rtol=1e-5, atol=1e-6)
    for name, ours, theirs in [
        ("encoder", model.encoder.weight.grad, reference.encoder.grad),
        ("decoder", model.decoder.weight.grad, reference.decoder.grad),
        ("bias", model.pre_encoder_bias.grad, reference.pre_encoder_bias.grad),
    ]:
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=name)


def test_a_cast_of_the_model_keeps_the_threshold_in_float64():
    model = mlsae(architecture="batchtopk")
    model.batchtopk_threshold.fill_(0.1234567890123)
    model = model.half().bfloat16().float()
    assert model.batchtopk_threshold.dtype == torch.float64
    assert model.batchtopk_threshold.item() == 0.1234567890123
    assert model.encoder.weight.dtype == torch.float32
