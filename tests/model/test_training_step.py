"""The training step against a dense reference written here: its losses, firing counts and
pre-encoder bias initialisation, on batches with special tokens at known positions."""

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from tests.model.test_training import make_model, trainer

N_BATCHES = 2
EPS = 1e-5  # the standardisation's


def batches_with_special_tokens(model, seed: int = 0):
    """Ordinary random tokens with the tokenizer's EOS at known positions (the first of every
    sequence and about a quarter of the others); returns the batches and the EOS masks."""
    tokenizer = model.transformer.tokenizer
    special_ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special_ids])
    generator = torch.Generator().manual_seed(seed)
    batches, masks = [], []
    for _ in range(N_BATCHES):
        tokens = ordinary[torch.randint(len(ordinary), (4, 32), generator=generator)]
        special = torch.rand(4, 32, generator=generator) < 0.25
        special[:, 0] = True
        tokens[special] = tokenizer.eos_token_id
        batches.append({"input_ids": tokens})
        masks.append(special)
    return batches, masks


def block_outputs(model, tokens: torch.Tensor) -> torch.Tensor:
    """`[layer, batch, pos, d_model]` float64: the selected GPT-NeoX blocks' outputs, by hooks."""
    blocks = model.transformer.model.gpt_neox.layers
    captured = {}

    def capture(index):
        def hook(module, args, output):
            captured[index] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [blocks[index].register_forward_hook(capture(index)) for index in model.layers]
    try:
        with torch.no_grad():
            model.transformer.model(input_ids=tokens)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([captured[index] for index in model.layers]).double()


def standardize_vectors(x: torch.Tensor, on: bool = True):
    """Per vector: mean 0 and unbiased std 1 (plus EPS), with the statistics to undo it;
    unchanged (mean 0, std 1) when not `on`."""
    if not on:
        return x, torch.zeros_like(x[..., :1]), torch.ones_like(x[..., :1])
    mean = x.mean(-1, keepdim=True)
    std = (x - mean).std(-1, keepdim=True)
    return (x - mean) / (std + EPS), mean, std


def dense_step(model, state, tokens, special):
    """The training step's tensors, by dense float64 maths on the weights it used."""
    bias = state["pre_encoder_bias"].double()
    encoder, decoder = state["encoder.weight"].double(), state["decoder.weight"].double()
    inputs = block_outputs(model, tokens).masked_fill(special[None, :, :, None], 0.0)
    inputs_std, mean, std = standardize_vectors(inputs, model.standardize)
    pre = (inputs_std - bias) @ encoder.T
    values, indices = pre.topk(model.k, dim=-1)
    values = values.relu()
    recons_std = torch.zeros_like(pre).scatter(-1, indices, values) @ decoder.T + bias
    dead = state["tokens_since_fired"] >= model.dead_tokens_threshold
    n_aux = min(model.auxk, int(dead.sum()))
    aux_values, aux_indices = pre.masked_fill(~dead, float("-inf")).topk(n_aux, dim=-1)
    aux_latents = torch.zeros_like(pre).scatter(-1, aux_indices, aux_values.relu())
    return {
        "inputs": inputs,
        "recons": recons_std * std + mean,
        "error": inputs_std - recons_std,
        "auxk_recons": aux_latents @ decoder.T,
        "values": values,
        "indices": indices,
        "n_dead": n_aux,
    }


def fvu(inputs, recons, counts) -> float:
    """Mean over layers of MSE / unbiased variance, over the positions that count."""
    ratios = [
        (r[counts] - x[counts]).pow(2).mean() / x[counts].flatten().var()
        for x, r in zip(inputs, recons, strict=True)
    ]
    return torch.stack(ratios).mean().item()


def auxk(error, auxk_recons, counts) -> float:
    """Mean over layers of AuxK's squared error over the variance of the main error."""
    ratios = []
    for e, a in zip(error, auxk_recons, strict=True):
        e, a = e[counts], a[counts]
        ratios.append((a - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum())
    return torch.stack(ratios).mean().item()


def fired_counts(values, indices, counts, threshold, n_latents) -> torch.Tensor:
    """Per latent: how many of the vectors that count selected it with a value over threshold."""
    fired = values[:, counts] > threshold
    return torch.bincount(indices[:, counts][fired], minlength=n_latents)


def weiszfeld(points: torch.Tensor, iterations: int = 10_000) -> torch.Tensor:
    """The geometric median of `[n, d]` points in float64, to convergence."""
    points = points.double()
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=1).clamp_min(1e-12)
        step = (weights[:, None] * points).sum(0) / weights.sum()
        if (step - median).norm() < 1e-10:
            return step
        median = step
    return median


