"""The explorer's caches: least recently used entries evicted first, bounded by count and
by bytes, each entry's size measured once when it is stored."""

import dataclasses
import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from torch import Tensor

T = TypeVar("T")

_SCALARS = (str, bytes, int, float, bool, type(None))


def nbytes(value: Any, seen: set[tuple] | None = None) -> int:
    """The memory `value` holds: the storage of its tensors (each storage once, however many
    views share it, wherever it lives), plus `sys.getsizeof` of the Python objects around
    them. Handles scalars, strings, tuples (named ones too), lists, dicts and dataclasses;
    anything else raises TypeError rather than being counted as free."""
    seen = set() if seen is None else seen
    if isinstance(value, Tensor):
        storage = value.untyped_storage()
        key = (storage.data_ptr(), str(storage.device))
        if storage.data_ptr() and key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(value, _SCALARS):
        return sys.getsizeof(value)
    if isinstance(value, tuple | list | set | frozenset):
        return sys.getsizeof(value) + sum(nbytes(item, seen) for item in value)
    if isinstance(value, dict):
        items = sum(nbytes(key, seen) + nbytes(item, seen) for key, item in value.items())
        return sys.getsizeof(value) + items
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = sum(nbytes(getattr(value, item.name), seen) for item in dataclasses.fields(value))
        attributes = sys.getsizeof(vars(value)) if hasattr(value, "__dict__") else 0
        return sys.getsizeof(value) + attributes + fields
    raise TypeError(f"cannot measure the memory of a {type(value).__name__}")


def entry_nbytes(key: Hashable, value: Any) -> int:
    """What one cache entry holds: its key (prompts can be long) and its value."""
    seen: set[tuple] = set()
    return nbytes(key, seen) + nbytes(value, seen)


class LRUCache:
    """At most `maxsize` entries and `max_bytes` bytes (None: no bound), the least recently
    used evicted first. A value larger than `max_bytes` on its own is returned but not kept.
    Sizes come from `sizeof(key, value)`, measured once when the entry is stored."""

    def __init__(
        self,
        maxsize: int | None = None,
        max_bytes: int | None = None,
        sizeof: Callable[[Hashable, Any], int] = entry_nbytes,
    ) -> None:
        if maxsize is not None and maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, got {max_bytes}")
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self.sizeof = sizeof
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self.nbytes = 0
        """The bytes the kept entries hold, as `sizeof` measured them."""
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.too_large = 0
        """Values computed but not kept, each larger than `max_bytes` on its own."""

    def get_or_compute(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The value kept for `key`, else `compute()`, kept if it fits."""
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        value = compute()
        self.put(key, value)
        return value

    def put(self, key: Hashable, value: Any) -> bool:
        """Keep `value` for `key` unless it is larger than the whole budget; evict the least
        recently used entries until the bounds hold. Returns whether it was kept."""
        self.discard(key)
        size = self.sizeof(key, value)
        if self.max_bytes is not None and size > self.max_bytes:
            self.too_large += 1
            return False
        self._items[key] = value
        self._sizes[key] = size
        self.nbytes += size
        while self._over_bounds():
            oldest = next(iter(self._items))
            self.discard(oldest)
            self.evictions += 1
        return True

    def _over_bounds(self) -> bool:
        too_many = self.maxsize is not None and len(self._items) > self.maxsize
        too_big = self.max_bytes is not None and self.nbytes > self.max_bytes
        return too_many or too_big

    def discard(self, key: Hashable) -> None:
        if key in self._items:
            del self._items[key]
            self.nbytes -= self._sizes.pop(key)

    def size_of(self, key: Hashable) -> int:
        """The bytes recorded for the entry kept for `key`."""
        return self._sizes[key]

    def keys(self) -> list[Hashable]:
        """The keys kept, least recently used first."""
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def clear(self) -> None:
        self._items.clear()
        self._sizes.clear()
        self.nbytes = 0
