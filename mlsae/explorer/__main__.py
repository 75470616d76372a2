"""Serve the explorer: `python -m mlsae.explorer --repo_id <hub id or local dir>`, or for a
stack of per-layer SAEs, `python -m mlsae.explorer --sae 'saes/layer_{layer}' --model_name
<transformer>`."""

import argparse
import difflib
import logging
import os
from pathlib import Path

import torch
from fastapi import FastAPI

from mlsae.analysis.examples import Examples
from mlsae.analysis.identity import source_identity
from mlsae.analysis.prompt import PromptModel
from mlsae.analysis.source import load_stack_source
from mlsae.analysis.stack_prompt import check_explorable
from mlsae.cli import ConfigError
from mlsae.model.lightning import MLSAETransformer
from mlsae.names import cache_path, stack_name
from mlsae.utils import get_device

from .app import create_app
from .guards import DEFAULT_MAX_BODY_BYTES, WILDCARD_ADDRESSES, served_hosts
from .service import DEFAULT_CACHE_BYTES, ExamplesReader, ExplorerInputError

logger = logging.getLogger("mlsae.explorer")


def _mebibytes(text: str) -> float:
    """A size in MiB from the command line: a number not below 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a size in MiB, 0 or more, not {text!r}")
    return value


def _positive_int(text: str) -> int:
    """A count from the command line: a whole number, 1 or more."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number, 1 or more, not {text!r}")
    return value


def _port(text: str) -> int:
    """A TCP port from the command line: 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, not {text!r}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Ends each option's help with its default, unless the help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The explorer's command line; `--help` shows every option's default."""
    parser = argparse.ArgumentParser(
        prog="python -m mlsae.explorer",
        description="Explore a pretrained MLSAE in the browser: latent activations by "
        "layer and position, logits, reconstructions, steering and top examples. "
        "docs/explorer.md describes the page, its address and the API.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--repo_id",
        default=None,
        help="A pretrained -tfm model: a local folder (such as out/runs/<run>/model, which "
        "train.py saves) or a hub id (this, or --sae, is required).",
    )
    parser.add_argument(
        "--sae",
        nargs="+",
        default=None,
        metavar="PATH",
        help="Instead of --repo_id, a stack of per-layer SAEs over --model_name: local paths "
        "or hub ids, one per layer, or one pattern with {layer} in place of the block index "
        "(e.g. 'saes/layer_{layer}'). Each layer shows its own SAE's latents.",
    )
    parser.add_argument(
        "--layers",
        nargs="+",
        type=int,
        default=None,
        help="The layers to expand a --sae pattern over (default: the local files and "
        "folders that match it).",
    )
    parser.add_argument(
        "--prompt",
        default=None,
        help="The prompt the page opens on, unless its address names one (default: the "
        "context of the model's top example in the examples database, else a fixed "
        "sentence).",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="Address to listen on. Requests must name it or localhost in their Host "
        "header; for 0.0.0.0, or behind a proxy, name the hosts with --allowed_hosts.",
    )
    parser.add_argument("--port", type=_port, default=8000, help="Port to listen on.")
    parser.add_argument(
        "--examples",
        default=None,
        help="The top activating examples: a .db file from `python -m mlsae.analysis.examples`"
        " or an -examples dataset (default: the model's cache in --output_dir, else the "
        "hub's <repo_id>-examples for a hub model; without either, none are served).",
    )
    parser.add_argument("--output_dir", default="out", help="Where analysis caches live.")
    parser.add_argument(
        "--model_name",
        default=None,
        help="Where the transformer's config and tokenizer come from (default: the "
        "checkpoint's own model_name); with --sae, the transformer the SAEs read (required).",
    )
    parser.add_argument(
        "--device", default=None, help="Where the model runs (default: CUDA when available)."
    )
    parser.add_argument(
        "--allowed_hosts",
        action="extend",
        nargs="+",
        default=[],
        metavar="HOST",
        help="More host names to answer (repeatable, or several at once), as clients "
        "write them in the Host header, any port: this machine's name or address when "
        "listening on 0.0.0.0, the public name behind a proxy; *.example.org for its "
        "subdomains, * for any host (only behind a proxy that checks them). By default "
        "only --host, localhost, 127.0.0.1 and ::1 are answered; requests naming other "
        "hosts get 400, so that web pages cannot reach the server through DNS rebinding.",
    )
    parser.add_argument(
        "--cache_size",
        type=_positive_int,
        default=8,
        help="Prompts whose forward passes are kept, at most (--cache_mb bounds their memory).",
    )
    parser.add_argument(
        "--cache_mb",
        type=_mebibytes,
        default=DEFAULT_CACHE_BYTES / 2**20,
        help="Memory, in MiB, for the cached forward passes (3/4) and results (1/4); the "
        "least recently used go first (default: %(default)g).",
    )
    parser.add_argument(
        "--max_body_mb",
        type=_mebibytes,
        default=DEFAULT_MAX_BODY_BYTES / 2**20,
        help="The largest request body, in MiB; larger ones get 413 (default: %(default)g).",
    )
    parser.add_argument(
        "--max_prompt_tokens",
        type=_positive_int,
        default=None,
        help="The longest prompt in tokens (default: the model's context length).",
    )
    parser.add_argument(
        "--cors_origin",
        action="append",
        default=[],
        help="An origin allowed to call the API from another site (repeatable), e.g. "
        "http://localhost:3000 for the original's Next.js front end in development "
        "(default: none).",
    )
    return parser


