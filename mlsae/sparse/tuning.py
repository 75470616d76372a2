"""The sizes the fast paths are tuned with, in one place.

None of these changes a result beyond float rounding; each trades memory traffic against
call overhead, and docs/performance.md gives the measurements behind the defaults. Read
them through `TUNING` at call time; tests change them for a block with `tuned(...)`.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields


@dataclass
class Tuning:
    """Sizes of the CPU fast paths."""

    encode_chunk_bytes: int = 16 * 2**20
    """The encoder computes and searches its pre-activations about this many bytes of rows
    at a time, into one buffer reused by every chunk: a chunk is still in the cache when
    its top-k runs, and a buffer below the allocator's mmap threshold is not page-faulted
    in afresh every step."""

    min_encode_chunk_rows: int = 512
    """The fewest rows the encoder multiplies at a time: the BLAS packs the whole encoder
    weight for every matmul, whatever its rows, so small chunks repeat that work."""

    max_topk_groups: int = 16
    """The blocked top-k (without the C kernels) splits each row into at most this many
    interleaved groups of columns."""

    dense_decode_k_share: float = 1 / 16
    """The sparse backend decodes by a dense matmul from `k >= share * n_latents`, where
    gathering rows stops paying."""

    dense_auxk_dead_per_slot: int = 4
    """AuxK's selection is decoded and differentiated as dense products over the dead
    latents' columns where there are at most this many dead latents per AuxK slot: its
    entries then fill a quarter or more of those columns, and a matmul beats gathers."""

    cache_budget_bytes: int = 1 << 20
    """Sparse gathers work through column slices of the table of at most this many bytes,
    so that rows used again stay in a core's cache."""

    min_column_chunk: int = 64
    """The narrowest such slice: narrower ones cost more in calls than they save."""

    column_block: int = 4096
    """Decoder maintenance computes column dot products this many columns at a time,
    instead of a fresh `[n_inputs, n_latents]` product."""

    l2_budget_bytes: int = 1536 * 1024
    """Bytes of rows the C sparse backward keeps in one core's L2 cache at a time."""

    min_entries_per_visit: int = 4
    """The C sparse backward makes its tiles of vectors large enough that a latent has
    about this many entries in each: every visit of a latent loads its rows, which costs
    more than the cache misses a smaller tile saves."""

    min_parallel_terms: int = 1 << 18
    """Below this many multiply-adds a C kernel runs on one thread."""


TUNING = Tuning()
"""The sizes in use."""


@contextmanager
def tuned(**changes: float) -> Iterator[Tuning]:
    """Use other sizes within a block (for tests and benchmarks)."""
    names = {field.name for field in fields(Tuning)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise TypeError(f"unknown tuning sizes: {', '.join(unknown)}")
    saved = {name: getattr(TUNING, name) for name in changes}
    try:
        for name, value in changes.items():
            setattr(TUNING, name, value)
        yield TUNING
    finally:
        for name, value in saved.items():
            setattr(TUNING, name, value)
