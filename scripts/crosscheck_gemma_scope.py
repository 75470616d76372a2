"""Write tiny Gemma Scope SAEs (`params.npz` in the layout of Google's hub repositories) and
record what their owners compute with them, for `tests/saes/test_gemma_scope.py` to compare
`load_sae` against.

The owner of the format is the formulas of Google's Gemma Scope tutorial, written out here
in numpy (float32, as the files are):

    pre = x @ W_enc + b_enc;  acts = (pre > threshold) * relu(pre);  recon = acts @ W_dec + b_dec

SAELens' own Gemma Scope loader must agree with them: each SAE is also loaded with
`SAE.from_pretrained(release, sae_id)` of a real release and SAE id of SAELens' directory,
through the loader that the directory names for it (`gemma_2`, i.e.
`gemma_2_sae_huggingface_loader`), its `hf_hub_download` pointed at the local files and
`d_in`/`d_sae` overridden (the loader reads them from the names: 2304 and 16384). The script
stops if the two disagree.

SAELens is not a dependency of this project: run this by hand in a scratch environment,

    python -m venv /tmp/venv-saelens
    /tmp/venv-saelens/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/torch-pin.txt
    /tmp/venv-saelens/bin/pip install sae-lens -c /tmp/torch-pin.txt
    HF_HUB_OFFLINE=1 /tmp/venv-saelens/bin/python scripts/crosscheck_gemma_scope.py

It rewrites tests/data/saes/gemma_scope/: `<repository>/<sae id>/params.npz` for each SAE
(the repository folders laid out like google/gemma-scope-2b-pt-res and its siblings), with
`expected.safetensors` beside it holding the inputs `x` [2, 3, d] and `x_vectors` [4, d],
the tutorial's latents `encode` and reconstruction `decode` of them (suffixed `_vectors`
for `x_vectors`), and SAELens' `encode`, `decode` (of its latents) and `forward`, prefixed
`saelens_`; `owner.json` names
the versions, the loader, SAELens' hook for each SAE and the largest differences found.
"""

import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import sae_lens
import sae_lens.loading.pretrained_sae_loaders as loaders
import torch
from sae_lens import SAE
from sae_lens.loading.pretrained_sae_loaders import (
    NAMED_PRETRAINED_SAE_LOADERS,
    get_conversion_loader_name,
)
from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "saes" / "gemma_scope"
D, D_SAE = 8, 16
N_HEADS = 2
"""The attention SAE reads 2 heads of 4 (SAELens takes them apart, as `hook_z` holds them)."""
CASES = {
    ("gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_14"): "residual stream, layer 3",
    ("gemma-scope-2b-pt-mlp", "layer_0/width_16k/average_l0_9"): "MLP output, layer 0",
    ("gemma-scope-2b-pt-att", "layer_3/width_16k/average_l0_117"): (
        "attention heads' outputs (hook_z), layer 3; SAELens given 2 heads of 4"
    ),
}
ATOL = 1e-5


def inputs(seed: int) -> dict[str, np.ndarray]:
    """A few vectors and a [2, 3, d] batch, off-centre and of unequal norms."""
    rng = np.random.default_rng(seed)
    scale = np.linspace(0.5, 2.0, 3).reshape(1, 3, 1)
    return {
        "x": (rng.normal(size=(2, 3, D)) * scale * 2 + 0.4).astype(np.float32),
        "x_vectors": (rng.normal(size=(4, D)) * 1.5 - 0.3).astype(np.float32),
    }


