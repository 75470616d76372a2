"""Write tiny SAELens SAEs with SAELens itself and record what SAELens computes with them,
for `tests/saes/test_saelens.py` to compare `load_sae` against.

SAELens is not a dependency of this project: run this by hand in a scratch environment,

    python -m venv /tmp/venv-saelens
    /tmp/venv-saelens/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/torch-pin.txt
    /tmp/venv-saelens/bin/pip install sae-lens -c /tmp/torch-pin.txt
    /tmp/venv-saelens/bin/python scripts/crosscheck_saelens.py

It rewrites tests/data/saes/saelens/: one folder per SAE, each with the `cfg.json` and
`sae_weights.safetensors` that SAELens' `save_model` wrote (two written by hand in the flat
layout of SAELens before 6.0), and `expected.safetensors` holding the inputs `x` and
SAELens' `encode`, `decode` (of those latents) and `forward` of them after
`SAE.load_from_disk`; `owner.json` names the versions and what each folder is.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import sae_lens
import torch
from sae_lens import SAE
from sae_lens.saes import (
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    Transcoder,
    TranscoderConfig,
)
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "saes" / "saelens"
D_IN, D_SAE, D_OUT = 8, 16, 10
SCALING_FACTOR = 2.5
"""The `norm_scaling_factor` folded into the `expected_average_only_in` SAE."""


def random_weights(seed: int, d_out: int = D_IN, skip: bool = False) -> dict[str, torch.Tensor]:
    """Weights with decoder rows of unequal norms, non-zero biases and thresholds."""
    gen = torch.Generator().manual_seed(seed)
    weights = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=gen) * 0.5,
        "b_enc": torch.randn(D_SAE, generator=gen) * 0.3,
        "W_dec": torch.randn(D_SAE, d_out, generator=gen)
        * (0.3 + 2 * torch.rand(D_SAE, 1, generator=gen)),
        "b_dec": torch.randn(d_out, generator=gen) * 0.5,
        "threshold": 0.2 + 0.8 * torch.rand(D_SAE, generator=gen),
    }
    if skip:
        weights["W_skip"] = torch.randn(d_out, D_IN, generator=gen) * 0.2
    return weights


def inputs(seed: int) -> torch.Tensor:
    """Activations with two leading dims, off-centre and of unequal norms."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, D_IN, generator=gen) * 2 + 0.7


def build(sae: Any, weights: dict[str, torch.Tensor]) -> Any:
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(weights[name])
    return sae


def metadata(hook_name: str, **more: Any) -> SAEMetadata:
    return SAEMetadata(model_name="tiny", hook_name=hook_name, **more)


def saelens_saes() -> dict[str, tuple[Any, str]]:
    """Each SAE SAELens writes, with what it tests."""
    return {
        "standard": (
            build(
                StandardSAE(
                    StandardSAEConfig(
                        d_in=D_IN, d_sae=D_SAE, metadata=metadata("blocks.1.hook_resid_pre")
                    )
                ),
                random_weights(1),
            ),
            "standard, b_dec subtracted, no normalisation, sparsity.safetensors beside it",
        ),
        "standard_layer_norm": (
            build(
                StandardSAE(
                    StandardSAEConfig(
                        d_in=D_IN,
                        d_sae=D_SAE,
                        apply_b_dec_to_input=False,
                        normalize_activations="layer_norm",
                        metadata=metadata("blocks.2.hook_mlp_out"),
                    )
                ),
                random_weights(2),
            ),
            "standard, b_dec not subtracted, layer_norm",
        ),
        "topk_norm_rescale": (
            build(
                TopKSAE(
                    TopKSAEConfig(
                        d_in=D_IN,
                        d_sae=D_SAE,
                        k=3,
                        normalize_activations="constant_norm_rescale",
                        metadata=metadata("blocks.0.hook_resid_post"),
                    )
                ),
                random_weights(3),
            ),
            "topk k=3 without decoder-norm rescaling, constant_norm_rescale",
        ),
        "topk_rescaled_hook_z": (
            build(
                TopKSAE(
                    TopKSAEConfig(
                        d_in=D_IN,
                        d_sae=D_SAE,
                        k=4,
                        rescale_acts_by_decoder_norm=True,
                        reshape_activations="hook_z",
                        metadata=metadata("blocks.3.attn.hook_z"),
                    )
                ),
                random_weights(4),
            ),
            "topk k=4 with rescale_acts_by_decoder_norm, on hook_z (2 heads of 4)",
        ),
        "jumprelu_expected_average": (
            build(
                JumpReLUSAE(
                    JumpReLUSAEConfig(
                        d_in=D_IN,
                        d_sae=D_SAE,
                        apply_b_dec_to_input=False,
                        normalize_activations="expected_average_only_in",
                        metadata=metadata("blocks.1.hook_resid_post"),
                    )
                ),
                random_weights(5),
            ),
            f"jumprelu, expected_average_only_in; expected: scaling factor {SCALING_FACTOR} "
            "folded as from_pretrained does; expected_unscaled: as load_from_disk leaves it",
        ),
        "jumprelu_skip_transcoder": (
            build(
                JumpReLUSkipTranscoder(
                    JumpReLUSkipTranscoderConfig(
                        d_in=D_IN,
                        d_sae=D_SAE,
                        d_out=D_OUT,
                        apply_b_dec_to_input=False,
                        normalize_activations="layer_norm",
                        metadata=metadata(
                            "blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out"
                        ),
                    )
                ),
                random_weights(6, D_OUT, skip=True),
            ),
            "jumprelu skip transcoder, d_out 10, layer_norm on the input only",
        ),
        "transcoder": (
            build(
                Transcoder(
                    TranscoderConfig(
                        d_in=D_IN,
                        d_sae=D_SAE,
                        d_out=D_IN,
                        apply_b_dec_to_input=False,
                        metadata=metadata(
                            "blocks.2.mlp.hook_in", hook_name_out="blocks.2.mlp.hook_out"
                        ),
                    )
                ),
                random_weights(7),
            ),
            "relu transcoder, TransformerLens 3 bridge hook names",
        ),
    }


