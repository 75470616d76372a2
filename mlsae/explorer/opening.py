"""The prompt the page opens on: the one the server was started with (`--prompt`), else the
context of the model's top example in the examples database (the text around the token at
which a latent fires most strongly, so text of the kind the model was trained on), else a
fixed sentence. Each is cut to the longest prompt served."""

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from .examples_reader import ExamplesReader
from .schemas import OpeningPrompt

FALLBACK_PROMPT = "When Mary and John went to the store, John gave a drink to"
"""The opening prompt of a server given neither `--prompt` nor examples."""


def choose_opening_prompt(
    given: str | None,
    examples: ExamplesReader | None,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
    token_ids: Callable[[str], list[int]],
) -> OpeningPrompt:
    """The opening prompt: `given`, else the top example's context, else `FALLBACK_PROMPT`
    (each of the last two as much of it as the server takes).

    Args:
        given: The prompt the server was started with (checked by the caller), or None.
        examples: The examples database served, or None.
        tokenizer: The model's tokenizer, which decodes the example's tokens.
        max_tokens: The longest prompt served, in tokens.
        token_ids: The server's tokenisation of a prompt, which raises a ValueError for a
            prompt it does not take.
    """
    if given is not None:
        return OpeningPrompt(prompt=given, source="option")
    top = examples.top() if examples is not None else None
    if top is not None:
        text = fitting_text(top.token_ids, tokenizer, max_tokens, token_ids)
        if text is not None:
            return OpeningPrompt(prompt=text, source="example", latent=top.latent, layer=top.layer)
    fallback = tokenizer(FALLBACK_PROMPT)["input_ids"]
    text = fitting_text(fallback, tokenizer, max_tokens, token_ids)
    return OpeningPrompt(prompt=text or FALLBACK_PROMPT, source="fallback")


def fitting_text(
    ids: list[int],
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
    token_ids: Callable[[str], list[int]],
) -> str | None:
    """The text of `ids` without special tokens, its first `max_tokens` tokens or fewer: cut
    from the end until `token_ids` takes it (decoded text may tokenise into more tokens than
    it came from). None if nothing of it is left but whitespace."""
    context = list(ids[:max_tokens])
    while context:
        text = tokenizer.decode(context, skip_special_tokens=True)
        if text.strip() and _takes(token_ids, text):
            return text
        context.pop()
    return None


def _takes(token_ids: Callable[[str], list[int]], text: str) -> bool:
    try:
        token_ids(text)
    except ValueError:
        return False
    return True
