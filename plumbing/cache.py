"""A read-through cache for hot point reads, kept exact by the change notifications.

Entries live in partitions (an operator's data, say). Every committed change to a partition
invalidates it: at once on this replica (the writer calls `invalidate` after its commit), and on
every other replica through the notifier (PostgreSQL LISTEN/NOTIFY). While the cross-replica link
is down, the cache is bypassed, and it starts empty when the link comes back.

A read that raced with a change is not stored: `fill` takes the partition's generation from
before the read and drops the value if the partition changed meanwhile.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

from plumbing.changelog import ANY_KEY

V = TypeVar("V")
MISSING = object()


class ReadCache(Generic[V]):
    def __init__(self, max_entries: int, usable: Callable[[], bool] = lambda: True) -> None:
        self._max = max_entries
        self._usable = usable
        self._entries: OrderedDict[tuple[str, Hashable], V] = OrderedDict()
        self._generations: dict[str, int] = {}
        self._epoch = 0  # bumped when everything is invalidated

    def get(self, partition: str, key: Hashable) -> V | object:
        """The cached value, or MISSING."""
        if not self._usable():
            return MISSING
        slot = (partition, key)
        value = self._entries.get(slot, MISSING)
        if value is not MISSING:
            self._entries.move_to_end(slot)
        return value

    def generation(self, partition: str) -> tuple[int, int]:
        return (self._epoch, self._generations.get(partition, 0))

    def fill(self, partition: str, key: Hashable, value: V, generation: tuple[int, int]) -> None:
        if not self._usable() or generation != self.generation(partition):
            return
        self._entries[(partition, key)] = value
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def invalidate(self, partitions: Iterable[str]) -> None:
        """Forget these partitions (ANY_KEY: everything)."""
        keys = set(partitions)
        if ANY_KEY in keys:
            self._epoch += 1
            self._entries.clear()
            return
        for partition in keys:
            self._generations[partition] = self._generations.get(partition, 0) + 1
        for slot in [s for s in self._entries if s[0] in keys]:
            del self._entries[slot]