def flat_configs() -> dict[str, tuple[dict[str, Any], dict[str, torch.Tensor], str]]:
    """SAEs in the flat config of SAELens before 6.0, written by hand."""
    common = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "tiny",
        "hook_head_index": None,
        "prepend_bos": True,
        "dataset_path": "tiny",
        "dataset_trust_remote_code": True,
        "context_size": 16,
        "finetuning_scaling_factor": False,
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
        "seqpos_slice": [None],
    }
    topk = {k: v for k, v in random_weights(8).items() if k != "threshold"}
    matryoshka = random_weights(9)
    matryoshka["threshold"] = torch.full((D_SAE,), 0.45)  # BatchTopK's one threshold
    return {
        "flat_topk": (
            {
                **common,
                "architecture": "standard",
                "hook_point": "blocks.4.hook_resid_pre",
                "hook_point_layer": 4,
                "activation_fn_str": "topk",
                "activation_fn_kwargs": {"k": 2},
                "apply_b_dec_to_input": True,
                "normalize_activations": False,
                "sae_lens_training_version": "3.5.0",
            },
            topk,
            "SAELens 3-5 flat config: hook_point, activation_fn_str topk with k=2, "
            "normalize_activations false",
        ),
        "matryoshka/standard/blocks.12.hook_resid_post": (
            {
                **common,
                "architecture": "jumprelu",
                "hook_name": "blocks.12.hook_resid_post",
                "hook_layer": 12,
                "activation_fn_str": "relu",
                "activation_fn_kwargs": {},
                "apply_b_dec_to_input": True,
                "normalize_activations": "none",
                "sae_lens_training_version": "5.9.1",
            },
            matryoshka,
            "a BatchTopK Matryoshka SAE saved as jumprelu with SAELens 5's config keys, in "
            "a release's <variant>/<hook> subfolder",
        ),
    }


def record(sae: Any, x: torch.Tensor, hook_z: bool = False) -> dict[str, torch.Tensor]:
    """SAELens' encode, decode and forward of `x` (hook_z SAEs take heads apart)."""
    x_in = x.reshape(*x.shape[:-1], 2, D_IN // 2) if hook_z else x
    with torch.no_grad():
        acts = sae.encode(x_in)
        decoded = sae.decode(acts)
        forward = sae(x_in)
    flat = (lambda t: t.reshape(*x.shape[:-1], -1)) if hook_z else (lambda t: t)
    return {"x": x, "encode": acts, "decode": flat(decoded), "forward": flat(forward)}


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    described = {}
    for seed, (name, (sae, what)) in enumerate(saelens_saes().items()):
        folder = OUT / name
        sae.save_model(folder)
        loaded = SAE.load_from_disk(folder)
        x = inputs(100 + seed)
        hook_z = loaded.cfg.reshape_activations == "hook_z"
        expected = record(loaded, x, hook_z)
        if loaded.cfg.normalize_activations == "expected_average_only_in":
            unscaled = record(loaded, x)
            expected.update({f"{k}_unscaled": v for k, v in unscaled.items() if k != "x"})
            loaded.fold_activation_norm_scaling_factor(SCALING_FACTOR)
            expected.update(record(loaded, x))
        if name == "standard":
            save_file({"sparsity": torch.linspace(-6, -1, D_SAE)}, folder / "sparsity.safetensors")
        save_file(expected, folder / "expected.safetensors")
        described[name] = what
    for seed, (name, (cfg, weights, what)) in enumerate(flat_configs().items()):
        folder = OUT / name
        folder.mkdir(parents=True)
        (folder / "cfg.json").write_text(json.dumps(cfg, indent=1))
        save_file(weights, folder / "sae_weights.safetensors")
        loaded = SAE.load_from_disk(folder)
        save_file(record(loaded, inputs(200 + seed)), folder / "expected.safetensors")
        described[name] = what
    owner = {
        "package": "sae-lens",
        "version": sae_lens.__version__,
        "torch": torch.__version__,
        "loader": "sae_lens.SAE.load_from_disk",
        "scaling_factor": SCALING_FACTOR,
        "saes": described,
    }
    (OUT / "owner.json").write_text(json.dumps(owner, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {len(described)} SAEs to {OUT} ({total / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
