"""Trajectory radix tree (as in slime's router): text -> the exact tokens the engine saw and produced.

Agents speak text, but decode(encode(x)) is not x token for token (merges across turn boundaries,
normalisation), so re-tokenising a finished conversation does not give the tokens that were sampled
nor line up with their log-probs. The tree records every finished generation keyed by text; a new
request's text reuses the recorded tokens of its longest recorded prefix and only the new suffix is
tokenised. `retrieve_from_text` returns tokens, rollout log-probs and loss mask for training.

Nodes hold text fragments; a "checkpoint" node is a text prefix whose tokens are known and stores the
tokens added since its nearest checkpoint ancestor. Nodes made by splitting a fragment are structural
(no known token boundary there) and are never returned by a match. Memory is bounded by the total of
stored tokens, evicting least recently used leaves.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from rl_router.protocols import CallNext, RouterRequest


@dataclass
class Trajectory:
    """Token-level view of `text[:matched_chars]` (and, from `retrieve_from_text`, the rest tokenised).

    `loss_mask` is 1 for tokens an engine generated and 0 for prompt / tool / user tokens; `logprobs`
    are the rollout log-probs of generated tokens (0.0 elsewhere); `weight_versions` name the weights
    that generated each token (None for prompt tokens).
    """

    matched_chars: int
    token_ids: list[int]
    logprobs: list[float]
    loss_mask: list[int]
    weight_versions: list[str | None]


class _Node:
    __slots__ = ("key", "parent", "children", "checkpoint", "token_ids", "logprobs", "loss_mask", "weight_version")

    def __init__(self, key: str, parent: _Node | None):
        self.key = key
        self.parent = parent
        self.children: dict[str, _Node] = {}
        self.checkpoint = False
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.loss_mask: list[int] = []
        self.weight_version: str | None = None

    def set_tokens(self, token_ids: list[int], logprobs: list[float], loss_mask: list[int], version: str | None):
        self.checkpoint = True
        self.token_ids, self.logprobs, self.loss_mask, self.weight_version = token_ids, logprobs, loss_mask, version


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class TrajectoryTree:
    """Radix tree over text; `max_tokens` bounds the tokens stored (least recently used leaves go first)."""

    def __init__(self, *, max_tokens: int = 10_000_000):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.total_tokens = 0
        self._root = _Node("", None)
        self._root.checkpoint = True
        self._lru: OrderedDict[int, _Node] = OrderedDict()  # ancestors always after their descendants

    # --- reading -------------------------------------------------------------------------------

    def match_prefix(self, text: str) -> Trajectory:
        """Tokens of the longest recorded checkpoint that is a prefix of `text`."""
        node, pos, best, best_pos = self._root, 0, self._root, 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None or not text.startswith(child.key, pos):
                break
            node, pos = child, pos + len(child.key)
            if node.checkpoint:
                best, best_pos = node, pos
        self._touch(best)
        return self._collect(best, best_pos)

    def retrieve_from_text(self, text: str, encode: Callable[[str], Sequence[int]]) -> Trajectory:
        """The whole of `text`: recorded tokens for its longest recorded prefix, `encode` for the rest (mask 0)."""
        found = self.match_prefix(text)
        rest = list(encode(text[found.matched_chars :])) if found.matched_chars < len(text) else []
        return Trajectory(
            matched_chars=found.matched_chars,
            token_ids=found.token_ids + rest,
            logprobs=found.logprobs + [0.0] * len(rest),
            loss_mask=found.loss_mask + [0] * len(rest),
            weight_versions=found.weight_versions + [None] * len(rest),
        )

    # --- writing -------------------------------------------------------------------------------

    def insert(
        self,
        text: str,
        token_ids: Sequence[int],
        logprobs: Sequence[float],
        loss_mask: Sequence[int],
        weight_version: str | None = None,
    ) -> None:
        """Record that `text` is exactly `token_ids` (whole arrays from the start of the text).

        Tokens beyond the longest recorded prefix are tagged `weight_version`. A recorded prefix whose
        tokens disagree with these is dropped (with what hangs below it): the newest record wins.
        """
        if not (len(token_ids) == len(logprobs) == len(loss_mask)):
            raise ValueError(
                f"token_ids, logprobs and loss_mask must have one entry per token, got "
                f"{len(token_ids)}, {len(logprobs)}, {len(loss_mask)}"
            )
        token_ids, logprobs, loss_mask = list(token_ids), list(logprobs), list(loss_mask)
        node, pos, count = self._root, 0, 0  # count: tokens up to the nearest checkpoint on the path
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                leaf = _Node(text[pos:], node)
                node.children[leaf.key[0]] = leaf
                node, pos = leaf, len(text)
                break
            common = _common_prefix_length(child.key, text[pos : pos + len(child.key)])
            if common < len(child.key):
                child = self._split(child, common)
            if child.checkpoint:
                end = count + len(child.token_ids)
                ends_here = pos + len(child.key) == len(text)
                if child.token_ids != token_ids[count:end] or (ends_here and end != len(token_ids)):
                    self._remove_subtree(child, prune=False)
                    continue
                if not ends_here:
                    count = end
            node, pos = child, pos + len(child.key)
        if node is not self._root:
            if node.checkpoint:  # already there with the same tokens: refresh its log-probs, mask, version
                self.total_tokens -= len(node.token_ids)
            self._make_checkpoint(node, count, token_ids, logprobs, loss_mask, weight_version)
        self._touch(node)
        self._evict()

    def __len__(self) -> int:
        return len(self._lru)

    # --- internals -----------------------------------------------------------------------------

    def _make_checkpoint(self, node, count, token_ids, logprobs, loss_mask, weight_version) -> None:
        if len(token_ids) < count:
            raise ValueError(f"text has fewer tokens ({len(token_ids)}) than its recorded prefix ({count})")
        if not node.checkpoint:
            self._rebase_descendants(node, token_ids[count:])
        node.set_tokens(token_ids[count:], logprobs[count:], loss_mask[count:], weight_version)
        self.total_tokens += len(node.token_ids)

    def _rebase_descendants(self, node: _Node, new_tokens: list[int]) -> None:
        """`node` becomes a checkpoint: its nearest checkpoint descendants now count from it."""
        n = len(new_tokens)
        for child in list(node.children.values()):
            if not child.checkpoint:
                self._rebase_descendants(child, new_tokens)
            elif child.token_ids[:n] == new_tokens:
                child.token_ids, child.logprobs, child.loss_mask = child.token_ids[n:], child.logprobs[n:], child.loss_mask[n:]
                self.total_tokens -= n
            else:
                self._remove_subtree(child)

    def _split(self, child: _Node, at: int) -> _Node:
        """Cut `child`'s fragment at `at`: a structural node takes the head and `child` hangs below it."""
        parent = child.parent
        assert parent is not None
        mid = _Node(child.key[:at], parent)
        child.key = child.key[at:]
        child.parent = mid
        mid.children[child.key[0]] = child
        parent.children[mid.key[0]] = mid
        self._lru[id(mid)] = mid  # newest, ahead of (after) `child` as an ancestor must be
        return mid

    def _collect(self, node: _Node, matched_chars: int) -> Trajectory:
        chain = []
        current: _Node | None = node
        while current is not None:
            if current.checkpoint:
                chain.append(current)
            current = current.parent
        chain.reverse()
        out = Trajectory(matched_chars, [], [], [], [])
        for n in chain:
            out.token_ids += n.token_ids
            out.logprobs += n.logprobs
            out.loss_mask += n.loss_mask
            out.weight_versions += [n.weight_version] * len(n.token_ids)
        return out

    def _touch(self, node: _Node) -> None:
        while node is not self._root:
            self._lru[id(node)] = node
            self._lru.move_to_end(id(node))
            node = _parent(node)

    def _remove_subtree(self, node: _Node, *, prune: bool = True) -> None:
        """Drop `node` and all below it; with `prune`, also structural ancestors left with no children."""
        stack = [node]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            self.total_tokens -= len(n.token_ids)
            self._lru.pop(id(n), None)
        parent = _parent(node)
        del parent.children[node.key[0]]
        if prune:
            self._drop_empty_structural(parent)

    def _drop_empty_structural(self, node: _Node) -> None:
        while node is not self._root and not node.checkpoint and not node.children:
            self._lru.pop(id(node), None)
            parent = _parent(node)
            del parent.children[node.key[0]]
            node = parent

    def _evict(self) -> None:
        while self.total_tokens > self.max_tokens and self._lru:
            _, oldest = next(iter(self._lru.items()))
            self._remove_subtree(oldest)  # a leaf, given the LRU order


