"""Test-wide setup.

Triton kernels run on the CPU under its interpreter. `TRITON_INTERPRET` is read
when a kernel is defined, so it is set here, before any test imports
`mlsae.model.kernels`.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))

# `unreachable_hub` and `hub_offline`: a machine without the hub, for any test.
pytest_plugins = ["tests.no_hub"]
