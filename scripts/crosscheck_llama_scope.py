"""Cross-check of the Llama Scope loader against OpenMOSS lm_saes 1.0 itself; run by hand,
never in CI, in a scratch environment that is not the project's.

Writes tiny lm_saes 1.0 SAEs with fixed seeds into tests/data/saes/llama_scope/<case>/
(`hyperparams.json` and `checkpoints/final.safetensors`, as Llama Scope ships them), loads
each with lm_saes 1.0's `SparseAutoEncoder.from_pretrained` pointed at the folder, runs it on
fixed inputs, and saves the inputs and lm_saes' outputs in
tests/data/saes/llama_scope/expected/<case>.safetensors, and what produced them in
tests/data/saes/llama_scope/owner.json. tests/saes/test_llama_scope.py then asserts that
`load_sae` gives the same outputs.

Cases: a dataset-wise normalised JumpReLU SAE (like Llama Scope's LXR/LXA/LXM); a
transcoder from `ln2.hook_normalized` to `hook_mlp_out` (like LXTC) with its own input and
output norms and a top-k activation with a positive threshold (which lm_saes says it converts
to JumpReLU, yet runs as top-k); a top-k SAE that subtracts its decoder bias from the input;
a JumpReLU SAE stored in bfloat16 as the releases are (lm_saes rewrites the weights in that
dtype); and a token-wise normalised ReLU SAE. "forward" is `SparseAutoEncoder.forward`,
except for the token-wise SAE, whose forward stays in the normalised space: there it is the
reconstruction that `compute_loss` reports (the forward divided by the input's norm factor).

How to run (lm_saes 1.0 declares Python 3.10; its SAE code runs on 3.11 too):

    python -m venv /tmp/venv-lmsaes
    /tmp/venv-lmsaes/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/torch-pin.txt
    /tmp/venv-lmsaes/bin/pip install -c /tmp/torch-pin.txt "transformer-lens>=2.8,<3" \\
        "pyarrow<20" pymongo openai tiktoken networkx
    git clone https://github.com/OpenMOSS/Language-Model-SAEs /tmp/lm-saes
    git -C /tmp/lm-saes checkout v1.0.0
    /tmp/venv-lmsaes/bin/python scripts/crosscheck_llama_scope.py /tmp/lm-saes
"""

import argparse
import importlib.metadata
import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

TAG = "v1.0.0"
COMMIT = "a05e45a949fa30a3edd1f311bbccd4ebff2fb373"
OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "saes" / "llama_scope"
D_MODEL, D_SAE = 8, 16

BASE = {
    "d_model": D_MODEL,
    "d_sae": D_SAE,
    "expansion_factor": D_SAE // D_MODEL,
    "dtype": "float32",
    "device": "cpu",
    "use_decoder_bias": True,
    "apply_decoder_bias_to_pre_encoder": False,
    "norm_activation": "dataset-wise",
    "sparsity_include_decoder_norm": True,
    "use_glu_encoder": False,
    "decoder_exactly_fixed_norm": False,
    "init_decoder_norm": 0.5,
    "top_k": 4,
}
CASES = {
    "sae": {
        "hook_point_in": "blocks.3.hook_resid_post",
        "hook_point_out": "blocks.3.hook_resid_post",
        "act_fn": "jumprelu",
        "jump_relu_threshold": 0.35,
        "dataset_average_activation_norm": {"in": 7.5, "out": 7.5},
    },
    "transcoder": {
        "hook_point_in": "blocks.2.ln2.hook_normalized",
        "hook_point_out": "blocks.2.hook_mlp_out",
        "act_fn": "topk",
        "jump_relu_threshold": 0.2,
        "dataset_average_activation_norm": {"in": 2.5, "out": 0.6},
    },
    "topk": {
        "hook_point_in": "blocks.0.hook_attn_out",
        "hook_point_out": "blocks.0.hook_attn_out",
        "act_fn": "topk",
        "jump_relu_threshold": 0.0,
        "apply_decoder_bias_to_pre_encoder": True,
        "dataset_average_activation_norm": {"in": 4.0, "out": 4.0},
    },
    "bf16": {
        "hook_point_in": "blocks.15.hook_resid_post",
        "hook_point_out": "blocks.15.hook_resid_post",
        "act_fn": "jumprelu",
        "jump_relu_threshold": 0.35546875,
        "dataset_average_activation_norm": {"in": 10.8125, "out": 10.8125},
    },
    "tokenwise": {
        "hook_point_in": "blocks.1.hook_mlp_out",
        "hook_point_out": "blocks.1.hook_mlp_out",
        "act_fn": "relu",
        "apply_decoder_bias_to_pre_encoder": True,
        "norm_activation": "token-wise",
    },
}
STORED_DTYPE = {"bf16": torch.bfloat16}
"""Cases stored as Llama Scope stores its weights; lm_saes rewrites them in that dtype, then
computes in the config's float32."""


