"""What makes the autoencoder fast, behind one backend choice.

`mlsae.model.MLSAE` writes the maths; this package runs its three sparse steps, each given
the backend that `resolve_backend` chose once for the call (see `mlsae.sparse.backend`):

- `encode`: the k largest pre-activations of `(x - bias) @ W_enc.T` and AuxK's selection
  among the dead latents, values before ReLU;
- `decode`: `sum_i value_i * W_dec[:, index_i]`;
- `autoencode`: encode, ReLU and decode both selections as one autograd function (the
  `native` and `fused` backends, on the CPU).

The sizes the fast paths are tuned with are in `TUNING` (`mlsae.sparse.tuning`).
"""

from jaxtyping import Float, Int
from torch import Tensor

from mlsae.sparse.adam import LatentMajorAdam, make_adam
from mlsae.sparse.backend import BACKENDS, FUSED_BACKENDS, Backend, resolve_backend
from mlsae.sparse.decoder import decode, scatter_topk
from mlsae.sparse.dense import dense_topk_encode
from mlsae.sparse.encoder import topk_encode
from mlsae.sparse.fused import FusedOutput
from mlsae.sparse.fused import fused_autoencode as autoencode
from mlsae.sparse.layout import columnwise_dot, latent_major_linear
from mlsae.sparse.tuning import TUNING, Tuning, tuned
from mlsae.types import TopK

__all__ = [
    "BACKENDS",
    "FUSED_BACKENDS",
    "TUNING",
    "Backend",
    "FusedOutput",
    "LatentMajorAdam",
    "Tuning",
    "autoencode",
    "columnwise_dot",
    "decode",
    "encode",
    "latent_major_linear",
    "make_adam",
    "resolve_backend",
    "scatter_topk",
    "tuned",
]


def encode(
    inputs: Float[Tensor, "vectors n_inputs"],
    weight: Float[Tensor, "n_latents n_inputs"],
    k: int,
    auxk: int | None,
    dead_indices: Int[Tensor, " n_dead"] | None,
    bias: Float[Tensor, " n_inputs"] | None,
    backend: str,
) -> tuple[TopK, TopK]:
    """`(topk, auxk)`: the k largest pre-activations of `(inputs - bias) @ weight.T`, and the
    `min(auxk, n_dead)` largest among `dead_indices` (an empty selection without them),
    values before ReLU. Gradients reach `inputs`, `bias` and `weight` through the selected
    latents only, by a sparse backward (`dense`: by autograd)."""
    if backend == "dense":
        return dense_topk_encode(inputs, weight, k, auxk, dead_indices, bias)
    return topk_encode(inputs, weight, k, auxk, dead_indices, bias, backend)
