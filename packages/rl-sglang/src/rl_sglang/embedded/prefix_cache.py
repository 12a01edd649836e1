"""Exact shared-prompt reuse: the KV slots of a prompt (all but its last token, which a new request
runs again to get its first logits) kept after their first request prefilled them, so the n samples
of one prompt, and later requests with the same prompt, prefill it once.

This is the case RL rollouts hit (n samples per prompt); SGLang's radix tree also reuses partial
prefixes, which this does not. Entries that no running request uses are evicted oldest first when
the pool runs short; `flush` drops them all (what `/flush_cache` and a weight update do).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from rl_sglang.embedded.kv_cache import TokenAllocator


@dataclass(eq=False)
class PrefixEntry:
    key: tuple[int, ...]
    slots: torch.Tensor | None = None  # None while its first request is still prefilling it
    refs: int = 1
    detached: bool = False  # flushed while in use: freed when the last user lets go

    @property
    def ready(self) -> bool:
        return self.slots is not None

    @property
    def tokens(self) -> int:
        return len(self.key)


class PrefixCache:
    def __init__(self, allocator: TokenAllocator, enabled: bool = True):
        self.allocator = allocator
        self.enabled = enabled
        self._entries: OrderedDict[tuple[int, ...], PrefixEntry] = OrderedDict()
        self.evictable_tokens = 0  # slots held by ready entries nobody uses

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key_of(prompt: list[int]) -> tuple[int, ...] | None:
        return tuple(prompt[:-1]) if len(prompt) >= 2 else None

    def lookup(self, prompt: list[int]) -> PrefixEntry | None:
        key = self.key_of(prompt) if self.enabled else None
        return None if key is None else self._entries.get(key)

    def open(self, prompt: list[int]) -> PrefixEntry | None:
        """A new entry that the calling request fills once its prompt is prefilled."""
        key = self.key_of(prompt) if self.enabled else None
        if key is None:
            return None
        entry = PrefixEntry(key)
        self._entries[key] = entry
        return entry

    def fill(self, entry: PrefixEntry, slots: torch.Tensor) -> None:
        entry.slots = slots

    def acquire(self, entry: PrefixEntry) -> None:
        if entry.refs == 0:
            self.evictable_tokens -= entry.tokens
        entry.refs += 1
        self._entries.move_to_end(entry.key)

    def release(self, entry: PrefixEntry) -> None:
        entry.refs -= 1
        if entry.refs > 0:
            return
        if entry.detached:
            assert entry.slots is not None, "only filled entries are shared"
            self.allocator.free(entry.slots)
        else:
            self.evictable_tokens += entry.tokens

    def abandon(self, entry: PrefixEntry) -> None:
        """Its filling request ended before the prompt was in the cache: forget it (the slots stay the request's)."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]

    def evict(self, needed: int) -> None:
        """Free unused entries, oldest first, until the allocator has `needed` slots (or none is left)."""
        for key in list(self._entries):
            if self.allocator.available >= needed:
                return
            entry = self._entries[key]
            if entry.slots is not None and entry.refs == 0:  # ready and unused
                del self._entries[key]
                self.evictable_tokens -= entry.tokens
                self.allocator.free(entry.slots)

    def flush(self) -> None:
        for entry in self._entries.values():
            if entry.slots is not None and entry.refs == 0:  # ready and unused
                self.allocator.free(entry.slots)
            else:
                entry.detached = True
        self._entries.clear()
        self.evictable_tokens = 0
