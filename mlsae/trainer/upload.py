"""`upload(config)`: write a trained model in both published layouts and push them."""

from pathlib import Path

from huggingface_hub import get_token

from mlsae.cli import ConfigError
from mlsae.lm.hub_access import is_hub_id, is_local
from mlsae.model.lightning import MLSAETransformer
from mlsae.names import autoencoder_repo_id, get_repo_id
from mlsae.trainer.config import UploadConfig, parse


def tfm_repo_id(model: MLSAETransformer, model_name: str | None = None) -> str:
    """The published name for the model's hyperparameters (`-layers-L` for one layer), for
    the language model `model_name` (default: the model's own)."""
    layers = model.layers if model.n_layers == 1 else None
    return get_repo_id(
        model_name or model.model_name,
        model.expansion_factor,
        model.k,
        model.tuned_lens,
        True,
        layers,
        model.site,
    )


def require_language_model_hub_id(name: str) -> None:
    """Raise ConfigError unless `name` (`--model_name`) is a hub id, not a local path."""
    if is_local(name) or not is_hub_id(name):
        raise ConfigError(
            f"--model_name {name} is not a hub id: pass the hub id (owner/name) of the "
            "language model the MLSAE was trained on"
        )


def language_model_hub_id(trained_on: str, asked: str | None) -> str:
    """The hub id that the published config names as the language model: `asked`
    (`--model_name`), else `trained_on` when that is a hub id. A local folder cannot be
    published: without `--model_name`, it raises ConfigError asking for one."""
    if asked is not None:
        require_language_model_hub_id(asked)
        return asked
    if is_local(trained_on):
        raise ConfigError(
            f"the model was trained on the local folder {trained_on}, which nobody else can "
            "load: pass the hub id of that language model with --model_name (e.g. "
            "--model_name EleutherAI/pythia-70m-deduped)"
        )
    return trained_on


def upload(config: UploadConfig) -> tuple[Path, Path]:
    """Save the -tfm module and the plain MLSAE; push both when a hub token is set."""
    asked = config.model_name
    if asked is not None:
        require_language_model_hub_id(asked)
    model = MLSAETransformer.load_checkpoint_weights(config.ckpt_path)
    model_name = language_model_hub_id(model.model_name, asked)
    published = {**model.hyperparameters.to_config(), "model_name": model_name}
    published.pop("tuned_lens_path", None)  # The lens's weights are in the checkpoint.
    tfm_id = config.repo_id or tfm_repo_id(model, model_name)
    sae_id = autoencoder_repo_id(tfm_id)
    tfm_dir = Path(config.output_dir) / tfm_id.split("/")[-1]
    sae_dir = Path(config.output_dir) / sae_id.split("/")[-1]
    model.save_pretrained(tfm_dir, config=published)
    model.autoencoder.save_pretrained(sae_dir)
    if get_token() is None:
        print(
            f"No Hugging Face token, so nothing was pushed. Wrote {tfm_dir} and {sae_dir}; "
            "log in with `hf auth login` and run upload.py again to push them."
        )
        return tfm_dir, sae_dir
    model.push_to_hub(tfm_id, config=published, private=config.private)
    model.autoencoder.push_to_hub(sae_id, private=config.private)
    print(f"Pushed {tfm_id} and {sae_id} (also written to {tfm_dir} and {sae_dir})")
    return tfm_dir, sae_dir


def main(args: list[str] | None = None) -> tuple[Path, Path]:
    """`python upload.py`: parse the command line and publish."""
    return upload(parse(UploadConfig, args))
