"""A group of documents -> the tokens of `EOS + doc_1 + EOS + doc_2 + ...`, cut into blocks.

A group is tokenised as one string, as the original did. A document longer than
`MAX_DOCUMENT_CHARS` characters is tokenised in pieces instead, cut at whitespace, so
that the memory the tokenizer needs stays bounded; the other documents of its group are
tokenised as before, in runs split at the EOS that precedes and follows it. EOS is a
special token, which the tokenizer never merges with its neighbours, so their tokens
are those of the whole group.
"""

from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase

# A fast tokenizer keeps, for every token of the text it encodes at once, its id, its
# string, its offsets and masks: over a hundred bytes per character of text, so a single
# document of tens of megabytes needs gigabytes. A million characters bounds one piece's
# share to a few hundred megabytes, and lies far above ordinary documents, which keep
# the whole-group tokenisation and so exactly the tokens they always had.
MAX_DOCUMENT_CHARS = 1_000_000
"""Documents longer than this (in characters) are tokenised in pieces of at most this."""

_WHITESPACE = (" ", "\n", "\t", "\r", "\f", "\v")


def load_tokenizer(tokenizer: str | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Load a tokenizer by hub id or local directory, or pass one through; it needs EOS."""
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if tokenizer.eos_token is None:
        raise ValueError(
            f"the tokenizer {tokenizer.name_or_path!r} has no eos_token, "
            "which separates documents in the token stream"
        )
    return tokenizer


def split_long_document(text: str, max_chars: int = MAX_DOCUMENT_CHARS) -> list[str]:
    """`text` cut into pieces of at most `max_chars` characters, which join back into it.

    Each cut falls before the last run of whitespace (space, tab, line break) that
    starts within `max_chars` characters, so words stay whole and the whitespace starts
    the next piece; a piece with no such run is cut at `max_chars`.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = max(text.rfind(char, start + 1, end + 1) for char in _WHITESPACE)
        while cut > start and text[cut - 1].isspace():
            cut -= 1
        if cut <= start:  # no whitespace but at the start of the piece
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _encode(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return tokenizer(
        text,
        add_special_tokens=False,
        truncation=False,
        return_attention_mask=False,
        # The whole group is longer than model_max_length by design; no warning.
        verbose=False,
    )["input_ids"]


def _segment_tokens(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_chars: int
) -> Iterator[Int[Tensor, " token"]]:
    """The group's tokens, in runs split at the EOS before and after each long document."""
    eos = tokenizer.eos_token
    n_eos_tokens = len(_encode(eos, tokenizer))
    run: list[str] = []
    for text in texts:
        if len(text) <= max_chars:
            run.append(text)
            continue
        if run:
            yield torch.tensor(_encode(eos + eos.join(run), tokenizer), dtype=torch.long)
            run = []
        for index, piece in enumerate(split_long_document(text, max_chars)):
            # Every piece is encoded after an EOS, as it would be in the group, and only
            # the first keeps it.
            token_ids = _encode(eos + piece, tokenizer)
            yield torch.tensor(token_ids[n_eos_tokens if index else 0 :], dtype=torch.long)
    if run:
        yield torch.tensor(_encode(eos + eos.join(run), tokenizer), dtype=torch.long)


def group_tokens(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_document_chars: int = MAX_DOCUMENT_CHARS,
) -> list[int] | Int[Tensor, " token"]:
    """The tokens of `EOS + doc_1 + EOS + doc_2 + ...`: one list when every document has
    at most `max_document_chars` characters, else a tensor put together in pieces."""
    if all(len(text) <= max_document_chars for text in texts):
        return _encode(tokenizer.eos_token + tokenizer.eos_token.join(texts), tokenizer)
    return torch.cat(list(_segment_tokens(texts, tokenizer, max_document_chars)))


def concat_and_tokenize(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_document_chars: int = MAX_DOCUMENT_CHARS,
) -> tuple[Int[Tensor, "block pos"], int]:
    """Tokenise one group of documents into blocks, as the original did.

    Returns the kept blocks and the number of tokens dropped: those of the last block,
    which is dropped whether or not it is complete. Documents longer than
    `max_document_chars` characters are tokenised in pieces (see `split_long_document`).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    token_ids = group_tokens(texts, tokenizer, max_document_chars)
    n_chunks = -(-len(token_ids) // max_length)
    n_kept = max(n_chunks - 1, 0) * max_length
    kept = token_ids[:n_kept]
    if not isinstance(kept, Tensor):
        kept = torch.tensor(kept, dtype=torch.long)
    return kept.view(-1, max_length), len(token_ids) - n_kept
