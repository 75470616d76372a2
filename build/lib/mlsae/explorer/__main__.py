"""Serve the explorer: `python -m mlsae.explorer --repo_id <hub id or local dir>`."""

import argparse
import logging
import os
from pathlib import Path

import torch

from mlsae.analysis.config import cache_path
from mlsae.analysis.examples import Examples
from mlsae.model.lightning import MLSAETransformer
from mlsae.utils import get_device

from .app import create_app
from .service import ExamplesReader

logger = logging.getLogger("mlsae.explorer")


def parse_args(args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mlsae.explorer",
        description="Explore a pretrained MLSAE in the browser: latent activations by "
        "layer and position, logits, reconstructions, steering and top examples.",
    )
    parser.add_argument(
        "--repo_id", required=True, help="A pretrained -tfm model: hub id or local folder."
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on.")
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
        help="Where the transformer's config and tokenizer come from, instead of the "
        "checkpoint's own model_name.",
    )
    parser.add_argument("--device", default=None, help="Default: CUDA when available.")
    parser.add_argument(
        "--cache_size", type=int, default=8, help="Prompts whose forward passes are kept."
    )
    parser.add_argument(
        "--max_prompt_tokens",
        type=int,
        default=None,
        help="The longest prompt in tokens (default: the model's context length).",
    )
    parser.add_argument(
        "--cors_origin",
        action="append",
        default=[],
        help="An origin allowed to call the API from another site (repeatable), e.g. "
        "http://localhost:3000 for the original's Next.js front end in development.",
    )
    return parser.parse_args(args)


def find_examples(repo_id: str, examples: str | None, output_dir: str) -> ExamplesReader | None:
    """The examples database to serve, or None (with a warning) when there is none."""
    if examples is not None:
        path = Path(examples)
        if path.suffix != ".db":
            path = Examples(examples, output_dir).path
        return ExamplesReader(path)
    cached = cache_path(repo_id, "examples", "db", output_dir)
    if cached.is_file():
        return ExamplesReader(cached)
    hint = (
        f"no examples for {repo_id} in {output_dir}/: the examples panel stays empty. "
        f"Make them with `python -m mlsae.analysis.examples --repo_id {repo_id} ...`."
    )
    if os.path.isdir(repo_id):
        logger.warning(hint)
        return None
    try:
        return ExamplesReader(Examples(repo_id, output_dir).path)
    except Exception as error:  # the hub dataset may not exist or the hub be unreachable
        logger.warning("%s (%s: %s)", hint, type(error).__name__, error)
        return None


def main(args: list[str] | None = None) -> None:
    import uvicorn

    options = parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    overrides = {} if options.model_name is None else {"model_name": options.model_name}
    logger.info("loading %s", options.repo_id)
    model = MLSAETransformer.from_pretrained(options.repo_id, **overrides)
    model.to(torch.device(options.device) if options.device else get_device())
    examples = find_examples(options.repo_id, options.examples, options.output_dir)
    app = create_app(
        model,
        examples,
        repo_id=options.repo_id,
        cache_size=options.cache_size,
        max_prompt_tokens=options.max_prompt_tokens,
        cors_origins=options.cors_origin,
    )
    logger.info("serving on http://%s:%d/", options.host, options.port)
    uvicorn.run(app, host=options.host, port=options.port)


if __name__ == "__main__":
    main()
