"""Taking turns: the SAEs of a sweep train in threads (one Lightning trainer each) that run
one at a time, in a fixed order, one micro-batch per turn; and the token stream they share.

Only the thread that holds the turn runs, so the SAEs' steps run one after another, in the
same order at every micro-batch, on the residual stream that the first one computed.
"""

import threading
from collections.abc import Iterable, Iterator
from typing import Any


class SweepAborted(Exception):
    """Another SAE of the sweep failed; this one stops too."""


class Turns:
    """Whose turn it is among `n` threads, in order 0..n-1, skipping those that finished.

    Each thread waits on an event of its own, so that a turn wakes only the thread whose
    turn it is: the others, left asleep, never ask for the interpreter's lock while it runs.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.current = 0
        self.done = [False] * n
        self.failed: BaseException | None = None
        self._lock = threading.Lock()
        self._go = [threading.Event() for _ in range(n)]
        self._go[0].set()

    def take(self, i: int) -> None:
        """Wait for thread `i`'s turn (`SweepAborted` if another thread failed)."""
        self._go[i].wait()
        if self.failed is not None:
            raise SweepAborted(f"stopped because another SAE failed: {self.failed}")

    def give(self, i: int) -> None:
        """End thread `i`'s turn: the next unfinished thread goes."""
        with self._lock:
            if self.current != i:
                return
            for step in range(1, self.n + 1):
                candidate = (i + step) % self.n
                if not self.done[candidate]:
                    self.current = candidate
                    break
            if self.current != i:
                self._go[i].clear()
                self._go[self.current].set()

    def finish(self, i: int, error: BaseException | None = None) -> None:
        """Thread `i` is done (with `error`, which stops the others)."""
        with self._lock:
            self.done[i] = True
        if error is not None:
            self.abort(error)
        self.give(i)

    def abort(self, error: BaseException) -> None:
        with self._lock:
            if self.failed is None:
                self.failed = error
            for event in self._go:
                event.set()


class SharedBatches:
    """One token stream read by `readers` trainers: each batch is taken from `loader` once,
    by the first reader that asks, and dropped once every reader has had it. `view(i)` is
    what reader `i`'s trainer iterates (each epoch of the views is an epoch of `loader`)."""

    def __init__(self, loader: Iterable[Any], readers: int) -> None:
        self.loader = loader
        self.readers = readers
        self._iterators: dict[int, Iterator[Any]] = {}
        self._buffer: dict[tuple[int, int], list[Any]] = {}

    def _get(self, epoch: int, index: int) -> Any:
        key = (epoch, index)
        if key not in self._buffer:
            if epoch not in self._iterators:
                self._iterators[epoch] = iter(self.loader)
            try:
                item: Any = next(self._iterators[epoch])
            except StopIteration:
                item = StopIteration
            self._buffer[key] = [item, self.readers]
        entry = self._buffer[key]
        entry[1] -= 1
        if not entry[1]:
            del self._buffer[key]
        return entry[0]

    def view(self, reader: int) -> "_View":
        return _View(self)


class _View:
    def __init__(self, shared: SharedBatches) -> None:
        self.shared = shared
        self.epochs = 0
        # What the progress bar reads its total from, as from a DataLoader.
        self.dataset = getattr(shared.loader, "dataset", None)

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epochs
        self.epochs += 1
        index = 0
        while True:
            item = self.shared._get(epoch, index)
            if item is StopIteration:
                return
            yield item
            index += 1
