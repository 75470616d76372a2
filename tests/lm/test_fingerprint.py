"""A transformer's fingerprint: the same for the same weights wherever they were loaded
from, another for a change in any parameter's sampled ends, its dtype or its shape."""

import torch
from torch import nn

from mlsae.lm.fingerprint import SAMPLE_BYTES, weights_fingerprint


def model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)).to(dtype)


def test_the_same_weights_give_the_same_fingerprint():
    assert weights_fingerprint(model()) == weights_fingerprint(model())
    assert weights_fingerprint(model()) != weights_fingerprint(model(seed=1))


def test_a_change_at_either_end_of_a_parameter_changes_it():
    reference = weights_fingerprint(model())
    for index in (0, -1):
        changed = model()
        with torch.no_grad():
            changed[0].weight.view(-1)[index] += 1.0
        assert weights_fingerprint(changed) != reference


def test_the_middle_of_a_large_parameter_is_not_read():
    # 64 x 64 float32 is 16 KiB: more than the two sampled ends.
    assert 64 * 64 * 4 > 2 * SAMPLE_BYTES
    changed = model()
    with torch.no_grad():
        changed[0].weight.view(-1)[64 * 32] += 1.0
    assert weights_fingerprint(changed) == weights_fingerprint(model())


def test_the_dtype_is_part_of_it():
    assert weights_fingerprint(model(dtype=torch.bfloat16)) != weights_fingerprint(model())
