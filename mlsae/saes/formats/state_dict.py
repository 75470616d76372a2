"""A plain PyTorch state dict: `encoder.weight [d_sae, d_in]`, `encoder.bias`,
`decoder.weight [d_in, d_sae]`, `decoder.bias`, with ReLU latents and no centring, as
`nn.Linear` encoder and decoder modules save it (the Llama 3.2 1B layer-9 SAE's notebook
defines its SAE so). Any other tensor (a threshold, a skip connection) means another kind of
SAE, and is refused rather than ignored. `.pt`/`.pth` files are read as data only
(`mlsae.files.load_as_data`), never unpickled; `.safetensors` as they are. The files do not
say where the SAE reads: pass `layer=` and `site=`.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file

from mlsae.files import CheckpointError, load_as_data
from mlsae.saes.base import SAE
from mlsae.saes.linear import LinearSAE
from mlsae.saes.registry import Format, SAEFileError, register

KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")
SUFFIXES = (".pt", ".pth", ".safetensors")


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of `file`, checked to be exactly those of `KEYS`."""
    try:
        if file.suffix == ".safetensors":
            state = load_file(file)
        else:
            state = load_as_data(file, what="state dict file")
    except CheckpointError as error:
        raise SAEFileError(str(error)) from None
    except Exception as error:  # noqa: BLE001 (any unreadable file is the same mistake)
        raise SAEFileError(
            f"{file} is not a readable state dict of tensors ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SAEFileError(f"{file} holds no plain state dict of tensors")
    missing = [key for key in KEYS if key not in state]
    if missing:
        raise SAEFileError(
            f"{file} lacks {', '.join(missing)} (found {', '.join(sorted(state)[:8])})"
        )
    unused = sorted(key for key in state if key not in KEYS)
    if unused:
        raise SAEFileError(
            f"{file} holds {', '.join(unused[:8])}, which a plain ReLU SAE of {', '.join(KEYS)} "
            "does not have: it is another kind of SAE; pass format= its format"
        )
    return state


def state_dict_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
    if not files:
        raise SAEFileError(f"{path} holds no state dict file ({', '.join(SUFFIXES)})")
    if len(files) != 1:
        raise SAEFileError(
            f"{path} holds {len(files)} state dict files ({', '.join(p.name for p in files)}); "
            "pass the file itself"
        )
    return files[0]


def load(path: Path, layer: int | None = None, site: str | None = None) -> SAE:
    file = state_dict_file(path)
    state = read_state_dict(file)
    encoder, decoder = state["encoder.weight"].float(), state["decoder.weight"].float()
    if encoder.ndim != 2:
        raise SAEFileError(
            f"{file}: encoder.weight has shape {tuple(encoder.shape)}, not [d_sae, d_in]"
        )
    d_sae, d_in = encoder.shape
    expected = {"encoder.bias": (d_sae,), "decoder.weight": (d_in, d_sae), "decoder.bias": (d_in,)}
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise SAEFileError(
                f"{file}: {key} has shape {tuple(state[key].shape)}, but encoder.weight "
                f"[{d_sae}, {d_in}] needs {list(shape)}"
            )
    sae = LinearSAE(
        encoder.T.contiguous(),
        state["encoder.bias"].float(),
        decoder.T.contiguous(),
        state["decoder.bias"].float(),
        activation="relu",
        subtract_decoder_bias=False,
        layer=layer,
        site=site,
    )
    sae.format = "state_dict"
    return sae


register(Format("state_dict", marks=(), load=load, file_suffixes=SUFFIXES))
