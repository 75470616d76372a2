"""The SAE file formats `load_sae` knows: each names the files that mark it and turns a
folder (or one file) of them into an `SAE`. A format registers itself in its module under
`mlsae.saes.formats`."""

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlsae.cli import UserError
from mlsae.saes.base import SAE


class SAEFileError(UserError, ValueError):
    """Files that are not the SAE they claim to be: an unknown format, a missing tensor,
    shapes that disagree with the config, a hookpoint that is not there."""


@dataclass(frozen=True)
class Format:
    name: str
    """The value of `load_sae(..., format=)`."""

    marks: tuple[str, ...]
    """File names (in a folder) that together say the folder is in this format."""

    load: Callable[..., SAE]
    """`load(path, **options)`: `path` a folder holding `marks`, or one file."""

    file_suffixes: tuple[str, ...] = ()
    """Suffixes of single files this format reads when no folder marks say otherwise."""

    claims: Callable[[Path], bool] | None = None
    """Whether a folder that holds `marks` is in this format, from what they say (for
    marks that other formats share, such as `config.json`); None: the marks suffice."""

    def marks_folder(self, folder: Path) -> bool:
        """Whether `folder` is in this format: it holds every mark, and the format claims it."""
        if not self.marks or not all((folder / name).is_file() for name in self.marks):
            return False
        return self.claims is None or self.claims(folder)


FORMATS: dict[str, Format] = {}
"""Every known format by name, in the order folders are matched against them."""


def register(format: Format) -> Format:
    FORMATS[format.name] = format
    return format


def detect(path: Path) -> Format:
    """The format of the folder or file `path`, from its files; SAEFileError when none
    matches (naming what was found and the formats known)."""
    folder = path if path.is_dir() else path.parent
    if path.is_dir() or path.name in {m for f in FORMATS.values() for m in f.marks}:
        for candidate in FORMATS.values():
            if candidate.marks_folder(folder):
                return candidate
    if path.is_file():
        for candidate in FORMATS.values():
            if path.name.endswith(candidate.file_suffixes):
                return candidate
    found = sorted(p.name for p in folder.iterdir())[:12] if folder.is_dir() else []
    raise SAEFileError(
        f"{path} is in no known SAE format (found: {', '.join(found) or 'nothing'}); pass "
        f"format= one of {', '.join(FORMATS)}, or subfolder= when it holds several SAEs"
    )


def unknown_options(options: dict[str, Any], format: str) -> None:
    """SAEFileError naming options that the format does not take."""
    if options:
        raise SAEFileError(f"the {format} format takes no option {', '.join(sorted(options))}")


def check_options(format: Format, options: dict[str, Any]) -> None:
    """SAEFileError naming the options that `format.load` does not take, and those it does."""
    parameters = list(inspect.signature(format.load).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    taken = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(taken))
    if unknown:
        offered = f"its options: {', '.join(taken)}" if taken else "it takes none"
        raise SAEFileError(
            f"the {format.name} format takes no option {', '.join(unknown)} ({offered})"
        )
