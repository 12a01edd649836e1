import asyncio

import pytest

from rl_router import TrajectoryMiddleware, TrajectoryTree

MERGED = 1000  # the tokenizer's id for "ab"


def encode(text):
    """Greedy tokenizer with one merge: "ab" -> MERGED, every other character -> its code point."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("ab", i):
            out.append(MERGED)
            i += 2
        else:
            out.append(ord(text[i]))
            i += 1
    return out


def decode(token_ids):
    return "".join("ab" if t == MERGED else chr(t) for t in token_ids)


class ScriptedEngine:
    """Answers call k with `outputs[k]` (token ids sampled one character at a time, so "a","b" stay apart)."""

    def __init__(self, outputs):
        self.outputs = list(outputs)
        self.calls = []

    async def generate(self, payload):
        self.calls.append(payload)
        output_ids = self.outputs[len(self.calls) - 1]
        logprobs = [-0.01 * (len(self.calls) * 100 + j) for j in range(len(output_ids))]
        return {
            "text": decode(output_ids),
            "output_ids": output_ids,
            "meta_info": {
                "id": payload["rid"],
                "finish_reason": {"type": "stop"},
                "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, output_ids)],
                "weight_version": str(len(self.calls)),
            },
        }

    async def abort(self, rid=None):
        return None

    async def is_healthy(self):
        return True


def ids(text):
    return [ord(c) for c in text]


async def test_a_multi_turn_trajectory_retrieved_from_text_is_exactly_what_the_engine_saw_and_sampled(serve):
    # turn 1 samples "a","b","a" (decodes to "aba"); the user's next message starts with "b", so
    # re-tokenising merges across both the sampled "ab" and the turn boundary "a"+"b"
    engine = ScriptedEngine([ids("aba"), ids("ab")])
    trajectories = TrajectoryMiddleware(encode)
    turn1 = "U: hi ab\nA: "
    async with asyncio.timeout(10), serve({"e": engine}, middleware=[trajectories]) as (_, client):
        first = await client.generate({"rid": "t1", "text": turn1, "sampling_params": {}})
        turn2 = turn1 + first["text"] + "bU: more\nA: "
        second = await client.generate({"rid": "t2", "text": turn2, "sampling_params": {}})
    final_text = turn2 + second["text"]

    sent1, sent2 = engine.calls[0]["input_ids"], engine.calls[1]["input_ids"]
    assert sent1 == encode(turn1) and "text" not in engine.calls[0] and engine.calls[0]["return_logprob"]
    assert sent2 == sent1 + ids("aba") + encode("bU: more\nA: ")  # recorded tokens reused, only the suffix encoded
    got = trajectories.retrieve_from_text(final_text)
    engine_tokens = sent2 + ids("ab")
    assert got.matched_chars == len(final_text)
    assert got.token_ids == engine_tokens
    assert encode(final_text) != engine_tokens  # naive re-tokenisation does not give the sampled tokens
    assert len(encode(final_text)) < len(engine_tokens)
    n1, n_user = len(sent1), len(encode("bU: more\nA: "))
    assert got.loss_mask == [0] * n1 + [1] * 3 + [0] * n_user + [1] * 2
    lp1 = [lp for lp, _, _ in first["meta_info"]["output_token_logprobs"]]
    lp2 = [lp for lp, _, _ in second["meta_info"]["output_token_logprobs"]]
    assert got.logprobs == [0.0] * n1 + lp1 + [0.0] * n_user + lp2
    assert got.weight_versions == [None] * n1 + ["1"] * 3 + [None] * n_user + ["2"] * 2
    assert trajectories.snapshot()["router/trajectory/prefix_hits"] == 1.0


async def test_requests_with_input_ids_pass_through_untouched(fake_engine, serve):
    engine = fake_engine("e")
    trajectories = TrajectoryMiddleware(encode)
    async with asyncio.timeout(10), serve({"e": engine}, middleware=[trajectories]) as (_, client):
        await client.generate({"rid": "x", "input_ids": [1, 2], "text": "ignored"})
    assert engine.calls == [{"rid": "x", "input_ids": [1, 2], "text": "ignored"}]
    assert len(trajectories.tree) == 0


def test_retrieving_unrecorded_text_tokenises_it_as_prompt():
    tree = TrajectoryTree()
    got = tree.retrieve_from_text("abc", encode)
    assert (got.matched_chars, got.token_ids, got.loss_mask, got.logprobs) == (0, [MERGED, ord("c")], [0, 0], [0.0, 0.0])


def test_a_match_never_stops_inside_a_recorded_fragment_where_no_token_boundary_is_known():
    tree = TrajectoryTree()
    tree.insert("hello world", [1, 2], [0.0, -0.5], [0, 1])
    tree.insert("hello there", [1, 3], [0.0, -0.7], [0, 1])  # splits "hello " off as a structural node
    assert tree.match_prefix("hello wor").matched_chars == 0
    assert tree.match_prefix("hello world!").token_ids == [1, 2]
    assert tree.match_prefix("hello there").logprobs == [0.0, -0.7]
    tree.insert("hello ", [1], [0.0], [0])  # the structural node becomes a checkpoint; children count from it
    assert tree.match_prefix("hello wor").token_ids == [1]
    assert tree.match_prefix("hello world").token_ids == [1, 2]
    assert tree.match_prefix("hello there").token_ids == [1, 3]
    assert tree.total_tokens == 3


def test_a_prefix_recorded_with_other_tokens_is_replaced_by_the_newest_record():
    tree = TrajectoryTree()
    tree.insert("ab", [MERGED], [0.0], [0])
    tree.insert("abc", [MERGED, 99], [0.0, -1.0], [0, 1])
    tree.insert("abd", [97, 98, 100], [0.0, 0.0, -2.0], [0, 0, 1])  # "ab" as two tokens now
    assert tree.match_prefix("abd").token_ids == [97, 98, 100]
    assert tree.match_prefix("abc").matched_chars == 0  # the old branch went with the old "ab"
    assert tree.total_tokens == 3


def test_memory_stays_within_max_tokens_by_evicting_the_least_recently_used_trajectories():
    tree = TrajectoryTree(max_tokens=30)
    for i in range(10):
        tree.insert(f"conversation {i}", list(range(10)), [0.0] * 10, [0] * 10)
        tree.match_prefix("conversation 0")  # keep conversation 0 in use
    assert tree.total_tokens <= 30
    assert tree.match_prefix("conversation 0").matched_chars == len("conversation 0")
    assert tree.match_prefix("conversation 9").matched_chars == len("conversation 9")
    assert tree.match_prefix("conversation 5").matched_chars == 0


def test_inserting_arrays_of_different_lengths_names_them():
    with pytest.raises(ValueError, match="one entry per token, got 2, 1, 2"):
        TrajectoryTree().insert("x", [1, 2], [0.0], [0, 0])