class StepRecorder(Callback):
    """The autoencoder's state as each step's forward used it, what the step logged, and
    the firing counts it passed to `update_dead_latents`."""

    def __init__(self, model) -> None:
        self.states, self.logged, self.updates = [], [], []
        update = model.autoencoder.update_dead_latents

        def record(fired, n_tokens):
            self.updates.append((fired.clone(), int(n_tokens)))
            update(fired, n_tokens)

        model.autoencoder.update_dead_latents = record

    def on_after_backward(self, trainer, pl_module):
        state = pl_module.autoencoder.state_dict()
        self.states.append({name: value.detach().clone() for name, value in state.items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        names = ("loss/total", "loss/mse", "loss/auxk")
        self.logged.append({name: trainer.callback_metrics[name].item() for name in names})


def fit_on_special_batches(count_special_tokens: bool, standardize: bool):
    """Two steps, half the latents dead from the start (so AuxK runs in both)."""
    torch.manual_seed(0)
    model = make_model(count_special_tokens=count_special_tokens, standardize=standardize)
    n_latents = model.n_latents
    model.autoencoder.update_dead_latents(torch.arange(n_latents) % 2, model.dead_tokens_threshold)
    batches, specials = batches_with_special_tokens(model)
    recorder = StepRecorder(model)
    trainer(N_BATCHES, callbacks=[recorder]).fit(model, DataLoader(batches, batch_size=None))
    return model, batches, specials, recorder


# Standardised, a zeroed special position is reconstructed exactly (its std is 0), so it
# changes the FVU only through its count; unstandardised, it has an error of its own.
SETTINGS = [(False, True), (True, True), (False, False)]
SETTING_IDS = ["standardized", "count_special_tokens", "unstandardized"]


@pytest.mark.parametrize(("count_special_tokens", "standardize"), SETTINGS, ids=SETTING_IDS)
def test_losses_and_firing_counts_leave_out_special_positions(count_special_tokens, standardize):
    """FVU, AuxK and the dead-latent firing counts of a step cover only the positions that
    count: not the special tokens' unless `count_special_tokens`."""
    model, batches, specials, recorder = fit_on_special_batches(count_special_tokens, standardize)
    assert len(recorder.states) == len(recorder.updates) == N_BATCHES
    for step, (batch, special) in enumerate(zip(batches, specials, strict=True)):
        counts = torch.ones_like(special) if count_special_tokens else ~special
        ref = dense_step(model, recorder.states[step], batch["input_ids"], special)
        assert ref["n_dead"] > 0
        expected_fvu = fvu(ref["inputs"], ref["recons"], counts)
        expected_auxk = auxk(ref["error"], ref["auxk_recons"], counts)
        logged = recorder.logged[step]
        assert logged["loss/mse"] == pytest.approx(expected_fvu, rel=1e-5), step
        assert logged["loss/auxk"] == pytest.approx(expected_auxk, rel=1e-5), step
        total = expected_fvu + model.auxk_coef * expected_auxk
        assert logged["loss/total"] == pytest.approx(total, rel=1e-5), step
        fired, n_tokens = recorder.updates[step]
        expected = fired_counts(
            ref["values"], ref["indices"], counts, model.dead_threshold, model.n_latents
        )
        assert n_tokens == int(counts.sum())
        assert torch.equal(fired, expected), step


@pytest.mark.parametrize(("count_special_tokens", "standardize"), SETTINGS, ids=SETTING_IDS)
def test_pre_encoder_bias_starts_at_the_geometric_median_of_standardised_inputs(
    count_special_tokens, standardize
):
    """The first step sets the bias to the geometric median of the inputs of every layer,
    standardised (where the model standardises), over the positions that count."""
    model, batches, specials, recorder = fit_on_special_batches(count_special_tokens, standardize)
    special = specials[0]
    counts = torch.ones_like(special) if count_special_tokens else ~special
    inputs = block_outputs(model, batches[0]["input_ids"]).masked_fill(special[..., None], 0.0)
    inputs_std, _, _ = standardize_vectors(inputs, standardize)
    expected = weiszfeld(inputs_std[:, counts].reshape(-1, model.n_inputs))
    bias = recorder.states[0]["pre_encoder_bias"].double()
    torch.testing.assert_close(bias, expected, rtol=0, atol=1e-4)
