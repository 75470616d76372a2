"""Adam for the MLSAE: fused, given its tensors in their contiguous memory order, and able
to skip a step without a host sync."""

from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam


class LatentMajorAdam(torch.optim.Adam):
    """`torch.optim.Adam` (same hyperparameters, state and state dict) whose step hands the
    update contiguous views of transposed parameters, and can be told to skip a step.

    The decoder is stored latent-major (`mlsae.sparse.layout`): its `[n_inputs, n_latents]`
    weight is the transpose of a contiguous tensor, and so are its gradient and moments.
    Torch's fused CPU Adam copies non-contiguous tensors to contiguous ones and back, which
    costs several times the update itself, so where a parameter, its gradient and both
    moments are all contiguous once transposed, the update runs on those transposed views.
    The arithmetic is elementwise, so the result is that of `torch.optim.Adam`.

    `skip_step_if(flag)` skips the next step where the device tensor `flag` is True: a
    fused optimizer passes it to the kernel as `found_inf` (no host sync), another reads
    it once. A gradient scaler's own `found_inf` is honoured too.
    """

    def __init__(self, params: Any, lr: float, eps: float, fused: bool | None = None) -> None:
        super().__init__(params, lr=lr, eps=eps, fused=fused)
        self._skip: Tensor | None = None

    def skip_step_if(self, flag: Tensor) -> None:
        """Skip the next `step` where `flag` (a bool or 0/1 tensor) is True."""
        self._skip = flag

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skip, self._skip = self._skip, None
        for group in self.param_groups:
            if group["amsgrad"]:
                raise ValueError("LatentMajorAdam does not implement amsgrad")
            found_inf = getattr(self, "found_inf", None)  # set by a gradient scaler
            if skip is not None and group["fused"]:
                skip_flag = skip.to(torch.float32).reshape(())
                found_inf = skip_flag if found_inf is None else torch.maximum(found_inf, skip_flag)
            elif skip is not None and bool(skip):
                continue
            params, grads, exp_avgs, exp_avg_sqs, steps = self._group_tensors(group)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            adam(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                amsgrad=False,
                has_complex=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                foreach=group["foreach"],
                capturable=group["capturable"],
                differentiable=group["differentiable"],
                fused=group["fused"],
                grad_scale=getattr(self, "grad_scale", None),
                found_inf=found_inf,
                decoupled_weight_decay=group["decoupled_weight_decay"],
            )
        return loss

    def _group_tensors(self, group: dict[str, Any]) -> tuple[list[Tensor], ...]:
        """Parameters with gradients, their gradients, moments and step counts (created as
        `torch.optim.Adam` creates them), transposed where that makes all contiguous."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if not state:
                on_device = group["fused"] or group["capturable"]
                state["step"] = torch.zeros(
                    (),
                    dtype=_step_dtype(group["fused"]),
                    device=param.device if on_device else "cpu",
                )
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            tensors = [param, param.grad, state["exp_avg"], state["exp_avg_sq"]]
            if all(_contiguous_once_transposed(tensor) for tensor in tensors):
                tensors = [tensor.t() for tensor in tensors]
            for collected, tensor in zip(
                (params, grads, exp_avgs, exp_avg_sqs), tensors, strict=True
            ):
                collected.append(tensor)
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, steps


def _step_dtype(fused: bool) -> torch.dtype:
    """The dtype `torch.optim.Adam` keeps its step count in."""
    if fused or torch.get_default_dtype() != torch.float64:
        return torch.float32
    return torch.float64


def _contiguous_once_transposed(tensor: Tensor) -> bool:
    return tensor.dim() == 2 and not tensor.is_contiguous() and tensor.t().is_contiguous()


def make_adam(parameters: Any, lr: float, eps: float) -> LatentMajorAdam:
    """`LatentMajorAdam`, fused where torch supports it (CPU and CUDA): one pass over the
    parameters, and a step that the device itself skips when told to."""
    parameters = list(parameters)
    try:
        return LatentMajorAdam(parameters, lr=lr, eps=eps, fused=True)
    except (RuntimeError, ValueError):
        return LatentMajorAdam(parameters, lr=lr, eps=eps)
