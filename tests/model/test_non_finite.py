"""NaN/inf in the residual stream or the loss: the step is skipped on the device and reported
later."""

import logging

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from mlsae.model.non_finite import NonFiniteError, NonFiniteTracker
from tests.model.test_training import loaders, make_model, trainer


def poison_call(model, call_index: int, layer_position: int):
    """Make the residual stream of one micro-batch hold a NaN at one layer."""
    original = model.transformer.residual_stream
    calls = {"n": 0}

    def poisoned(tokens):
        stream = original(tokens)
        calls["n"] += 1
        if calls["n"] == call_index:
            stream = stream.clone()
            stream[layer_position, 0, 3, 5] = float("nan")
        return stream

    model.transformer.residual_stream = poisoned


def test_non_finite_input_stops_with_layer_and_step():
    model = make_model(layers=[2, 0, 3])
    train, _ = loaders(model, 6)
    poison_call(model, 3, layer_position=1)  # the third micro-batch, block 0
    with pytest.raises(NonFiniteError, match=r"layer\(s\) \[0\] at optimizer step 2"):
        trainer(6, log_every_n_steps=1).fit(model, train)


def fit_on(model, batches, **kwargs) -> None:
    """Fit `model` on exactly `batches`, one optimizer step each."""
    trainer(len(batches), **kwargs).fit(model, DataLoader(batches, batch_size=None))


def same_model_twice(**overrides):
    """Two identically initialised models and three training batches."""
    torch.manual_seed(0)
    first = make_model(**overrides)
    torch.manual_seed(0)
    second = make_model(**overrides)
    batches = list(loaders(first, 3)[0])
    return first, second, batches


class Snapshots(Callback):
    """The autoencoder's state after each optimizer step, by batch index."""

    def __init__(self) -> None:
        self.states = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = pl_module.autoencoder.state_dict()
        self.states[batch_idx] = {k: v.detach().clone() for k, v in state.items()}


def assert_step_skipped(snapshots: Snapshots, step: int) -> None:
    """Only the decoder's renormalisation touched the weights in `step`; the next step
    trained again."""
    before, after = snapshots.states[step - 1], snapshots.states[step]
    renormalised = before["decoder.weight"] / before["decoder.weight"].norm(dim=0)
    torch.testing.assert_close(after["decoder.weight"], renormalised)
    for name in ("encoder.weight", "pre_encoder_bias", "tokens_since_fired"):
        assert torch.equal(after[name], before[name]), name
    assert not torch.equal(snapshots.states[step + 1]["encoder.weight"], after["encoder.weight"])


def assert_ends_like_the_run_without_that_batch(model, clean, clean_snapshots) -> None:
    """`model`, which skipped its second of three steps, ends where `clean`, trained on the
    first and third batches only, does: Adam's state skipped the step too.

    The skipped step renormalised the decoder once more, and Adam turns that rounding into
    small differences, so the weights are compared relative to the clean run's last step
    (applying the poisoned step instead moves them by more than that step)."""
    state, expected = model.autoencoder.state_dict(), clean.autoencoder.state_dict()
    assert torch.equal(state["tokens_since_fired"], expected["tokens_since_fired"])
    before_last = clean_snapshots.states[0]
    for name in ("encoder.weight", "decoder.weight", "pre_encoder_bias"):
        last_step = (expected[name] - before_last[name]).norm()
        assert (state[name] - expected[name]).norm() < 0.05 * last_step, name


def non_finite_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "non-finite" in record.message]


def test_skip_non_finite_skips_exactly_that_step(caplog):
    """A step with a NaN in the residual stream is skipped as if its batch were absent,
    with one warning naming the layer and the step."""
    poisoned, clean, batches = same_model_twice(skip_non_finite=True)
    snapshots, clean_snapshots = Snapshots(), Snapshots()
    poison_call(poisoned, 2, layer_position=0)
    with caplog.at_level(logging.WARNING):
        fit_on(poisoned, batches, callbacks=[snapshots], log_every_n_steps=1)
    fit_on(clean, [batches[0], batches[2]], callbacks=[clean_snapshots])
    assert_step_skipped(snapshots, 1)
    assert torch.isfinite(poisoned.autoencoder.encoder.weight).all()
    assert_ends_like_the_run_without_that_batch(poisoned, clean, clean_snapshots)
    assert non_finite_warnings(caplog) == [
        "non-finite values (NaN or inf) in the residual stream of layer(s) [0] at optimizer "
        "step 1; skipped 1 step(s) so far"
    ]


class PoisonBias(Callback):
    """Make the pre-encoder bias NaN for the forward and backward of one optimizer step,
    then restore it: that step's loss is NaN while its residual stream is finite."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.saved = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            bias = pl_module.autoencoder.pre_encoder_bias
            self.saved = bias.detach().clone()
            with torch.no_grad():
                bias[0] = float("nan")

    def on_after_backward(self, trainer, pl_module):
        if self.saved is not None:
            with torch.no_grad():
                pl_module.autoencoder.pre_encoder_bias.copy_(self.saved)
            self.saved = None


def test_non_finite_loss_stops_the_run_naming_the_loss():
    """A NaN loss from finite inputs stops the run with an error naming the loss and step."""
    model = make_model()
    train, _ = loaders(model, 4)
    with pytest.raises(NonFiniteError, match=r"in the loss at optimizer step 1;"):
        trainer(4, callbacks=[PoisonBias(1)], log_every_n_steps=1).fit(model, train)


def test_skip_non_finite_skips_a_step_whose_loss_is_not_finite(caplog):
    """With `skip_non_finite`, a NaN loss from finite inputs skips its step (as if its batch
    were absent) and warns once, naming the loss and the step."""
    poisoned, clean, batches = same_model_twice(skip_non_finite=True)
    snapshots, clean_snapshots = Snapshots(), Snapshots()
    with caplog.at_level(logging.WARNING):
        fit_on(poisoned, batches, callbacks=[PoisonBias(1), snapshots], log_every_n_steps=1)
    fit_on(clean, [batches[0], batches[2]], callbacks=[clean_snapshots])
    assert_step_skipped(snapshots, 1)
    assert_ends_like_the_run_without_that_batch(poisoned, clean, clean_snapshots)
    assert non_finite_warnings(caplog) == [
        "non-finite values (NaN or inf) in the loss at optimizer step 1; skipped 1 step(s) so far"
    ]


def test_tracker_reports_only_when_asked():
    tracker = NonFiniteTracker([4, 7])
    x = torch.zeros(2, 1, 3, 2)
    x[1, 0, 0, 0] = float("inf")
    cleaned, finite = tracker.sanitize(x)
    assert finite.tolist() == [True, False] and torch.isfinite(cleaned).all()
    assert bool(tracker.end_step(5))
    assert not bool(tracker.end_step(6))
    assert "layer(s) [7] at optimizer step 5" in tracker.report(skip=True)
    with pytest.raises(NonFiniteError):
        tracker.report(skip=False)


def test_non_finite_loss_is_flagged():
    tracker = NonFiniteTracker([0])
    tracker.sanitize(torch.zeros(1, 1, 1, 1))
    tracker.observe_loss(torch.tensor(float("nan")))
    assert bool(tracker.end_step(0))
    assert "the loss" in tracker.report(skip=True)
