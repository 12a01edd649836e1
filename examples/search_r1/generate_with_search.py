"""A search agent in the style of Search-R1: the policy searches a local corpus, reads, then answers.

Run it with rl-train on the shipped questions (any model; the README of examples/ has the full command):

    rl-train ... --prompt-data examples/search_r1/questions.jsonl \
                 --custom-generate-function-path examples/search_r1/generate_with_search.py:generate \
                 --custom-rm-path examples/search_r1/generate_with_search.py:reward_func --max-turns 3

Each turn the policy writes until its first `</search>` or `</answer>` (`generate_turn` posts the context to
`/generate` and keeps the sampled tokens up to the tag, with their log-probs). `<search>query</search>` gets
the best passages of `corpus.jsonl` (BM25, in plain Python: no server, no download) back as
`<information>...</information>`; `<answer>...</answer>` ends the episode; anything else gets a short
"invalid action" note and another turn. The passages and notes join the response with loss mask 0
(`append_observation`): the policy did not sample them, so it is not trained on them. The reward is exact
match on the answer.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from functools import lru_cache
from pathlib import Path

from rl_apps.slime_api import GenerateState, Sample, append_observation, generate_turn

CORPUS = Path(__file__).with_name("corpus.jsonl")
TOP_K = 2
DEFAULT_MAX_TURNS = 3  # when the run gives no --max-turns
FORMAT_SCORE = 0.2  # a well-formed but wrong answer: a little credit, so an untrained policy learns the format
PROMPT = "search: <search>query</search>, answer: <answer>a</answer>. question: {question} "
INVALID = " invalid action. use <search>query</search> or <answer>a</answer>. "
CLOSING_TAGS = ("</search>", "</answer>")
ACTION = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
WORD = re.compile(r"[a-z0-9]+")


class BM25:
    """Okapi BM25 over whitespace words: enough to make retrieval a real choice of the policy's query."""

    def __init__(self, documents: list[dict], k1: float = 1.2, b: float = 0.75) -> None:
        self.documents, self.k1, self.b = documents, k1, b
        self.terms = [Counter(WORD.findall(f"{d['title']} {d['text']}".lower())) for d in documents]
        self.lengths = [sum(t.values()) for t in self.terms]
        self.mean_length = sum(self.lengths) / len(self.lengths)
        frequency = Counter(word for terms in self.terms for word in terms)
        n = len(documents)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in frequency.items()}

    def score(self, query: str, index: int) -> float:
        terms, length = self.terms[index], self.lengths[index]
        total = 0.0
        for word in WORD.findall(query.lower()):
            tf = terms.get(word, 0)
            if tf:
                total += self.idf[word] * tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * length / self.mean_length))
        return total

    def search(self, query: str, k: int) -> list[dict]:
        """The `k` best documents; a query matching nothing gets nothing (the policy must learn to ask well)."""
        scores = [self.score(query, i) for i in range(len(self.documents))]
        best = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
        return [self.documents[i] for i in best if scores[i] > 0]


@lru_cache(maxsize=1)
def retriever() -> BM25:
    return BM25([json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()])


def information(query: str) -> str:
    """The observation after a search: the passages, numbered."""
    passages = retriever().search(query, TOP_K)
    body = " ".join(f"doc {i + 1}: {d['text']}" for i, d in enumerate(passages)) or "no results."
    return f" <information>{body}</information> "


async def generate(args, sample: Sample, sampling_params) -> Sample:
    if args.partial_rollout:
        raise ValueError("generate_with_search does not continue partial samples: run without --partial-rollout")
    max_turns = getattr(args, "max_turns", None) or DEFAULT_MAX_TURNS
    tokenizer = GenerateState(args).tokenizer
    sample.tokens = tokenizer(PROMPT.format(question=sample.prompt), add_special_tokens=False)["input_ids"]
    for turn in range(max_turns):
        # The policy writes until its first closing tag; its tokens join the response with their log-probs.
        written = await generate_turn(args, sample, sampling_params, stop=CLOSING_TAGS)
        if written is None:
            return sample  # aborted, or no room left in --rollout-max-context-len
        action = ACTION.search(written.text)
        if action is not None and action.group(1) == "answer":
            sample.metadata["answer"] = action.group(2)  # what the reward grades
            sample.status = Sample.Status.COMPLETED
            return sample
        if written.finish_reason == "length" or turn + 1 == max_turns:
            break  # out of tokens mid-action, or out of turns (no observation: nothing would read it)
        if not append_observation(args, sample, information(action.group(2)) if action is not None else INVALID):
            return sample  # TRUNCATED: the observation filled --rollout-max-context-len
    sample.status = Sample.Status.TRUNCATED  # out of turns or tokens before an answer
    return sample


def normalize(text: str) -> str:
    """SQuAD-style answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match_score(answer: str | None, answers: list[str] | str) -> float:
    """1 for an answer equal (normalised) to one of `answers`, FORMAT_SCORE for another answer, 0 for none."""
    if answer is None:
        return 0.0
    golden = {normalize(a) for a in ([answers] if isinstance(answers, str) else answers)}
    return 1.0 if normalize(answer) in golden else FORMAT_SCORE


async def reward_func(args, sample: Sample, **kwargs) -> float:
    """Exact match of the episode's answer (the text of its final `<answer>` action, kept by `generate`;
    not searched for in the response, where the notes and passages could hold tags too)."""
    return exact_match_score(sample.metadata.get("answer"), sample.label)
