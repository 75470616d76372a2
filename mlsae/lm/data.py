"""Text -> fixed-length token blocks, batched for training, validation, testing and analysis.

The token stream matches the original implementation exactly, because test results,
dists and examples depend on it:

1. Documents are read in order and taken `GROUP_SIZE` (1,024) at a time.
2. Each group is joined into one string `EOS + doc_1 + EOS + doc_2 + ...`, where EOS is
   `tokenizer.eos_token`, and tokenised once, with no special tokens added beyond those
   literal EOS strings. A document over `MAX_DOCUMENT_CHARS` characters is tokenised in
   pieces cut at whitespace instead (see `mlsae.lm.token_stream`).
3. The tokens are cut into blocks of `max_length`, and the last block of each group is
   dropped. Like the original, it is dropped even when it happens to be complete. The
   dropped tokens are counted (`TokenBlocks.dropped_tokens`) and logged.

Blocks are numbered from 0 in stream order. A `TokenBlocks` dataset yields the blocks in
`[start_block, stop_block)` as batches `{"input_ids": LongTensor[batch_size, max_length]}`.
That range is what makes the stream resumable (start where a run stopped) and keeps
validation apart from training (validation reads the first `val_blocks` blocks, training
starts after them), when both read the same data.

Text comes from a Hugging Face hub dataset (streamed) or from local `.jsonl`, `.json`,
`.jsonl.zst` (or `.gz`, `.bz2`, `.xz`), `.parquet` and `.txt` files, given as one file, a
directory, or a glob (see `mlsae.lm.documents`). A document without text (a missing
or null text column) stops the stream with a `BadDocumentError` naming its file and
line, unless `skip_bad_documents`, which leaves it out and counts it. docs/data.md
describes the stream in full.
"""

import logging
from collections.abc import Iterator

import torch
from jaxtyping import Int
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from mlsae.cli import DEFAULT_TEST_PATH as DEFAULT_TEST_PATH
from mlsae.cli import DataConfig, batches_in, require_local_data

# Also re-exported: the parts of the stream, from the modules that define them.
from mlsae.lm.documents import GROUP_SIZE, SkippedDocument, describe_document, iter_text_groups
from mlsae.lm.documents import BadDocumentError as BadDocumentError
from mlsae.lm.documents import load_text_dataset as load_text_dataset
from mlsae.lm.token_stream import MAX_DOCUMENT_CHARS, concat_and_tokenize, load_tokenizer
from mlsae.lm.token_stream import split_long_document as split_long_document

logger = logging.getLogger(__name__)

DEFAULT_TRAIN_PATH = "monology/pile-uncopyrighted"
"""The hub dataset that the published models were trained on."""

Batch = dict[str, Int[Tensor, "batch pos"]]


max_steps = batches_in
"""The number of whole batches of `batch_size x max_length` tokens in `max_tokens`."""


