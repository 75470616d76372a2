"""`upload(config)`: write a trained model in both published layouts and push them."""

from pathlib import Path

from huggingface_hub import get_token

from mlsae.model.lightning import MLSAETransformer
from mlsae.names import autoencoder_repo_id, get_repo_id
from mlsae.trainer.config import UploadConfig, parse


def tfm_repo_id(model: MLSAETransformer) -> str:
    """The published name for the model's hyperparameters (`-layers-L` for one layer)."""
    layers = model.layers if model.n_layers == 1 else None
    return get_repo_id(
        model.model_name, model.expansion_factor, model.k, model.tuned_lens, True, layers
    )


def upload(config: UploadConfig) -> tuple[Path, Path]:
    """Save the -tfm module and the plain MLSAE; push both when a hub token is set."""
    model = MLSAETransformer.load_checkpoint_weights(config.ckpt_path)
    tfm_id = config.repo_id or tfm_repo_id(model)
    sae_id = autoencoder_repo_id(tfm_id)
    tfm_dir = Path(config.output_dir) / tfm_id.split("/")[-1]
    sae_dir = Path(config.output_dir) / sae_id.split("/")[-1]
    model.save_pretrained(tfm_dir)
    model.autoencoder.save_pretrained(sae_dir)
    if get_token() is None:
        print(
            f"No Hugging Face token, so nothing was pushed. Wrote {tfm_dir} and {sae_dir}; "
            "log in with `hf auth login` and run upload.py again to push them."
        )
        return tfm_dir, sae_dir
    model.push_to_hub(tfm_id, private=config.private)
    model.autoencoder.push_to_hub(sae_id, private=config.private)
    print(f"Pushed {tfm_id} and {sae_id} (also written to {tfm_dir} and {sae_dir})")
    return tfm_dir, sae_dir


def main(args: list[str] | None = None) -> tuple[Path, Path]:
    """`python upload.py`: parse the command line and publish."""
    return upload(parse(UploadConfig, args))
