"""Logits as the explorer keeps them: per position, the few largest entries of a
`[pos, vocab]` tensor, as small tensors on the CPU rather than the dense logits or a
response's many objects, and their conversion to the API's rows when a request asks."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mlsae.analysis.interventions import SplicedLogits

from . import schemas


@dataclass(frozen=True)
class TopEntries:
    """Per position, the `n` largest (or smallest) entries of a `[pos, vocab]` tensor."""

    ids: Int[Tensor, "pos n"]
    values: Float[Tensor, "pos n"]
    probs: Float[Tensor, "pos n"] | None = None
    """The softmax probabilities of the entries, for logits."""


@dataclass(frozen=True)
class LogitComparison:
    """An intervention's logits against the model's own, per position."""

    top: TopEntries
    """The largest logits after the intervention, with their probabilities."""
    increased: TopEntries
    """The largest rises in logit."""
    decreased: TopEntries
    """The largest falls in logit."""
    kl_div: Float[Tensor, " pos"]
    """KL(intervened || model's own) of the next-token distributions, in nats."""


def _compact(tensor: Tensor) -> Tensor:
    """A copy on the CPU that owns just its elements, not a view of a larger tensor."""
    return tensor.detach().to("cpu", copy=True).contiguous()


def largest_logits(logits: Float[Tensor, "pos vocab"], n: int) -> TopEntries:
    """The `n` largest logits at each position (at most the vocabulary), with their
    probabilities."""
    n = min(n, logits.shape[-1])
    values, ids = logits.topk(n, dim=-1)
    probs = logits.softmax(-1).gather(-1, ids)
    return TopEntries(
        ids=_compact(ids.to(torch.int32)),
        values=_compact(values.float()),
        probs=_compact(probs.float()),
    )


def largest_changes(change: Float[Tensor, "pos vocab"], n: int, largest: bool) -> TopEntries:
    """The `n` largest (or, with `largest` False, smallest) changes at each position."""
    n = min(n, change.shape[-1])
    values, ids = change.topk(n, dim=-1, largest=largest)
    return TopEntries(ids=_compact(ids.to(torch.int32)), values=_compact(values.float()))


def compare_logits(logits: SplicedLogits, n: int) -> LogitComparison:
    """The top `n` logits after an intervention, the `n` largest rises and falls, and the
    KL divergence from the model's own distribution."""
    change = logits.spliced - logits.own
    return LogitComparison(
        top=largest_logits(logits.spliced, n),
        increased=largest_changes(change, n, largest=True),
        decreased=largest_changes(change, n, largest=False),
        kl_div=_compact(logits.kl_div.float()),
    )


def logit_rows(entries: TopEntries, token_text: Callable[[int], str]) -> list[list[schemas.Logit]]:
    """The API's rows of `Logit`s, one row per position."""
    ids, values = entries.ids.tolist(), entries.values.tolist()
    if entries.probs is None:
        return [
            [
                schemas.Logit(id=token_id, token=token_text(token_id), logit=value)
                for token_id, value in zip(row_ids, row_values, strict=True)
            ]
            for row_ids, row_values in zip(ids, values, strict=True)
        ]
    return [
        [
            schemas.Logit(id=token_id, token=token_text(token_id), logit=value, prob=prob)
            for token_id, value, prob in zip(*row, strict=True)
        ]
        for row in zip(ids, values, entries.probs.tolist(), strict=True)
    ]


def logit_changes(
    comparison: LogitComparison, layer: int, block: int, token_text: Callable[[int], str]
) -> schemas.LogitChanges:
    """The API's answer for an intervention at `layer` (the transformer's `block`)."""
    return schemas.LogitChanges(
        layer=layer,
        block=block,
        top=logit_rows(comparison.top, token_text),
        increased=logit_rows(comparison.increased, token_text),
        decreased=logit_rows(comparison.decreased, token_text),
        kl_div=comparison.kl_div.tolist(),
    )
