"""EleutherAI sparsify's SparseCoder, set up with the same weights, for the step benchmark
(`pip install -e ".[bench]"`)."""

import torch


def make_sparsify(encoder, decoder, bias, k, lr: float, eps: float):
    from sparsify import SparseCoder, SparseCoderConfig

    n_latents, n_inputs = encoder.shape
    coder = SparseCoder(n_inputs, SparseCoderConfig(num_latents=n_latents, k=k))
    with torch.no_grad():
        coder.encoder.weight.copy_(encoder)
        coder.W_dec.copy_(decoder.t())
        coder.b_dec.copy_(bias)
    return coder, torch.optim.Adam(coder.parameters(), lr=lr, eps=eps)


def sparsify_step(
    coder, optimizer, flat: torch.Tensor, dead: torch.Tensor, auxk_coef: float
) -> None:
    out = coder(flat, dead_mask=dead)
    loss = out.fvu + auxk_coef * out.auxk_loss
    loss.backward()
    coder.remove_gradient_parallel_to_decoder_directions()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    coder.set_decoder_norm_to_unit_norm()
