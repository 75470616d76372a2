"""NaN/inf in the residual stream: the step is skipped on the device and reported later."""

import pytest
import torch

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


def test_skip_non_finite_skips_exactly_that_step():
    torch.manual_seed(0)
    clean = make_model(skip_non_finite=True)
    torch.manual_seed(0)
    poisoned = make_model(skip_non_finite=True)
    train_clean, _ = loaders(clean, 3)
    train_poisoned, _ = loaders(poisoned, 3)
    snapshots = {}

    class Snapshot(__import__("lightning").pytorch.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots[(id(pl_module), batch_idx)] = {
                k: v.detach().clone() for k, v in pl_module.autoencoder.state_dict().items()
            }

    trainer(3, callbacks=[Snapshot()]).fit(clean, train_clean)
    poison_call(poisoned, 2, layer_position=0)
    trainer(3, callbacks=[Snapshot()], log_every_n_steps=1).fit(poisoned, train_poisoned)
    after_first = snapshots[(id(poisoned), 0)]
    after_skipped = snapshots[(id(poisoned), 1)]
    # Only the decoder's renormalisation touches the weights in a skipped step.
    renormalised = after_first["decoder.weight"] / after_first["decoder.weight"].norm(dim=0)
    torch.testing.assert_close(after_skipped["decoder.weight"], renormalised)
    for name in ("encoder.weight", "pre_encoder_bias", "tokens_since_fired"):
        assert torch.equal(after_skipped[name], after_first[name]), name
    assert torch.isfinite(poisoned.autoencoder.encoder.weight).all()
    assert not torch.equal(
        snapshots[(id(poisoned), 2)]["encoder.weight"], after_skipped["encoder.weight"]
    )
    assert int(poisoned.non_finite.skipped_steps) == 1


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