def params(seed: int, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Decoder rows of norms 0.3 to 3, non-zero biases, and positive thresholds per latent:
    latents 0-11 between 0.1 and 1.2 (some pre-activations fall between 0 and them), 12-14
    just below their largest pre-activation on the inputs (each fires once), 15 above all
    of them (never fires here)."""
    rng = np.random.default_rng(seed)
    w_dec = rng.normal(size=(D_SAE, D))
    w_dec = (
        w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True) * np.linspace(0.3, 3, D_SAE)[:, None]
    )
    p = {
        "W_enc": (rng.normal(size=(D, D_SAE)) * 0.6).astype(np.float32),
        "W_dec": w_dec.astype(np.float32),
        "b_enc": (rng.normal(size=D_SAE) * 0.3).astype(np.float32),
        "b_dec": (rng.normal(size=D) * 0.5).astype(np.float32),
    }
    rows = np.concatenate([v.reshape(-1, D) for v in x.values()])
    pre = np.sort(rows @ p["W_enc"] + p["b_enc"], axis=0)
    threshold = np.linspace(0.1, 1.2, D_SAE)
    threshold[12:15] = (pre[-1, 12:15] + pre[-2, 12:15]) / 2
    threshold[15] = pre[-1, 15] + 0.5
    p["threshold"] = threshold.astype(np.float32)
    assert (p["threshold"] > 0).all(), "thresholds must be positive"
    return p


def tutorial(p: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    """The Gemma Scope tutorial's JumpReLU SAE, in numpy."""
    pre = x @ p["W_enc"] + p["b_enc"]
    acts = (pre > p["threshold"]) * np.maximum(pre, 0)
    recon = acts @ p["W_dec"] + p["b_dec"]
    return {"encode": acts, "decode": recon}


def local_hub_download(calls: list[str]):
    """`hf_hub_download` reading the repository folders under OUT."""

    def hf_hub_download(repo_id: str, filename: str, subfolder: str | None = None, **_: Any):
        owner, name = repo_id.split("/")
        assert owner == "google", repo_id
        path = OUT / name / (subfolder or "") / filename
        assert path.is_file(), f"SAELens asked for {repo_id} {subfolder}/{filename}"
        calls.append(f"{repo_id}:{subfolder}/{filename}")
        return str(path)

    return hf_hub_download


def saelens_sae(release: str, sae_id: str) -> tuple[Any, str]:
    """SAELens' SAE from the local files, and the loader it used."""
    loader = NAMED_PRETRAINED_SAE_LOADERS[get_conversion_loader_name(release)]
    assert loader is loaders.gemma_2_sae_huggingface_loader, loader

    def tiny(**kwargs: Any):
        overrides = {**(kwargs.pop("cfg_overrides") or {}), "d_in": D, "d_sae": D_SAE}
        return loader(**kwargs, cfg_overrides=overrides)

    sae = SAE.from_pretrained(release, sae_id, converter=tiny)
    return sae.eval(), f"{loader.__module__}.{loader.__qualname__}"


def saelens_outputs(sae: Any, x: np.ndarray, heads: bool) -> dict[str, np.ndarray]:
    t = torch.from_numpy(x)
    t_in = t.reshape(*t.shape[:-1], N_HEADS, D // N_HEADS) if heads else t
    with torch.no_grad():
        acts = sae.encode(t_in)
        decoded = sae.decode(acts)
        forward = sae(t_in)
    flat = (lambda y: y.reshape(*t.shape[:-1], -1)) if heads else (lambda y: y)
    return {
        "encode": acts.numpy(),
        "decode": flat(decoded).numpy(),
        "forward": flat(forward).numpy(),
    }


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    calls: list[str] = []
    loaders.hf_hub_download = local_hub_download(calls)
    described = {}
    for seed, ((release, sae_id), what) in enumerate(CASES.items()):
        repo_id, folder_name = get_repo_id_and_folder_name(release, sae_id)
        assert repo_id == f"google/{release}" and folder_name == sae_id, (repo_id, folder_name)
        folder = OUT / release / sae_id
        folder.mkdir(parents=True)
        x = inputs(100 + seed)
        p = params(seed, x)
        np.savez(folder / "params.npz", **p)
        sae, loader_name = saelens_sae(release, sae_id)
        heads = sae.cfg.reshape_activations == "hook_z"
        assert heads == release.endswith("-att"), sae.cfg.reshape_activations
        expected: dict[str, torch.Tensor] = {}
        differences = {}
        for key, value in x.items():
            suffix = key.removeprefix("x")
            ours, theirs = tutorial(p, value), saelens_outputs(sae, value, heads)
            assert np.array_equal(ours["encode"] != 0, theirs["encode"] != 0), "latents differ"
            for name in theirs:
                mine = ours["encode" if name == "encode" else "decode"]
                difference = float(np.abs(mine - theirs[name]).max())
                assert difference <= ATOL, f"{release} {sae_id} {key} {name}: {difference}"
                differences[name + suffix] = difference
                expected["saelens_" + name + suffix] = torch.from_numpy(theirs[name])
            expected.update({name + suffix: torch.from_numpy(v) for name, v in ours.items()})
            expected[key] = torch.from_numpy(value)
        rows = np.concatenate([v.reshape(-1, D) for v in x.values()])
        pre = rows @ p["W_enc"] + p["b_enc"]
        assert ((pre > 0) & (pre <= p["threshold"])).any(), "no latent is cut by its threshold"
        fires = (tutorial(p, rows)["encode"] != 0).sum(0)
        assert (fires[12:15] == 1).all() and fires[15] == 0 and (fires[:12] > 0).all(), fires
        save_file(expected, folder / "expected.safetensors")
        described[f"{release}/{sae_id}"] = {
            "what": what,
            "repo_id": repo_id,
            "hook_name": sae.cfg.metadata.hook_name,
            "reshape_activations": sae.cfg.reshape_activations,
            "inputs_each_latent_fires_on": f"{fires.tolist()} of {len(rows)}",
            "max_abs_difference_tutorial_saelens": differences,
        }
        print(
            f"{release}/{sae_id}: {sae.cfg.metadata.hook_name}, max |tutorial - SAELens| "
            f"{max(differences.values()):.3g}, latents firing {fires.tolist()}"
        )
    owner = {
        "owner": "Google's Gemma Scope tutorial: pre = x @ W_enc + b_enc; acts = (pre > "
        "threshold) * relu(pre); recon = acts @ W_dec + b_dec (numpy, float32)",
        "package": "sae-lens",
        "version": sae_lens.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": importlib.metadata.version("safetensors"),
        "loader": f"sae_lens.SAE.from_pretrained(release, sae_id, "
        f"converter=) with the release's conversion_func, {loader_name}, its "
        f"cfg_overrides given d_in={D}, d_sae={D_SAE} and hf_hub_download reading these files",
        "downloads": calls,
        "saes": described,
    }
    (OUT / "owner.json").write_text(json.dumps(owner, indent=1) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {len(described)} SAEs to {OUT} ({total / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
