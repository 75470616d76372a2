"""Statistics of a distribution over the layers of the stack.

A latent's weights at each layer (its summed activations, or its counts) define a
distribution over the layer index 0 .. n_layers - 1: the index into the model's stack of
layers, not the transformer block. Every function takes the weights with the layers along
`dim` and returns the statistic with `dim` removed; where the weights sum to 0 (a latent
that never fired) the result is NaN.
"""

import torch
from jaxtyping import Float
from torch import Tensor


def layer_index(weights: Tensor, dim: int = 0) -> Tensor:
    """The layer index 0 .. n - 1 along `dim`, in `weights`' dtype, shaped to broadcast
    against `weights`."""
    dim = dim % weights.ndim
    shape = [1] * weights.ndim
    shape[dim] = weights.shape[dim]
    index = torch.arange(weights.shape[dim], dtype=weights.dtype, device=weights.device)
    return index.view(shape)


def layer_distribution(weights: Float[Tensor, "..."], dim: int = 0) -> Float[Tensor, "..."]:
    """The weights normalised to sum to 1 over `dim` (NaN where they sum to 0)."""
    return weights / weights.sum(dim, keepdim=True)


def layer_mean(weights: Float[Tensor, "..."], dim: int = 0) -> Float[Tensor, "..."]:
    """The mean layer of the distribution that `weights` define over `dim`."""
    probs = layer_distribution(weights, dim)
    return (probs * layer_index(probs, dim)).sum(dim)


def layer_variance(
    weights: Float[Tensor, "..."], dim: int = 0, *, centred: bool = True
) -> Float[Tensor, "..."]:
    """The variance of the layer under the distribution that `weights` define over `dim`.

    `centred=True` sums the squared distances from the mean layer. `centred=False` gives
    E[l^2] - E[l]^2, as the published `-dists` datasets compute their `layer_var`: the same
    in exact arithmetic, but it can come out slightly negative (a latent at one layer).
    """
    probs = layer_distribution(weights, dim)
    layers = layer_index(probs, dim)
    mean = (probs * layers).sum(dim)
    if centred:
        return (probs * (layers - mean.unsqueeze(dim)) ** 2).sum(dim)
    return (probs * layers**2).sum(dim) - mean**2


def layer_std(
    weights: Float[Tensor, "..."], dim: int = 0, *, centred: bool = True
) -> Float[Tensor, "..."]:
    """The standard deviation of the layer (`layer_variance`, square-rooted)."""
    return layer_variance(weights, dim, centred=centred).sqrt()
