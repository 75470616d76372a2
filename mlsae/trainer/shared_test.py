"""`test.py` with several models: the models that read the same activations are evaluated
together, computing once per batch what depends only on the frozen transformer.

Models read the same activations when they have the same transformer (weights compared
tensor by tensor, not only the name), layers, site, tuned lens (weights), special-token
options and `max_length`. Per batch, their `GroupEvaluation` computes the residual stream,
the clean logits and the zero/mean-ablation losses once; each model's reconstruction is
still spliced in on its own. Each model logs what it logs alone, under its own prefix, and
`split_metrics` gives each model's metrics back (docs/evaluation.md).
"""

import json
import os
from itertools import chain
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from mlsae.lm.splice import ablated_losses, spliced_metrics_each
from mlsae.lm.transformer import Transformer
from mlsae.model.evaluation import evaluation_metrics
from mlsae.model.hub import read_config
from mlsae.model.lightning import MLSAETransformer
from mlsae.model.resolve import find_language_model

_READ_THE_SAME = ("layers", "site", "max_length", "skip_special_tokens", "tuned_lens")
"""The hyperparameters that say which activations a model reads (with its transformer)."""


def candidate_key(repo_id: str) -> str | None:
    """What the saved configs of models that may read the same activations share: where
    their language model is and `_READ_THE_SAME` (None when the config cannot be read: that
    model is loaded alone, and says why). Models are loaded one key at a time, so that only
    the transformers of one key's models are in memory together."""
    folder = os.path.expanduser(repo_id)
    try:
        config = read_config(folder)
        stored = config["model_name"]
        found = os.path.expanduser(find_language_model(stored, folder))
    except Exception:  # Loading it alone raises the error that says what is wrong.
        return None
    where = os.path.realpath(found) if os.path.isdir(found) else found
    return json.dumps([where, *(config.get(name) for name in _READ_THE_SAME)])


def _same_tensors(a: nn.Module, b: nn.Module) -> bool:
    ours = dict(chain(a.named_parameters(), a.named_buffers()))
    theirs = dict(chain(b.named_parameters(), b.named_buffers()))
    return ours.keys() == theirs.keys() and all(
        ours[name].dtype == theirs[name].dtype
        and ours[name].shape == theirs[name].shape
        and torch.equal(ours[name], theirs[name].to(ours[name].device))
        for name in ours
    )


def _config(transformer: Transformer) -> dict[str, Any]:
    config = transformer.model.config.to_dict()
    config.pop("_name_or_path", None)
    return config


def same_transformer(a: Transformer, b: Transformer) -> bool:
    """Whether `a` and `b` compute the same thing: the same architecture, config,
    tokenizer vocabulary and special tokens, and every parameter and buffer equal."""
    return (
        type(a.model) is type(b.model)
        and _config(a) == _config(b)
        and a.special_token_ids == b.special_token_ids
        and a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
        and a.skip_blocks_before_splice == b.skip_blocks_before_splice
        and _same_tensors(a.model, b.model)
    )


def reads_same_activations(a: MLSAETransformer, b: MLSAETransformer) -> bool:
    """Whether `a` and `b` see the same residual stream and splice into the same model."""
    settings = ("layers", "site", "max_length", "skip_special_tokens", "count_special_tokens")
    if any(getattr(a, name) != getattr(b, name) for name in settings):
        return False
    if (a.lens is None) != (b.lens is None):
        return False
    if a.lens is not None and b.lens is not None and not _same_tensors(a.lens, b.lens):
        return False
    return a.transformer is b.transformer or same_transformer(a.transformer, b.transformer)


def group_models(models: list[MLSAETransformer]) -> list[list[int]]:
    """The indices of `models` grouped by the activations they read, in order; the models of
    a group share their first model's transformer from then on (the copies are dropped)."""
    groups: list[list[int]] = []
    for index, model in enumerate(models):
        for group in groups:
            first = models[group[0]]
            if reads_same_activations(first, model):
                model.transformer = first.transformer
                group.append(index)
                break
        else:
            groups.append([index])
    return groups


def _prefix(index: int) -> str:
    return f"model_{index}/"


class GroupEvaluation(LightningModule):
    """`MLSAETransformer.test_step` for models that read the same activations (sharing one
    transformer): per batch, the stream, the true logits and the ablated losses once, then
    each model's own evaluation, logged under `model_<i>/`."""

    def __init__(self, models: list[MLSAETransformer]) -> None:
        super().__init__()
        if len(models) < 2 or any(m.transformer is not models[0].transformer for m in models):
            raise ValueError("a group evaluation takes two or more models of one transformer")
        self.models = nn.ModuleList(models)

    def on_test_epoch_start(self) -> None:
        for model in self.models:
            model.on_test_epoch_start()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        tokens = batch["input_ids"]
        models: list[MLSAETransformer] = list(self.models)  # type: ignore[arg-type]
        first = models[0]
        stream = first.residual_stream(tokens)
        results = [m.autoencoder.forward_standardized(stream.inputs, stream.mask) for m in models]
        recons = [m.to_transformer_space(results[i].output.recons) for i, m in enumerate(models)]
        spliced = spliced_metrics_each(first.transformer, tokens, stream, recons)
        ablated = ablated_losses(first.transformer, tokens, stream)
        for index, model in enumerate(models):
            logged = evaluation_metrics(model, stream, results[index], spliced[index], ablated)
            prefixed = {_prefix(index) + name: value for name, value in logged.items()}
            self.log_dict(prefixed, batch_size=tokens.shape[0])

    def on_test_epoch_end(self) -> None:
        for index, model in enumerate(self.models):
            computed = model.comparison_metrics.compute()
            self.log_dict({_prefix(index) + name: value for name, value in computed.items()})
            model.comparison_metrics.reset()


def split_metrics(metrics: dict[str, Any], n_models: int) -> list[dict[str, Any]]:
    """The metrics of each model of a `GroupEvaluation` of `n_models`, unprefixed."""
    split: list[dict[str, Any]] = [{} for _ in range(n_models)]
    for name, value in metrics.items():
        model, _, rest = name.partition("/")
        split[int(model.removeprefix("model_"))][rest] = value
    return split
