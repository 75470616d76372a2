"""A stack of per-layer SAEs: one SAE per layer (and site) of one transformer, which the
analyses read as they read the layers of an MLSAE.

`load_sae_stack` takes a list of SAEs (local paths or hub ids) or one pattern with
`{layer}` where the path holds the block index (`saes/layer_{layer}`), expanded over the
given layers or, without them, over the local files and folders that match it. Each SAE
must say which block it reads, from its files or from the pattern's number; no two may
read the same (layer, site). Their widths (`d_sae`) may differ.
"""

import glob
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from mlsae.saes.base import SAE, SITES
from mlsae.saes.load import load_sae
from mlsae.saes.registry import SAEFileError

LAYER_FIELD = "{layer}"
"""What a pattern holds where the path has the block index."""


class SAEStack(nn.Module):
    """SAEs of one transformer, ordered by block, then by site (in the order of `SITES`)."""

    def __init__(self, saes: Sequence[SAE], names: Sequence[str], pattern: str | None = None):
        """
        Args:
            saes: The SAEs, each with its `layer` and `site` set.
            names: Where each was loaded from (path or hub id), for messages.
            pattern: The pattern they were expanded from, if they were.
        """
        super().__init__()
        if not saes:
            raise SAEFileError("a stack needs at least one SAE")
        for sae, name in zip(saes, names, strict=True):
            if sae.layer is None or sae.site is None:
                missing = "layer" if sae.layer is None else "site"
                raise SAEFileError(f"{name} does not say which {missing} it reads")
        order = sorted(range(len(saes)), key=lambda i: (saes[i].layer, SITES.index(saes[i].site)))
        self.saes = nn.ModuleList(saes[i] for i in order)
        self.names = [str(names[i]) for i in order]
        self.pattern = pattern
        seen: dict[tuple[int, str], str] = {}
        for sae, name in zip(self.saes, self.names, strict=True):
            where = (sae.layer, sae.site)
            if where in seen:
                raise SAEFileError(
                    f"{seen[where]} and {name} both read {sae.site} of block {sae.layer}: a "
                    "stack holds one SAE per layer and site"
                )
            seen[where] = name

    def __len__(self) -> int:
        return len(self.saes)

    def __iter__(self) -> Iterator[SAE]:
        return iter(self.saes)

    def __getitem__(self, index: int) -> SAE:
        return self.saes[index]

    @property
    def layers(self) -> list[int]:
        """The block each SAE reads, in the stack's order."""
        return [sae.layer for sae in self.saes]

    @property
    def sites(self) -> list[str]:
        """The site each SAE reads, in the stack's order."""
        return [sae.site for sae in self.saes]

    @property
    def n_latents(self) -> int:
        """The largest `d_sae`: latent indices of every SAE are below it."""
        return max(sae.d_sae for sae in self.saes)

    @property
    def source_name(self) -> str:
        """The stack as it was given: its pattern, else its first SAE's path or hub id."""
        return self.pattern or self.names[0]


def load_sae_stack(
    saes: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    layers: Sequence[int] | None = None,
    **options: Any,
) -> SAEStack:
    """Load a stack of per-layer SAEs (see the module's description).

    `saes` is a list of local paths or hub ids, or one pattern holding `{layer}`; `layers`
    expands the pattern (needed for hub ids; without it, the local paths that match the
    pattern are taken, the layer being the number in place of `{layer}`). `options` go to
    every `load_sae` call.
    """
    given = [saes] if isinstance(saes, str | os.PathLike) else list(saes)
    names = [str(name) for name in given]
    if not names:
        raise SAEFileError("no SAEs given")
    patterns = [name for name in names if LAYER_FIELD in name]
    if patterns and len(names) > 1:
        raise SAEFileError(
            f"give one pattern with {LAYER_FIELD} or a list of SAEs, not both ({patterns[0]})"
        )
    if patterns:
        numbered = expand_pattern(patterns[0], layers)
    elif layers is not None:
        raise SAEFileError(
            f"layers expand a pattern with {LAYER_FIELD} in it, and {names[0]} has none"
        )
    else:
        numbered = [(None, name) for name in names]
    loaded = [with_layer(load_sae(name, **options), name, number) for number, name in numbered]
    return SAEStack(loaded, [name for _, name in numbered], patterns[0] if patterns else None)


def expand_pattern(pattern: str, layers: Sequence[int] | None) -> list[tuple[int, str]]:
    """`(layer, path)` for each layer of `layers`, or for each local path that matches the
    pattern (in the order of their layers)."""
    if layers is not None:
        if not layers:
            raise SAEFileError(f"no layers to expand {pattern} over")
        return [(int(layer), pattern.replace(LAYER_FIELD, str(layer))) for layer in layers]
    local = os.path.expanduser(pattern)
    pieces = local.split(LAYER_FIELD)
    matcher = re.compile(
        re.escape(pieces[0])
        + "".join(
            ("(?P<layer>[0-9]+)" if index == 0 else "(?P=layer)") + re.escape(piece)
            for index, piece in enumerate(pieces[1:])
        )
    )
    found = []
    for path in glob.glob("*".join(glob.escape(piece) for piece in pieces)):
        match = matcher.fullmatch(path)
        if match is not None:
            found.append((int(match["layer"]), path))
    if not found:
        raise SAEFileError(
            f"no local file or folder matches {pattern} (with a block index in place of "
            f"{LAYER_FIELD}); for SAEs on the hub, name the layers (--layers)"
        )
    return sorted(found)


def with_layer(sae: SAE, name: str, number: int | None) -> SAE:
    """`sae`, its layer set from the pattern's `number` where its files say none; an
    `SAEFileError` when neither says one or the two disagree."""
    if sae.layer is None:
        if number is None:
            raise SAEFileError(
                f"{name} does not say which layer it reads: name the SAEs with a pattern that "
                f"holds {LAYER_FIELD} in place of the block index (saes/layer_{LAYER_FIELD})"
            )
        sae.layer = number
    elif number is not None and sae.layer != number:
        raise SAEFileError(
            f"{name} reads block {sae.layer} (its files say so), not the {number} of its path"
        )
    return sae
