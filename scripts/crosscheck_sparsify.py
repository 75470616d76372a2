"""Write tiny sparsify checkpoints with sparsify's own `SparseCoder` and record its outputs,
for tests/saes/test_sparsify.py to compare `load_sae` against.

sparsify is never a dependency of mlsae: run this by hand in a scratch environment that has
it, from the repository root:

    python -m venv /tmp/venv-sparsify
    /tmp/venv-sparsify/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/torch-pin.txt
    /tmp/venv-sparsify/bin/pip install -c /tmp/torch-pin.txt eai-sparsify
    /tmp/venv-sparsify/bin/python scripts/crosscheck_sparsify.py

It rewrites tests/data/saes/sparsify/: `checkpoint/<hookpoint>/` (cfg.json and
sae.safetensors, written by `SparseCoder.save_to_disk`), `outputs/<hookpoint>.safetensors`
(the inputs and what `SparseCoder.load_from_disk`'s coder returns for them) and
`owner.json` (the package versions that produced them).
"""

import json
import os
from importlib.metadata import version
from pathlib import Path

# sparsify's Triton decoder runs on GPUs only; its eager decoder is the reference here.
os.environ["SPARSIFY_DISABLE_TRITON"] = "1"

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "saes" / "sparsify"
D_IN, D_SAE, K, N_INPUTS = 8, 32, 4, 6

CODERS = {
    # The residual stream leaving block 1: an autoencoder, b_dec subtracted from the input.
    "layers.1": SparseCoderConfig(num_latents=D_SAE, k=K),
    # The MLP of block 1 as a transcoder with a skip connection.
    "layers.1.mlp": SparseCoderConfig(num_latents=D_SAE, k=K, transcode=True, skip_connection=True),
    # The attention output of block 0, with groupmax latents (K groups of D_SAE // K).
    "layers.0.self_attn": SparseCoderConfig(num_latents=D_SAE, k=K, activation="groupmax"),
}


@torch.no_grad()
def fill(coder: SparseCoder, generator: torch.Generator) -> None:
    """Weights unlike a fresh coder's: decoder rows of norms far from 1, biases non-zero,
    and an encoder bias positive for two latents only, so that an input whose encoder
    input is zero has fewer active latents than k."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    coder.encoder.weight.copy_(randn(D_SAE, D_IN) * 0.5)
    coder.encoder.bias.copy_(-randn(D_SAE).abs() * 0.2)
    coder.encoder.bias[[3, 17]] = torch.tensor([0.4, 0.7])
    assert coder.W_dec is not None
    coder.W_dec.copy_(randn(D_SAE, D_IN) * (0.2 + 2 * torch.rand(D_SAE, 1, generator=generator)))
    coder.b_dec.copy_(randn(D_IN) * 0.3)
    if coder.W_skip is not None:
        coder.W_skip.copy_(randn(D_IN, D_IN) * 0.3)


def inputs_for(coder: SparseCoder, generator: torch.Generator) -> torch.Tensor:
    """Random inputs, then the one whose encoder input is zero (b_dec for an autoencoder,
    the zero vector for a transcoder)."""
    x = torch.randn(N_INPUTS, D_IN, generator=generator) * 2
    zero_in = torch.zeros(D_IN) if coder.cfg.transcode else coder.b_dec.detach()
    return torch.cat([x, zero_in[None]])


@torch.no_grad()
def outputs_of(coder: SparseCoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    top_acts, top_indices, pre_acts = coder.encode(x)
    dense = torch.zeros(x.shape[0], coder.num_latents).scatter(-1, top_indices, top_acts)
    return {
        "x": x,
        "top_acts": top_acts,
        "top_indices": top_indices,
        "pre_acts": pre_acts,
        "encode_dense": dense,
        "decode": coder.decode(top_acts, top_indices),
        "forward": coder(x).sae_out,
    }


def main() -> None:
    generator = torch.Generator().manual_seed(20250101)
    for hookpoint, cfg in CODERS.items():
        torch.manual_seed(0)
        coder = SparseCoder(D_IN, cfg)
        fill(coder, generator)
        folder = OUT / "checkpoint" / hookpoint
        coder.save_to_disk(folder)
        loaded = SparseCoder.load_from_disk(folder)
        results = outputs_of(loaded, inputs_for(loaded, generator))
        (OUT / "outputs").mkdir(parents=True, exist_ok=True)
        save_file(
            {name: t.contiguous() for name, t in results.items()},
            OUT / "outputs" / f"{hookpoint}.safetensors",
        )
        active = (results["encode_dense"] > 0).sum(-1).tolist()
        print(f"{hookpoint}: active latents per input {active}")
    owner = {
        "package": "eai-sparsify",
        "version": version("eai-sparsify"),
        "torch": torch.__version__,
        "loader": "sparsify.SparseCoder.load_from_disk",
        "decoder": "eager (SPARSIFY_DISABLE_TRITON=1)",
    }
    (OUT / "owner.json").write_text(json.dumps(owner, indent=2) + "\n")
    print(json.dumps(owner))


if __name__ == "__main__":
    main()
