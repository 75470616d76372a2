"""Multi-Layer Sparse Autoencoders (Lawson et al., arXiv 2409.04185)."""

import os

# Back PyTorch's large CPU tensors with transparent huge pages. A training step allocates
# fresh tensors of tens of MB (pre-activations, gradients), and on Linux each 4 KiB page of
# a fresh allocation costs a page fault: 64 MiB of fresh tensor took 22 ms to fill with
# small pages and 8 ms with huge ones on the machine of the README's figures. PyTorch reads
# this variable once, at its first allocation, so it only acts when `mlsae` is imported
# before torch (as `train.py`, `test.py` and `python -m mlsae...` do). Set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
