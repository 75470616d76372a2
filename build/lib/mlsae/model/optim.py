"""Adam for the MLSAE: fused, and given its tensors in their contiguous memory order."""

from typing import Any

import torch
from torch import Tensor


class Adam(torch.optim.Adam):
    """`torch.optim.Adam` that hands the update contiguous views of transposed parameters.

    The decoder is stored latent-major (see `latent_major_linear`): its `[n_inputs,
    n_latents]` weight is the transpose of a contiguous tensor, and so are its gradient and
    moments. Torch's fused CPU Adam copies non-contiguous tensors to contiguous ones and
    back (5x the time of the update itself at 32,768 latents), so where a parameter, its
    gradient and both moments are all contiguous once transposed, the update runs on those
    transposed views. The arithmetic is elementwise, so the result is identical.
    """

    def _init_group(
        self, group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
    ):
        has_complex = super()._init_group(
            group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
        )
        lists = [params_with_grad, grads, exp_avgs, exp_avg_sqs]
        if group["amsgrad"]:
            lists.append(max_exp_avg_sqs)
        for i in range(len(params_with_grad)):
            tensors = [tensors_[i] for tensors_ in lists]
            if all(_contiguous_once_transposed(t) for t in tensors):
                for tensors_, tensor in zip(lists, tensors, strict=True):
                    tensors_[i] = tensor.t()
        return has_complex


def _contiguous_once_transposed(tensor: Tensor) -> bool:
    return tensor.dim() == 2 and not tensor.is_contiguous() and tensor.t().is_contiguous()


def make_adam(parameters: Any, lr: float, eps: float) -> torch.optim.Adam:
    """Adam, fused where torch supports it (CPU and CUDA): one pass over the parameters,
    and a step that the device itself skips when `found_inf` is set."""
    parameters = list(parameters)
    try:
        optimizer = Adam(parameters, lr=lr, eps=eps, fused=True)
        optimizer._mlsae_fused = True
    except (RuntimeError, ValueError):
        optimizer = Adam(parameters, lr=lr, eps=eps)
        optimizer._mlsae_fused = False
    return optimizer
