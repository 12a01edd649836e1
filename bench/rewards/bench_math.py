"""Throughput of the `math` grader (samples/second) on deterministic synthetic responses.

Run: uv run --frozen python bench/rewards/bench_math.py [--samples 10000] [--seed 0] [--modes direct,hub,isolated,adversarial]

Responses mix the answer forms the grader meets (boxed integers, fractions, decimals, percentages,
answer phrases, last-number fallbacks, surds and polynomials that reach math-verify), about a third of
them wrong. Modes: `direct` calls the grader in a loop; `hub` goes through `RewardHub` (daemon threads,
concurrency 32); `isolated` through `RewardHub` with `isolate=True` (worker processes, JSON lines);
`adversarial` times `math_reward` on each of a fixed set of huge and hostile responses against label "7"
(only the first holds that answer, in a box: every other one must score 0).
"""

from __future__ import annotations

import argparse
import random
import time
from fractions import Fraction

from rl_rewards import build_reward, math_reward


def _sample(rng: random.Random, kind: int, wrong: bool) -> tuple[str, str]:
    """(response, label); the label is the true value, the response wrong when `wrong`."""
    if kind == 0:
        value = rng.randint(-999, 9999)
        given = value + rng.randint(1, 9) if wrong else value
        return f"Adding the parts gives \\boxed{{{given}}}.", str(value)
    if kind == 1:
        numerator, denominator = rng.randint(1, 50), rng.randint(2, 50)
        given = Fraction(numerator + (1 if wrong else 0), denominator)
        return f"So the probability is \\boxed{{\\frac{{{given.numerator}}}{{{given.denominator}}}}}", f"{numerator}/{denominator}"
    if kind == 2:
        value = Fraction(rng.randint(1, 400), 4)
        given = float(value) + (0.25 if wrong else 0.0)
        return f"The answer is {given}.", f"\\dfrac{{{value.numerator}}}{{{value.denominator}}}"
    if kind == 3:
        percent = rng.randint(1, 99)
        return f"It grows by \\boxed{{{percent + (1 if wrong else 0)}\\%}}", str(percent)
    if kind == 4:
        value = rng.randint(1000, 999999)
        return f"Counting all cases we get {value + (10 if wrong else 0):,} in total", str(value)
    if kind == 5:
        square = rng.choice([2, 3, 5, 6, 7])
        factor = rng.randint(2, 9)
        given = f"{factor + (1 if wrong else 0)}\\sqrt{{{square}}}"
        return f"Simplifying, \\boxed{{{given}}}", f"\\sqrt{{{factor * factor * square}}}"
    if kind == 6:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        given = f"x^2+{2 * a + (1 if wrong else 0)}x+{a * a}"
        return f"Expanding: \\boxed{{{given}}}", f"(x+{a})^2"
    value = rng.randint(1, 500)
    return f"Final answer: {value + (3 if wrong else 0)} apples", str(value)


def make_items(count: int, seed: int) -> tuple[list[dict], list[float]]:
    """The items, and the reward each should get (the generator knows which responses it made wrong)."""
    rng = random.Random(seed)
    items, expected = [], []
    for _ in range(count):
        kind, wrong = rng.randrange(8), rng.random() < 0.35
        response, label = _sample(rng, kind, wrong)
        items.append({"prompt": "", "response": response, "label": label, "metadata": {}})
        expected.append(0.0 if wrong else 1.0)
    return items, expected


def bench_direct(items: list[dict]) -> tuple[float, list[float]]:
    started = time.perf_counter()
    rewards = [math_reward(**item) for item in items]
    return time.perf_counter() - started, rewards


def bench_hub(items: list[dict], **grader_options) -> tuple[float, list[float]]:
    hub = build_reward("math", None, grader_options=grader_options or None, concurrency=32, timeout_s=60.0)
    if grader_options.get("isolate"):
        hub.grader.start()  # worker start-up (imports) is not grading time
    try:
        started = time.perf_counter()
        rewards = hub.score_batch_sync(items)
        elapsed = time.perf_counter() - started
    finally:
        if grader_options.get("isolate"):
            hub.grader.close()
    assert hub.stats["errors"] == 0 and hub.stats["timeouts"] == 0, hub.stats
    return elapsed, rewards


ADVERSARIAL = {
    "2 MB of digits, then a box": "1234567890 " * 190_000 + r"\boxed{7}",
    "300k unclosed boxes": r"\boxed{" * 300_000,
    "300k unclosed boxes, then a number": r"\boxed{" * 300_000 + "7",
    "10k unclosed braces, then a number": r"\boxed{" + "{" * 10_000 + "7",
    "box, then 40 unclosed boxes": r"\boxed{8}" + r" \boxed{" * 40 + " 7",
    "10k nested braces": r"\boxed{" + "{" * 10_000 + "8" + "}" * 10_000 + "}",
    "power tower": r"\boxed{2^{2^{2^{2^{10}}}}}",
    "power of a sum": r"\boxed{(1+x)^{9999}}",
    "power of a trinomial": r"\boxed{(x+y+z)^{99}}",
    "big factorial": r"\boxed{100000!}",
}


def bench_adversarial(repeats: int = 3) -> None:
    """Seconds per response (the worst of `repeats` runs) and the reward each got against label 7."""
    math_reward(prompt="", response=r"\boxed{x+1}", label="x+1", metadata={})  # math-verify's lazy imports
    for name, response in ADVERSARIAL.items():
        worst, reward = 0.0, None
        for _ in range(repeats):
            started = time.perf_counter()
            reward = math_reward(prompt="", response=response, label="7", metadata={})
            worst = max(worst, time.perf_counter() - started)
        print(f"{name:>36}: {worst * 1000:8.1f} ms  reward {reward}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="direct,hub,isolated")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    items, expected = make_items(args.samples, args.seed)
    reference = None
    print(f"{args.samples} responses, seed {args.seed}")
    for mode in args.modes.split(","):
        if mode == "adversarial":
            bench_adversarial()
            continue
        if mode == "direct":
            elapsed, rewards = bench_direct(items)
        elif mode == "hub":
            elapsed, rewards = bench_hub(items)
        elif mode == "isolated":
            elapsed, rewards = bench_hub(items, isolate=True, workers=args.workers)
            mode = f"isolated ({args.workers} workers)"
        else:
            raise SystemExit(f"unknown mode {mode!r}; use direct, hub, isolated, adversarial")
        reference = reference or rewards
        assert rewards == reference, f"{mode} disagrees with the first mode"
        print(
            f"{mode:>22}: {len(items) / elapsed:8.0f} samples/s  ({elapsed:6.2f} s, "
            f"agreement with the generator {sum(r == e for r, e in zip(rewards, expected)) / len(items):.4f})"
        )


if __name__ == "__main__":
    main()
