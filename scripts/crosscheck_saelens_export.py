"""Export tiny MLSAEs with `mlsae.saes.export`, load the exports with SAELens itself and
record what SAELens computes with them, for `tests/saes/test_export.py`.

SAELens is not a dependency of this project. Run this script with the project's Python; it
writes the exports, then runs itself again (`--record`) in the scratch environment where
SAELens is installed (see scripts/crosscheck_saelens.py for how to make it):

    python scripts/crosscheck_saelens_export.py --saelens_python /tmp/venv-saelens/bin/python

It rewrites tests/data/saes/export/: `sources/` holds the tiny MLSAEs built here (plain
`MLSAE` folders), and each other folder one export (`cfg.json`,
`sae_weights.safetensors`, as this library wrote them) with `expected.safetensors`: the
inputs `x` and SAELens' `encode`, `decode` (of those latents) and `forward` of them after
`SAE.load_from_disk`; `owner.json` names the versions and what each export is.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "saes" / "export"
TFM = ROOT / "tests" / "data" / "goldens" / "mlsae-tfm-trained"
D_IN, D_SAE, K = 8, 32, 4
THRESHOLD = 0.25
"""The `batchtopk_threshold` of the BatchTopK-like tiny MLSAE."""

EXPORTS = {
    "tfm_layer_norm": "the golden -tfm model (tiny GPT-NeoX, standardised, k 6), layer 2",
    "plain_no_standardize": "a plain MLSAE (no standardisation, k 4, bias and decoder norms "
    "other than 0 and 1), layer 1",
    "batchtopk_jumprelu": f"a standardised MLSAE given architecture batchtopk and "
    f"batchtopk_threshold {THRESHOLD}, layer 0: written as jumprelu",
}


def tiny_mlsae(seed: int, standardize: bool):
    """A small MLSAE with a non-zero pre-encoder bias and decoder columns of unequal norms."""
    from mlsae.model import MLSAE

    gen = torch.Generator().manual_seed(seed)
    model = MLSAE(D_IN, D_SAE, K, auxk=None, standardize=standardize)
    with torch.no_grad():
        model.encoder.weight.copy_(torch.randn(D_SAE, D_IN, generator=gen) * 0.5)
        norms = 0.3 + 2 * torch.rand(1, D_SAE, generator=gen)
        model.decoder.weight.copy_(torch.randn(D_IN, D_SAE, generator=gen) * norms)
        model.pre_encoder_bias.copy_(torch.randn(D_IN, generator=gen) * 0.5)
    return model


def as_batchtopk(model):
    """A BatchTopK MLSAE (every latent a candidate) with the weights of `model` and the
    threshold `THRESHOLD`; where `MLSAE` has no architectures, `model` given the attributes
    such a model has."""
    from mlsae.model import MLSAE

    try:
        new = MLSAE(
            model.n_inputs,
            model.n_latents,
            model.k,
            auxk=None,
            standardize=True,
            architecture="batchtopk",
            batchtopk_capacity=model.n_latents,
        )
    except TypeError:
        model.architecture = "batchtopk"
        model.register_buffer("batchtopk_threshold", torch.zeros((), dtype=torch.float64))
        new = model
    new.load_state_dict(model.state_dict(), strict=False)
    new.batchtopk_threshold.fill_(THRESHOLD)
    return new.eval()


def inputs(seed: int, d_in: int) -> torch.Tensor:
    """Vectors with an offset and a scale per vector, so that standardising matters."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, d_in, generator=gen)
    return x * (0.5 + 3 * torch.rand(3, 5, 1, generator=gen)) + torch.randn(3, 5, 1, generator=gen)


def write_exports() -> None:
    """The exports and their inputs, with this library (the project's Python)."""
    from mlsae.saes.export import export_saelens

    plain, standardized = tiny_mlsae(1, standardize=False), tiny_mlsae(2, standardize=True)
    plain.save_pretrained(OUT / "sources" / "plain-no-standardize")
    standardized.save_pretrained(OUT / "sources" / "standardized")
    export_saelens(str(TFM), 2, OUT / "tfm_layer_norm")
    export_saelens(str(OUT / "sources" / "plain-no-standardize"), 1, OUT / "plain_no_standardize")
    export_saelens(as_batchtopk(standardized), 0, OUT / "batchtopk_jumprelu")
    for seed, name in enumerate(EXPORTS):
        d_in = json.loads((OUT / name / "cfg.json").read_text())["d_in"]
        save_file({"x": inputs(300 + seed, d_in)}, OUT / name / "inputs.safetensors")


def record() -> None:
    """SAELens' outputs on each export's inputs (the scratch environment's Python)."""
    import sae_lens
    from sae_lens import SAE

    for name in EXPORTS:
        folder = OUT / name
        sae = SAE.load_from_disk(folder)
        x = load_file(folder / "inputs.safetensors")["x"]
        with torch.no_grad():
            acts = sae.encode(x)
            expected = {"x": x, "encode": acts, "decode": sae.decode(acts), "forward": sae(x)}
        save_file(expected, folder / "expected.safetensors")
        (folder / "inputs.safetensors").unlink()
        print(f"{name}: {type(sae).__name__}, {sae.cfg.metadata.hook_name}")
    owner = {
        "package": "sae-lens",
        "version": sae_lens.__version__,
        "torch": torch.__version__,
        "loader": "sae_lens.SAE.load_from_disk",
        "exports": EXPORTS,
    }
    (OUT / "owner.json").write_text(json.dumps(owner, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saelens_python", default="/tmp/venv-saelens/bin/python")
    parser.add_argument("--record", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.record:
        record()
        return
    import shutil

    if OUT.exists():
        shutil.rmtree(OUT)
    sys.path.insert(0, str(ROOT))
    write_exports()
    subprocess.run([args.saelens_python, __file__, "--record"], check=True)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {len(EXPORTS)} exports to {OUT} ({total / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
