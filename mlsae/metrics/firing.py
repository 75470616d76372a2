"""When a latent counts as firing."""

FIRING_THRESHOLD = 1e-3
"""The activation above which a latent counts as firing: for the L0 norm, for a latent to
stay alive during training, and for a top activating example (as the original, where it was
`dead_threshold` and the examples' minimum activation)."""
