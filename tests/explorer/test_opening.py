"""The prompt the page opens on: the server's `--prompt`, else the context of the model's
top example, else a fixed sentence; each as the model tokenises it."""

from pathlib import Path

import pytest

from mlsae.explorer import ExplorerInputError, create_app
from mlsae.explorer.opening import FALLBACK_PROMPT
from mlsae.model.lightning import MLSAETransformer
from tests.explorer.conftest import local_client, top_example


def opening(app) -> dict:
    response = local_client(app).get("/api/opening-prompt")
    assert response.status_code == 200, response.text
    return response.json()


def test_a_given_prompt_opens_the_page(model: MLSAETransformer, examples_db: Path) -> None:
    app = create_app(model, examples_db, opening_prompt="Return the sum of a and b.")
    assert opening(app) == {
        "prompt": "Return the sum of a and b.",
        "source": "option",
        "latent": None,
        "layer": None,
    }


def test_the_top_example_opens_the_page(model: MLSAETransformer, examples_db: Path) -> None:
    expected = top_example(model, examples_db)
    assert opening(create_app(model, examples_db)) == {
        "prompt": expected.text,
        "source": "example",
        "latent": expected.latent,
        "layer": expected.layer,
    }


def test_the_top_example_is_cut_to_the_longest_prompt(
    model: MLSAETransformer, examples_db: Path
) -> None:
    expected = top_example(model, examples_db, max_tokens=3)
    tokenizer = model.transformer.tokenizer
    assert len(tokenizer(expected.text)["input_ids"]) <= 3
    body = opening(create_app(model, examples_db, max_prompt_tokens=3))
    assert body["prompt"] == expected.text and body["latent"] == expected.latent


def test_without_examples_a_fixed_sentence_opens_the_page(model: MLSAETransformer) -> None:
    body = opening(create_app(model))
    assert body == {"prompt": FALLBACK_PROMPT, "source": "fallback", "latent": None, "layer": None}
    tokenizer = model.transformer.tokenizer
    first_two = tokenizer.decode(tokenizer(FALLBACK_PROMPT)["input_ids"][:2])
    assert opening(create_app(model, max_prompt_tokens=2))["prompt"] == first_two


@pytest.mark.parametrize(("prompt", "problem"), [("word " * 200, "tokens"), ("", "empty")])
def test_a_given_prompt_the_model_cannot_take_is_refused(
    model: MLSAETransformer, prompt: str, problem: str
) -> None:
    with pytest.raises(ExplorerInputError, match=problem):
        create_app(model, opening_prompt=prompt)
