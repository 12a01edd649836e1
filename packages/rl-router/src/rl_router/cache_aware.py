"""`CacheAwarePolicy`: send requests that share a token prefix to the engine that already holds it in its KV cache.

The n samples of one prompt and the turns of one conversation share a prefix; an engine that served it
can skip recomputing that prefix (SGLang's radix cache). Prefixes are remembered as chained hashes of
`block_size`-token blocks (plus the whole sequence), in a bounded LRU map hash -> engine. Affinity
yields to load: when the owner has more than `imbalance_threshold` requests in flight beyond the least
loaded engine, the least loaded engine is chosen (and becomes the owner).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, Sequence

from rl_router.policies import LeastOutstandingPolicy


def prefix_keys(sequence: Sequence[Any], block_size: int, max_tokens: int) -> list[int]:
    """Hashes of `sequence[:k]` for k at each block boundary up to `max_tokens`, then of the whole sequence
    (when it is within `max_tokens` and not on a boundary); shortest first."""
    keys: list[int] = []
    key = 0
    end = min(len(sequence), max_tokens)
    for start in range(0, end - block_size + 1, block_size):
        key = hash((key, tuple(sequence[start : start + block_size])))
        keys.append(key)
    tail = len(sequence) % block_size
    if tail and len(sequence) <= max_tokens:
        keys.append(hash((key, tuple(sequence[-tail:]), "end")))
    return keys


def _sequence(payload: Mapping[str, Any]) -> Sequence[Any]:
    ids = payload.get("input_ids")
    if isinstance(ids, list):
        return ids
    text = payload.get("text")
    return text if isinstance(text, str) else ()


class CacheAwarePolicy:
    """Prefix affinity with a least-outstanding fallback; `hits`, `spills` and `misses` count the choices."""

    def __init__(
        self,
        *,
        block_size: int = 64,
        max_prefix_tokens: int = 8192,
        max_entries: int = 200_000,
        imbalance_threshold: int = 8,
    ):
        for name, value in (("block_size", block_size), ("max_prefix_tokens", max_prefix_tokens),
                            ("max_entries", max_entries)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if imbalance_threshold < 0:
            raise ValueError(f"imbalance_threshold must be at least 0, got {imbalance_threshold}")
        self.block_size = block_size
        self.max_prefix_tokens = max_prefix_tokens
        self.max_entries = max_entries
        self.imbalance_threshold = imbalance_threshold
        self._owners: OrderedDict[int, str] = OrderedDict()
        self._fallback = LeastOutstandingPolicy()
        self.hits = self.spills = self.misses = 0

    def __len__(self) -> int:
        return len(self._owners)

    def choose(self, outstanding: Mapping[str, int]) -> str:
        return self._fallback.choose(outstanding)

    def choose_for(self, payload: Mapping[str, Any], outstanding: Mapping[str, int]) -> str:
        keys = self._keys(_sequence(payload))
        owner = next((self._owners[k] for k in reversed(keys) if self._owners.get(k) in outstanding), None)
        if owner is None:
            self.misses += 1
            chosen = self._fallback.choose(outstanding)
        elif outstanding[owner] - min(outstanding.values()) > self.imbalance_threshold:
            self.spills += 1
            chosen = self._fallback.choose(outstanding)
        else:
            self.hits += 1
            chosen = owner
        self._remember(keys, chosen)  # at once, so the other samples of a prompt sent together follow
        return chosen

    def observe(self, payload: Mapping[str, Any], response: Mapping[str, Any], engine: str) -> None:
        """After an answer, the engine also caches prompt + output: the prefix of the conversation's next turn."""
        sequence = _sequence(payload)
        full: Sequence[Any]
        if isinstance(sequence, str):
            text = response.get("text")
            full = sequence + (text if isinstance(text, str) else "")
        else:
            ids = response.get("output_ids")
            full = [*sequence, *(ids if isinstance(ids, list) else [])]
        self._remember(self._keys(full), engine)

    def snapshot(self) -> dict[str, float]:
        return {
            "router/cache_aware/hits": float(self.hits),
            "router/cache_aware/spills": float(self.spills),
            "router/cache_aware/misses": float(self.misses),
            "router/cache_aware/prefixes": float(len(self._owners)),
        }

    def _keys(self, sequence: Sequence[Any]) -> list[int]:
        return prefix_keys(sequence, self.block_size, self.max_prefix_tokens)

    def _remember(self, keys: list[int], engine: str) -> None:
        owners = self._owners
        for key in keys:
            owners[key] = engine
            owners.move_to_end(key)
        while len(owners) > self.max_entries:
            owners.popitem(last=False)