def _parent(node: _Node) -> _Node:
    """The parent of a node below the root (only the root has none)."""
    assert node.parent is not None, "the root has no parent"
    return node.parent


def _meta_info(response: dict[str, Any]) -> dict[str, Any]:
    meta = response.get("meta_info")
    return meta if isinstance(meta, dict) else {}


def _output_tokens(response: dict[str, Any]) -> tuple[list[int], list[float]]:
    meta = _meta_info(response)
    entries = meta.get("output_token_logprobs") or []
    ids = response.get("output_ids")
    if not isinstance(ids, list):
        ids = [entry[1] for entry in entries]
    logprobs = [float(entry[0]) for entry in entries] if len(entries) == len(ids) else [0.0] * len(ids)
    return ids, logprobs


class TrajectoryMiddleware:
    """Turns text requests into token requests through the tree, and records every finished generation.

    `encode(str) -> list[int]` is the model's tokenizer (injected, so no transformers import here).
    Requests that already carry `input_ids` pass through untouched. Text requests get `return_logprob`
    switched on, since the rollout log-probs are part of what is recorded.
    """

    def __init__(self, encode: Callable[[str], Sequence[int]], *, max_tokens: int = 10_000_000):
        self.tree = TrajectoryTree(max_tokens=max_tokens)
        self._encode = encode
        self.prefix_hits = 0
        self.requests = 0

    async def __call__(self, request: RouterRequest, call_next: CallNext) -> dict[str, Any]:
        text = request.payload.get("text")
        if not isinstance(text, str) or "input_ids" in request.payload:
            return await call_next(request)
        self.requests += 1
        prefix = self.tree.match_prefix(text)
        self.prefix_hits += prefix.matched_chars > 0
        suffix = list(self._encode(text[prefix.matched_chars :])) if prefix.matched_chars < len(text) else []
        input_ids = prefix.token_ids + suffix
        payload = {key: value for key, value in request.payload.items() if key != "text"}
        payload["input_ids"] = input_ids
        payload["return_logprob"] = True
        request.payload = payload
        response = await call_next(request)

        prompt_logprobs = prefix.logprobs + [0.0] * len(suffix)
        prompt_mask = prefix.loss_mask + [0] * len(suffix)
        self.tree.insert(text, input_ids, prompt_logprobs, prompt_mask)
        output_text = response.get("text")
        if isinstance(output_text, str):
            output_ids, output_logprobs = _output_tokens(response)
            version = _meta_info(response).get("weight_version")
            self.tree.insert(
                text + output_text,
                input_ids + output_ids,
                prompt_logprobs + output_logprobs,
                prompt_mask + [1] * len(output_ids),
                None if version is None else str(version),
            )
        return response

    def retrieve_from_text(self, text: str) -> Trajectory:
        """Tokens, rollout log-probs and loss mask for a whole trajectory given as text."""
        return self.tree.retrieve_from_text(text, self._encode)

    def snapshot(self) -> dict[str, float]:
        return {
            "router/trajectory/requests": float(self.requests),
            "router/trajectory/prefix_hits": float(self.prefix_hits),
            "router/trajectory/tokens": float(self.tree.total_tokens),
            "router/trajectory/nodes": float(len(self.tree)),
        }
