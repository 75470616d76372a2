"""The data loaders where the original published them (`mlsae.lm.data` defines the stream).

`get_train_dataloader` and `get_test_dataloader` keep the original's positional arguments
(a tokenizer or model name may stand for `model_name`) and read the same token stream;
both are `mlsae.lm.data.token_loader` over a range of blocks.
"""

from transformers import PreTrainedTokenizerBase

from mlsae.cli import DataConfig
from mlsae.lm.data import DEFAULT_TEST_PATH, DEFAULT_TRAIN_PATH, max_steps, token_loader

__all__ = ["DataConfig", "get_test_dataloader", "get_train_dataloader"]


def get_train_dataloader(
    path: str = DEFAULT_TRAIN_PATH,
    tokenizer: str | PreTrainedTokenizerBase = "EleutherAI/pythia-70m-deduped",
    max_length: int = 2048,
    batch_size: int = 1,
    num_workers: int = 0,
    *,
    max_tokens: int | float | None = None,
    val_blocks: int = 0,
    skip_batches: int = 0,
    split: str = "train",
    text_column: str = "text",
    single_pass: bool = False,
    skip_bad_documents: bool = False,
):
    """The training stream of `path`: every block after the first `val_blocks` (held out
    for validation), from `skip_batches` batches in, up to `max_tokens` tokens' worth of
    batches counted from the start of training."""
    start_block = val_blocks + skip_batches * batch_size
    stop_block = None
    if max_tokens is not None:
        stop_block = max(
            val_blocks + max_steps(max_tokens, batch_size, max_length) * batch_size, start_block
        )
    return token_loader(
        path,
        tokenizer,
        max_length,
        batch_size,
        start_block=start_block,
        stop_block=stop_block,
        split=split,
        text_column=text_column,
        num_workers=num_workers,
        single_pass=single_pass,
        skip_bad_documents=skip_bad_documents,
    )


def get_test_dataloader(
    tokenizer: str | PreTrainedTokenizerBase,
    max_length: int,
    batch_size: int,
    num_workers: int = 0,
    *,
    path: str = DEFAULT_TEST_PATH,
    max_tokens: int | float | None = None,
    split: str = "test",
    text_column: str = "text",
    skip_bad_documents: bool = False,
):
    """The test stream (`data/test.jsonl.zst` by default) from its first block, up to
    `max_tokens` tokens' worth of batches."""
    stop_block = None
    if max_tokens is not None:
        stop_block = max_steps(max_tokens, batch_size, max_length) * batch_size
    return token_loader(
        path,
        tokenizer,
        max_length,
        batch_size,
        stop_block=stop_block,
        split=split,
        text_column=text_column,
        num_workers=num_workers,
        skip_bad_documents=skip_bad_documents,
    )