def weights(seed: int) -> dict[str, torch.Tensor]:
    """Trained-looking weights: decoder columns of norms 0.2 to 3, non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    decoder = torch.randn(D_MODEL, D_SAE, generator=g)
    return {
        "encoder.weight": torch.randn(D_SAE, D_MODEL, generator=g) * 0.5,
        "encoder.bias": torch.randn(D_SAE, generator=g) * 0.3,
        "decoder.weight": decoder / decoder.norm(dim=0) * torch.linspace(0.2, 3.0, D_SAE),
        "decoder.bias": torch.randn(D_MODEL, generator=g) * 0.2,
    }


def inputs(hp: dict, seed: int) -> torch.Tensor:
    """Raw activations with two leading dims, about as large as the site's average norm."""
    g = torch.Generator().manual_seed(seed)
    norm = hp.get("dataset_average_activation_norm", {"in": 3.0})["in"]
    scale = torch.linspace(0.5, 1.5, 3).view(1, 3, 1)
    return torch.randn(2, 3, D_MODEL, generator=g) * scale * norm / math.sqrt(D_MODEL)


def write_case(name: str, hp: dict, seed: int) -> Path:
    folder = OUT / name
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "hyperparams.json").write_text(json.dumps(hp, indent=2) + "\n")
    stored = {k: v.to(STORED_DTYPE.get(name, torch.float32)) for k, v in weights(seed).items()}
    save_file(stored, folder / "checkpoints" / "final.safetensors")
    return folder


def owner_outputs(folder: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from lm_saes.sae import SparseAutoEncoder

    sae = SparseAutoEncoder.from_pretrained(str(folder))
    with torch.no_grad():
        encoded = sae.encode(x)
        if sae.cfg.norm_activation == "token-wise":
            forward = sae.compute_loss(x)[1][1]["reconstructed"]
        else:
            forward = sae.forward(x)
    return {"x": x, "encode": encoded.contiguous(), "forward": forward.contiguous()}


def source_commit(src: Path) -> str:
    result = subprocess.run(
        ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lm_saes", type=Path, help="a checkout of lm_saes at tag v1.0.0")
    args = parser.parse_args()
    if source_commit(args.lm_saes) != COMMIT:
        sys.exit(f"error: {args.lm_saes} is not lm_saes {TAG} ({COMMIT}); check that tag out")
    sys.path.insert(0, str(args.lm_saes / "src"))
    (OUT / "expected").mkdir(parents=True, exist_ok=True)
    for seed, (name, case) in enumerate(CASES.items()):
        hp = {**BASE, **case}
        folder = write_case(name, hp, seed)
        outputs = owner_outputs(folder, inputs(hp, seed + 100))
        save_file(outputs, OUT / "expected" / f"{name}.safetensors")
        active = (outputs["encode"] > 0).float().sum(-1).mean().item()
        print(f"{name}: {active:.2f} of {D_SAE} latents active on average")
    owner = {
        "package": "lm_saes",
        "tag": TAG,
        "commit": COMMIT,
        "loader": "lm_saes.sae.SparseAutoEncoder.from_pretrained(folder)",
        "torch": importlib.metadata.version("torch"),
        "transformer_lens": importlib.metadata.version("transformer-lens"),
        "python": platform.python_version(),
    }
    (OUT / "owner.json").write_text(json.dumps(owner, indent=2) + "\n")


if __name__ == "__main__":
    main()
