"""Multi-Layer Sparse Autoencoders (Lawson et al., arXiv 2409.04185)."""