def parse_args(args: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(args)


def check_model_options(options: argparse.Namespace) -> None:
    """A `ConfigError` unless the options name one model: --repo_id, or --sae with
    --model_name (and --layers only with --sae)."""
    if options.sae:
        if options.repo_id is not None:
            raise ConfigError("--sae and --repo_id each name what to explore: pass one of them")
        if options.model_name is None:
            raise ConfigError(
                "--sae needs --model_name, the transformer the SAEs read (hub id or local folder)"
            )
    elif options.repo_id is None:
        raise ConfigError("pass --repo_id (a pretrained MLSAE) or --sae (per-layer SAEs)")
    elif options.layers is not None:
        raise ConfigError("--layers expands a --sae pattern; an MLSAE has its own layers")


def looks_local(repo_id: str) -> bool:
    """Whether `repo_id` can only name a local folder, never a hub id (`name` or
    `owner/name`): it starts with `.`, `~` or `/`, holds a backslash or more than one
    `/`, or its first part is a local folder."""
    if repo_id.startswith((".", "~", "/")) or os.path.isabs(repo_id) or "\\" in repo_id:
        return True
    parts = repo_id.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def check_model_folder(repo_id: str) -> None:
    """Refuse a `--repo_id` that can only be a local folder and is none, before anything
    loads (and without asking the hub), naming the closest existing folder."""
    path = Path(repo_id).expanduser()
    if path.is_dir() or not looks_local(repo_id):
        return
    problem = "is a file, not a folder" if path.exists() else "does not exist"
    close = closest_folder(path)
    guess = f" (did you mean {close}?)" if close else ""
    raise ConfigError(
        f"--repo_id {repo_id} {problem}{guess}: pass the folder of a trained model "
        "(out/runs/<run>/model, which train.py saves) or a hub id"
    )


def closest_folder(path: Path) -> Path | None:
    """The existing folder that `path` names with one part misspelled: its first part that
    does not exist (its last, if all do) replaced by the closest folder name beside it, or
    None when no such folder exists."""
    parts = path.parts
    missing = next(
        (index for index in range(len(parts)) if not Path(*parts[: index + 1]).exists()),
        len(parts) - 1,
    )
    parent = Path(*parts[:missing])
    siblings = [child.name for child in parent.glob("*") if child.is_dir()]
    for name in difflib.get_close_matches(parts[missing], siblings, n=3):
        guess = parent.joinpath(name, *parts[missing + 1 :])
        if guess.is_dir():
            return guess
    return None


def find_examples(
    repo_id: str, examples: str | None, output_dir: str, model: object = None
) -> ExamplesReader | None:
    """The examples database to serve, or None (with a warning) when there is none.

    Given `model` (the `MLSAETransformer` served, or its `model_identity`), a database
    that another model wrote is refused with an `OutputOfAnotherModelError` that says to
    rerun the examples analysis (docs/analysis-outputs.md has the rules).
    """
    if examples is not None:
        path = Path(examples)
        if path.suffix != ".db" or model is not None:
            with Examples(examples, output_dir, model=model) as opened:
                path = opened.path
        return ExamplesReader(path)
    cached = cache_path(repo_id, "examples", "db", output_dir)
    if cached.is_file():
        if model is not None:
            Examples(repo_id, output_dir, model=model).close()
        return ExamplesReader(cached)
    hint = (
        f"no examples for {repo_id} in {output_dir}/: the examples panel stays empty. "
        f"Make them with `python -m mlsae.analysis.examples --repo_id {repo_id} ...`."
    )
    if os.path.isdir(repo_id):
        logger.warning(hint)
        return None
    try:
        with Examples(repo_id, output_dir, model=model) as imported:
            return ExamplesReader(imported.path)
    except Exception as error:  # the hub dataset may not exist or the hub be unreachable
        logger.warning("%s (%s: %s)", hint, type(error).__name__, error)
        return None


def load_stack(options: argparse.Namespace) -> tuple[PromptModel, ExamplesReader | None]:
    """The stack of per-layer SAEs of `--sae`, and its examples database: `--examples`, or
    the examples analysis's output for the same SAEs in `--output_dir` (never the hub)."""
    device = torch.device(options.device) if options.device else get_device()
    source = load_stack_source(options.sae, options.model_name, options.layers, device)
    check_explorable(source)
    cached = cache_path(stack_name(options.sae[0]), "examples", "db", options.output_dir)
    given = options.examples or (str(cached) if cached.is_file() else None)
    if given is None:
        logger.warning(
            "no examples for these SAEs in %s/: the examples panel stays empty. Make them with "
            "`python -m mlsae.analysis.examples --sae ... --model_name ...`.",
            options.output_dir,
        )
        return source, None
    identity = source_identity(source)
    return source, find_examples(cached.stem, given, options.output_dir, model=identity)


def build_app(
    options: argparse.Namespace, model: PromptModel, examples: ExamplesReader | None
) -> FastAPI:
    """The app that `main` serves for these command-line options."""
    return create_app(
        model,
        examples,
        repo_id=options.repo_id or " ".join(options.sae or []),
        cache_size=options.cache_size,
        cache_bytes=int(options.cache_mb * 2**20),
        max_prompt_tokens=options.max_prompt_tokens,
        cors_origins=options.cors_origin,
        allowed_hosts=served_hosts(options.host, options.allowed_hosts),
        max_body_bytes=int(options.max_body_mb * 2**20),
        opening_prompt=options.prompt,
    )


def main(args: list[str] | None = None) -> None:
    import uvicorn

    options = parse_args(args)
    check_model_options(options)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    model: PromptModel
    if options.sae:
        logger.info("loading %s over %s", " ".join(options.sae), options.model_name)
        model, examples = load_stack(options)
    else:
        check_model_folder(options.repo_id)
        overrides = {} if options.model_name is None else {"model_name": options.model_name}
        logger.info("loading %s", options.repo_id)
        model = MLSAETransformer.from_pretrained(options.repo_id, **overrides)
        model.to(torch.device(options.device) if options.device else get_device())
        examples = find_examples(options.repo_id, options.examples, options.output_dir, model=model)
    try:
        app = build_app(options, model, examples)
    except ExplorerInputError as error:  # only --prompt is checked against the model here
        raise ConfigError(f"--prompt: {error}") from error
    if options.host in WILDCARD_ADDRESSES and not options.allowed_hosts:
        logger.warning(
            "listening on every interface but answering only localhost: name the hosts "
            "clients use with --allowed_hosts"
        )
    logger.info("serving on http://%s:%d/", options.host, options.port)
    uvicorn.run(app, host=options.host, port=options.port)


if __name__ == "__main__":
    from mlsae.cli import run_command

    run_command(main)