class TokenBlocks(IterableDataset):
    """Batches of token blocks `[start_block, stop_block)` of a text dataset, in order.

    Each item is `{"input_ids": LongTensor[batch_size, max_length]}`; use it with
    `DataLoader(dataset, batch_size=None)` (see `make_dataloader`). The last batch holds
    fewer blocks when the range or the data ends inside it, unless `drop_last`.

    Counters of the latest iteration in this process (in worker processes, the workers'
    copies count): `documents_read`, `tokens_read`, `blocks_read` (kept blocks, including
    those before `start_block`), `dropped_tokens` (the last block of each group),
    `skipped_documents` (documents without text, left out with `skip_bad_documents`), and
    `next_block`, the block after the last one yielded.

    A document without text raises a `BadDocumentError` naming its file and line; with
    `skip_bad_documents` it is left out (the stream is that of the data without it) and a
    warning at the end of the pass gives the count. Documents over `max_document_chars`
    characters are tokenised in pieces (see `concat_and_tokenize`).

    Resuming: the blocks before `start_block` are still read and tokenised (their count
    depends on the tokenisation) but not yielded, so a dataset with `start_block = n`
    yields exactly what one with `start_block = 0` yields after its first `n` blocks.
    `state_dict()` / `load_state_dict()` carry `next_block`. Under Lightning or with
    workers, derive the position from the steps taken instead, since data loaders read
    ahead: `start_block = first_block + steps * accumulate_grad_batches * batch_size`.

    Workers and ranks: with `num_workers = W > 0` every worker reads the whole stream and
    yields batches `w, w + W, ...`, so the DataLoader returns the same batches in the same
    order as without workers (loading overlaps with compute, tokenisation is not shared
    out). Under torch.distributed, rank r of R likewise keeps batches `r, r + R, ...`.
    """

    def __init__(
        self,
        path: str,
        tokenizer: str | PreTrainedTokenizerBase,
        max_length: int,
        batch_size: int,
        *,
        split: str = "train",
        name: str | None = None,
        text_column: str = "text",
        start_block: int = 0,
        stop_block: int | None = None,
        drop_last: bool = False,
        group_size: int = GROUP_SIZE,
        skip_bad_documents: bool = False,
        max_document_chars: int = MAX_DOCUMENT_CHARS,
    ) -> None:
        super().__init__()
        if min(max_length, batch_size, group_size, max_document_chars) < 1:
            raise ValueError(
                "max_length, batch_size, group_size and max_document_chars must be positive, "
                f"got {max_length}, {batch_size}, {group_size}, {max_document_chars}"
            )
        if start_block < 0 or (stop_block is not None and stop_block < start_block):
            raise ValueError(f"invalid block range [{start_block}, {stop_block})")
        self.path = path
        self.tokenizer = load_tokenizer(tokenizer)
        self.max_length = max_length
        self.batch_size = batch_size
        self.split = split
        self.name = name
        self.text_column = text_column
        self.start_block = start_block
        self.stop_block = stop_block
        self.drop_last = drop_last
        self.group_size = group_size
        self.skip_bad_documents = skip_bad_documents
        self.max_document_chars = max_document_chars
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.documents_read = 0
        self.skipped_documents = 0
        self.tokens_read = 0
        self.blocks_read = 0
        self.dropped_tokens = 0
        self.next_block = self.start_block

    @property
    def max_batches(self) -> int | None:
        """The number of batches in the block range, if bounded (fewer if the data ends)."""
        if self.stop_block is None:
            return None
        n_blocks = self.stop_block - self.start_block
        if self.drop_last:
            return n_blocks // self.batch_size
        return -(-n_blocks // self.batch_size)

    def state_dict(self) -> dict[str, int]:
        return {"next_block": self.next_block}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume at `state_dict["next_block"]` on the next iteration."""
        next_block = state_dict["next_block"]
        if next_block < 0 or (self.stop_block is not None and next_block > self.stop_block):
            raise ValueError(f"next_block {next_block} lies outside [0, {self.stop_block}]")
        self.start_block = next_block
        self.next_block = next_block

    def _block_chunks(self) -> Iterator[Int[Tensor, "block pos"]]:
        """The kept blocks in `[start_block, stop_block)`, a group's worth at a time."""
        on_skip = self._skip if self.skip_bad_documents else None
        for texts in iter_text_groups(
            self.path, self.split, self.name, self.text_column, self.group_size, on_skip
        ):
            blocks, dropped = concat_and_tokenize(
                texts, self.tokenizer, self.max_length, self.max_document_chars
            )
            first = self.blocks_read
            self.documents_read += len(texts)
            self.tokens_read += blocks.numel() + dropped
            self.blocks_read += len(blocks)
            self.dropped_tokens += dropped
            logger.debug(
                "group of %d documents: %d blocks, %d tokens dropped",
                len(texts),
                len(blocks),
                dropped,
            )
            begin = max(self.start_block - first, 0)
            end = len(blocks) if self.stop_block is None else self.stop_block - first
            if begin < end:
                yield blocks[begin:end]
            if self.stop_block is not None and self.blocks_read >= self.stop_block:
                return

    def _skip(self, document: SkippedDocument) -> None:
        self.skipped_documents += 1
        if logger.isEnabledFor(logging.DEBUG):
            where = describe_document(document.part, document.index)
            logger.debug("skipped %s: no text in column %r", where, self.text_column)

    def _batches(self) -> Iterator[Int[Tensor, "batch pos"]]:
        pending: list[Tensor] = []
        n_pending = 0
        for chunk in self._block_chunks():
            pending.append(chunk)
            n_pending += len(chunk)
            if n_pending < self.batch_size:
                continue
            blocks = torch.cat(pending)
            n_whole = n_pending - n_pending % self.batch_size
            yield from blocks[:n_whole].split(self.batch_size)
            pending = [blocks[n_whole:]]
            n_pending -= n_whole
        if n_pending > 0 and not self.drop_last:
            yield torch.cat(pending)

    def __iter__(self) -> Iterator[Batch]:
        self._reset_counters()
        shard, n_shards = _shard()
        mine = None
        for index, batch in enumerate(self._batches()):
            self.next_block += len(batch)
            if index % n_shards == shard:
                mine = batch.clone()
            if index % n_shards == n_shards - 1:
                # Only whole rounds: every reader yields as many batches, so no rank of a
                # distributed run waits for a step the others never take.
                yield {"input_ids": mine}
        logger.info(
            "read %d documents of %r: %d tokens, %d blocks of %d (yielded up to block %d); "
            "dropped %d tokens, the last block of each group of %d documents",
            self.documents_read,
            self.path,
            self.tokens_read,
            self.blocks_read,
            self.max_length,
            self.next_block,
            self.dropped_tokens,
            self.group_size,
        )
        if self.skipped_documents:
            logger.warning(
                "skipped %d documents of %r without text in column %r (--skip_bad_documents)",
                self.skipped_documents,
                self.path,
                self.text_column,
            )
        if self.blocks_read == 0:
            raise ValueError(
                f"{self.path!r} holds no text to train on: no group of documents gives "
                f"a block of {self.max_length} tokens"
            )


def _shard() -> tuple[int, int]:
    """This reader's share of the batches: `(shard, n_shards)` over ranks and workers.

    Under torch.distributed, rank r of R keeps batches r, r + R, ...; each rank's
    workers split its share the same way, so the batches of one optimizer step over
    all ranks are consecutive batches of the stream. A last round that is not whole is
    dropped.
    """
    rank, world_size = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    worker = get_worker_info()
    worker_id, n_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
    return worker_id * world_size + rank, world_size * n_workers


class SinglePassLoader(DataLoader):
    """A DataLoader that goes over its stream once per process: iterated again (a new
    epoch), it yields nothing, so no text is ever trained on twice."""

    def __iter__(self) -> Iterator[Batch]:
        if getattr(self, "_passed", False):
            return iter(())
        self._passed = True
        return super().__iter__()


def make_dataloader(
    dataset: TokenBlocks, num_workers: int = 0, single_pass: bool = False
) -> DataLoader[Batch]:
    """A DataLoader over the batches that `dataset` forms itself."""
    loader_class = SinglePassLoader if single_pass else DataLoader
    return loader_class(dataset, batch_size=None, num_workers=num_workers)


def token_loader(
    path: str,
    tokenizer: str | PreTrainedTokenizerBase,
    max_length: int,
    batch_size: int,
    *,
    start_block: int = 0,
    stop_block: int | None = None,
    split: str = "train",
    name: str | None = None,
    text_column: str = "text",
    num_workers: int = 0,
    single_pass: bool = False,
    skip_bad_documents: bool = False,
) -> DataLoader[Batch]:
    """The batches of blocks `[start_block, stop_block)` of the token stream of `path`.

    Training reads from after the validation blocks (or where a resumed run stopped),
    validation the first blocks, evaluation and the analyses the first `max_tokens`
    tokens' worth. `single_pass`: yield nothing when iterated a second time in this
    process (so a new epoch never trains on text again).
    """
    dataset = TokenBlocks(
        path,
        tokenizer,
        max_length,
        batch_size,
        split=split,
        name=name,
        text_column=text_column,
        start_block=start_block,
        stop_block=stop_block,
        skip_bad_documents=skip_bad_documents,
    )
    return make_dataloader(dataset, num_workers, single_pass)


def data_loader(
    data: DataConfig,
    tokenizer: str | PreTrainedTokenizerBase,
    *,
    start_block: int = 0,
    stop_block: int | None = None,
    path: str | None = None,
    split: str | None = None,
    single_pass: bool = False,
) -> DataLoader[Batch]:
    """`token_loader` with the options of `data` (`path` and `split` may be overridden)."""
    return token_loader(
        path or data.path,
        tokenizer,
        data.max_length,
        data.batch_size,
        start_block=start_block,
        stop_block=stop_block,
        split=split or data.split,
        text_column=data.text_column,
        num_workers=data.num_workers,
        single_pass=single_pass,
        skip_bad_documents=data.skip_bad_documents,
    )


def held_out_stream(
    data: DataConfig, tokenizer: str | PreTrainedTokenizerBase
) -> DataLoader[Batch]:
    """The stream of `data` from its first block: `data.max_steps` batches, for
    evaluation and the analyses. Says how to get the Pile's test split where that default
    file is missing."""
    require_local_data(data.path)
    return data_loader(data, tokenizer, stop_block=data.max_steps * data.batch_size)
