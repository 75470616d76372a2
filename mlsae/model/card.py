"""The model card (`README.md`) that `save_pretrained` writes beside a trained MLSAE."""

from typing import Any

from huggingface_hub import ModelCard, ModelCardData

CITATION = """@inproceedings{lawson2025residual,
  title     = {Residual Stream Analysis with Multi-Layer {SAE}s},
  author    = {Lawson, Tim and Farnik, Lucy and Houghton, Conor and Aitchison, Laurence},
  booktitle = {The Thirteenth International Conference on Learning Representations},
  year      = {2025},
  url       = {https://arxiv.org/abs/2409.04185}
}"""

HELD_OUT = (
    ("fvu/avg", "FVU (fraction of variance unexplained)"),
    ("l0/avg", "L0 (latents above the firing threshold per token)"),
    ("loss/delta/avg", "CE loss increase with the reconstruction spliced in (nats)"),
    ("logit/kldiv_per_token/avg", "KL divergence per token, spliced (nats)"),
)


SITE_WORDS = {
    "resid_pre": "residual stream entering",
    "resid_post": "residual stream after",
    "attn_out": "attention output of",
    "mlp_out": "MLP output of",
    "mlp_in": "normalised MLP input of",
    "attn_z": "concatenated attention heads' outputs (attn_z) of",
}
"""How the card names each site (`mlsae.lm.sites.SITES`)."""


def _held_out_table(metrics: dict[str, float] | None) -> str:
    rows = []
    for suffix, plain in HELD_OUT:
        for name, value in (metrics or {}).items():
            if name.split("/", 1)[-1] == suffix:
                rows.append(f"| {plain} | {float(value):.4g} |")
    if not rows:
        return "No held-out metrics were recorded with this model (`test.py` computes them).\n"
    return "| metric (averaged over layers) | value |\n| --- | ---: |\n" + "\n".join(rows) + "\n"


def mlsae_transformer_card(model: Any, metrics: dict[str, float] | None = None) -> ModelCard:
    """The card of an `MLSAETransformer`: what it is, how it was trained, its held-out
    metrics (`metrics`, e.g. the final validation's), how to load it, and the citation."""
    hparams = model.hyperparameters
    variant = "TopK"
    lens = " after the model's tuned lens" if hparams.tuned_lens else ""
    where = SITE_WORDS.get(hparams.site, f"`{hparams.site}`")
    content = f"""---
{ModelCardData(library_name="mlsae", license="mit", tags=["sparse-autoencoder", "mlsae"]).to_yaml()}
---

# Multi-Layer SAE on {hparams.model_name}

A Multi-Layer Sparse Autoencoder (MLSAE): one {variant} sparse autoencoder trained on the
{where} each of the blocks {list(model.layers)} of `{hparams.model_name}`
at once{lens}, with {model.n_latents:,} latents ({hparams.expansion_factor} x the model's
width of {model.n_inputs}) of which {hparams.k} are kept per vector, AuxK over
{hparams.auxk} dead latents.

Trained on {model.tokens_seen:,} tokens (context {hparams.max_length}, batches of
{hparams.batch_size} x {hparams.accumulate_grad_batches} sequences per optimizer step,
Adam with learning rate {hparams.lr}).

## Held-out metrics

{_held_out_table(metrics)}
## Use

```python
from mlsae.model import MLSAETransformer

model = MLSAETransformer.from_pretrained("<this repository or folder>")
tokens = model.transformer.tokenizer("The cat sat on the mat", return_tensors="pt").input_ids
topk, recons, auxk, auxk_recons, dead = model(tokens)  # topk.indices: [layer, 1, pos, k]
```

The weights of the language model are in this checkpoint; its config and tokenizer come
from `model_name` in `config.json` (pass `model_name=` to load them from elsewhere).
Made with the `mlsae` library (https://github.com/tim-lawson/mlsae for the original code).

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(content)
