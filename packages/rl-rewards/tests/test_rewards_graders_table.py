"""Table of (grader, response, label, expected reward) cases over the tricky parts of every local grader."""

from __future__ import annotations

import pytest

from rl_rewards import default_registry

CASES = [
    # math: boxed extraction, nested braces
    ("math", r"so the result is \boxed{\frac{1}{2}}", "1/2", 1.0),
    ("math", r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}", 1.0),
    ("math", r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{2}}{2}", 0.0),
    ("math", r"First \boxed{3}, then correcting: \boxed{4}", "4", 1.0),
    ("math", r"First \boxed{3}, then correcting: \boxed{4}", "3", 0.0),
    ("math", r"\boxed{{{7}}}", "7", 1.0),
    ("math", r"\fbox{12}", "12", 1.0),
    ("math", r"$\boxed 9$", "9", 1.0),
    ("math", r"the final \boxed{5} and an unclosed \boxed{6", "5", 1.0),
    ("math", r"\boxed{x^{2}+1}", "x^2+1", 1.0),
    # fractions vs decimals
    ("math", r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    ("math", r"\boxed{\dfrac{3}{4}}", "0.75", 1.0),
    ("math", r"\boxed{\tfrac{3}{4}}", r"\frac{3}{4}", 1.0),
    ("math", r"\boxed{0.75}", r"\dfrac{3}{4}", 1.0),
    ("math", r"\boxed{3/4}", "0.75", 1.0),
    ("math", r"\boxed{-\frac{2}{3}}", "-2/3", 1.0),
    ("math", r"\boxed{0.67}", r"\frac{2}{3}", 0.0),
    ("math", r"\boxed{\frac{1}{3}}", r"\frac{2}{6}", 1.0),
    ("math", r"\boxed{.5}", "0.5", 1.0),
    # thousands separators
    ("math", r"\boxed{1,000}", "1000", 1.0),
    ("math", "The answer is 1,000.", "1000", 1.0),
    ("math", r"\boxed{1{,}234{,}567}", "1234567", 1.0),
    ("math", r"\boxed{1000}", "1,000", 1.0),
    ("math", r"\boxed{1,001}", "1000", 0.0),
    ("math", "I count 12,345 in total", "12345", 1.0),
    # percent
    ("math", r"\boxed{50\%}", "50", 1.0),
    ("math", r"\boxed{50\%}", "0.5", 1.0),
    ("math", r"\boxed{0.5}", r"50\%", 1.0),
    ("math", "so it is 50%", "50", 1.0),
    ("math", r"\boxed{40\%}", "0.5", 0.0),
    # degrees, dollars, units, trailing text
    ("math", r"\boxed{90^\circ}", "90", 1.0),
    ("math", r"\boxed{90^{\circ}}", "90", 1.0),
    ("math", r"\boxed{45°}", "45", 1.0),
    ("math", r"\boxed{\$18.50}", "18.5", 1.0),
    ("math", r"\boxed{5\text{ cm}}", "5", 1.0),
    ("math", r"\boxed{12 \mbox{ inches}}", "12", 1.0),
    ("math", "The answer is 12 apples.", "12", 1.0),
    ("math", r"\boxed{18 \text{ dollars}}", r"18", 1.0),
    ("math", r"\boxed{20 meters}", "20", 1.0),
    ("math", r"\boxed{2x}", "2", 0.0),
    # \left \right and spacing
    ("math", r"\boxed{\left(1, 2\right)}", "(1,2)", 1.0),
    ("math", r"\boxed{\left[ 0, 1 \right]}", "[0,1]", 1.0),
    ("math", r"\boxed{\left(\frac{1}{2}, 3\right)}", r"(\frac{1}{2}, 3)", 1.0),
    ("math", r"\boxed{(1,3)}", "(1,2)", 0.0),
    ("math", r"\boxed{3\,000}", "3000", 1.0),
    ("math", r"\boxed{1\!000}", "1000", 1.0),
    # symbolic equivalence via math-verify
    ("math", r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
    ("math", r"\boxed{\sqrt{8}}", r"2\sqrt{2}", 1.0),
    ("math", r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    ("math", r"\boxed{\frac{\pi}{2}}", r"\pi/2", 1.0),
    ("math", r"\boxed{2\pi}", r"\pi", 0.0),
    ("math", r"\boxed{\sqrt{3}}", r"\sqrt{2}", 0.0),
    ("math", r"\boxed{x = 5}", "5", 1.0),
    ("math", r"\boxed{y=\frac{1}{2}}", "0.5", 1.0),
    ("math", r"\boxed{2^{10}}", "1024", 1.0),
    ("math", r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}", 1.0),
    # answer phrases and last-number fallback
    ("math", "The answer is 42", "42", 1.0),
    ("math", "The final answer is $\\frac{1}{2}$.", "0.5", 1.0),
    ("math", "Final answer: 7", "7", 1.0),
    ("math", "**Answer:** -3", "-3", 1.0),
    ("math", "3 + 4 = 7, so we get 7", "7", 1.0),
    ("math", "3 + 4 = 7, so we get 8", "7", 0.0),
    ("math", "It costs 3.50 each", "3.5", 1.0),
    # wrong and empty
    ("math", "", "5", 0.0),
    ("math", "I do not know", "5", 0.0),
    ("math", r"\boxed{}", "5", 0.0),
    ("math", r"\boxed{6}", "5", 0.0),
    ("math", r"\boxed{-5}", "5", 0.0),
    # label forms
    ("math", r"\boxed{5}", 5, 1.0),
    ("math", r"\boxed{0.25}", 0.25, 1.0),
    ("math", r"\boxed{5}", r"The solution gives \boxed{5}", 1.0),
    ("math", r"\boxed{6}", ["5", "6"], 1.0),
    ("math", r"\boxed{5}", "$5$", 1.0),
    # exact_match
    ("exact_match", "Paris", "Paris", 1.0),
    ("exact_match", "  Paris \n", "Paris", 1.0),
    ("exact_match", "New   York", "New York", 1.0),
    ("exact_match", "paris", "Paris", 0.0),
    ("exact_match", "", "Paris", 0.0),
    ("exact_match", "42", 42, 1.0),
    ("exact_match", "Lyon", ["Paris", "Lyon"], 1.0),
    # f1 (SQuAD normalisation)
    ("f1", "The Eiffel Tower!", "eiffel tower", 1.0),
    ("f1", "an apple", "the apple", 1.0),
    ("f1", "red car", "red truck", 0.5),
    ("f1", "completely different", "nothing shared", 0.0),
    ("f1", "", "answer", 0.0),
    ("f1", "blue whale", ["whale", "blue whale"], 1.0),
    ("f1", "the big red dog", "red dog", 0.8),
    # multiple_choice
    ("multiple_choice", "Answer: B", "B", 1.0),
    ("multiple_choice", "The answer is (C).", "C", 1.0),
    ("multiple_choice", "the answer is b", "B", 0.0),
    ("multiple_choice", "I think the correct answer is D because...", "D", 1.0),
    ("multiple_choice", "**Answer:** **A**", "A", 1.0),
    ("multiple_choice", "Looking at (A) and (B), I pick (B)", "B", 1.0),
    ("multiple_choice", "(A) is wrong. The answer is C", "C", 1.0),
    ("multiple_choice", "B", "B", 1.0),
    ("multiple_choice", "B.", "(B)", 1.0),
    ("multiple_choice", r"\boxed{\text{E}}", "E. 42", 1.0),
    ("multiple_choice", r"\boxed{D}", "d", 1.0),
    ("multiple_choice", "I would choose option A.", "A", 1.0),
    ("multiple_choice", "Answer: B", "C", 0.0),
    ("multiple_choice", "", "A", 0.0),
    ("multiple_choice", "I am not sure", "A", 0.0),
    ("multiple_choice", "The answer is Bob's choice", "B", 0.0),
    # math: more tricky cases
    ("math", r"\boxed{\frac{6}{4}}", r"\frac{3}{2}", 1.0),
    ("math", r"\boxed{1.5}", "3/2", 1.0),
    ("math", r"\boxed{-0}", "0", 1.0),
    ("math", r"\boxed{10^{3}}", "1000", 1.0),
    ("math", r"The answer is $\boxed{\text{(B)}}$", "B", 1.0),  # \text and the parentheses are dropped
    ("math", r"\boxed{3.0}", "3", 1.0),
    ("math", r"\boxed{3.01}", "3", 0.0),
    ("math", r"\boxed{\infty}", r"\infty", 1.0),
    # dapo: last non-empty line "Answer: X", +1 / -1, format error -1
    ("dapo", "Work...\nAnswer: 42", "42", 1.0),
    ("dapo", "Work...\nAnswer: 41", "42", -1.0),
    ("dapo", "Work...\nanswer: 42\n\n", "42", 1.0),
    ("dapo", "Work...\n**Answer:** 42", "42", 1.0),
    ("dapo", "Work...\nAnswer: $\\frac{1}{2}$", "0.5", 1.0),
    ("dapo", "Work...\nAnswer: 1,000.", "1000", 1.0),
    ("dapo", "Answer: 42\nBut wait, let me check again.", "42", -1.0),
    ("dapo", r"The result is \boxed{42}", "42", -1.0),
    ("dapo", "Answer:", "42", -1.0),
    ("dapo", "", "42", -1.0),
    ("dapo", "Answer: x = 5", "5", 1.0),
    ("dapo", "Answer: 2\\sqrt{2}", r"\sqrt{8}", 1.0),
    ("dapo", "Final Answer: 7", "7", -1.0),
    ("dapo", "Answer: 7", ["6", "7"], 1.0),
    ("dapo", "x" * 5000 + "\nAnswer: 9", "9", 1.0),
    ("dapo", "Answer: 9\n" + "x" * 400, "9", -1.0),
    # deepscaler: boxed answer after </think>, 1 / 0
    ("deepscaler", r"<think>maybe \boxed{3}</think> so \boxed{4}", "4", 1.0),
    ("deepscaler", r"<think>maybe \boxed{4}</think> so the answer is 4", "4", 0.0),
    ("deepscaler", r"<think>hmm</think>\boxed{\frac{1}{2}}", "0.5", 1.0),
    ("deepscaler", r"no thinking tags \boxed{12}", "12", 1.0),
    ("deepscaler", r"no thinking tags, answer is 12", "12", 0.0),
    ("deepscaler", r"<think>a</think>x<think>b</think>\boxed{5}", "5", 1.0),
    ("deepscaler", r"<think>a</think>\boxed{5}</think>\boxed{6}", "5", 0.0),
    ("deepscaler", r"</think>\boxed{6}", r"\boxed{6}", 1.0),
    ("deepscaler", r"</think>\boxed{}", "6", 0.0),
    ("deepscaler", r"</think>\boxed{2\pi}", r"2\pi", 1.0),
    ("deepscaler", r"</think>\boxed{2\pi}", r"\pi", 0.0),
    ("deepscaler", r"<think>unfinished thinking \boxed{7}", "7", 1.0),
    ("deepscaler", r"</think>\boxed{(1,2)}", ["(2,1)", "(1,2)"], 1.0),
    # ifeval: fraction of constraints satisfied
    ("ifeval", "one two three four five", {"constraints": [{"type": "word_count", "min": 5, "max": 5}]}, 1.0),
    ("ifeval", "one two three four", {"constraints": [{"type": "word_count", "min": 5}]}, 0.0),
    ("ifeval", "one two, three-four", [{"type": "word_count", "max": 4}], 1.0),
    ("ifeval", "It's fine.", [{"type": "word_count", "min": 3, "max": 3}], 1.0),
    ("ifeval", "First. Second! Third?", [{"type": "sentence_count", "min": 3, "max": 3}], 1.0),
    ("ifeval", "Pi is 3.14 exactly. Yes.", [{"type": "sentence_count", "max": 2}], 1.0),
    ("ifeval", "One sentence only", [{"type": "sentence_count", "min": 2}], 0.0),
    ("ifeval", "I like Apples and pears", [{"type": "keywords", "keywords": ["apples", "pears"]}], 1.0),
    ("ifeval", "I like pineapples", [{"type": "keywords", "keywords": ["apples"]}], 0.0),
    ("ifeval", "A new-york style", [{"type": "keywords", "keywords": ["new-york"]}], 1.0),
    ("ifeval", "No bananas here", [{"type": "forbidden_words", "words": ["banana"]}], 1.0),
    ("ifeval", "A Banana here", [{"type": "forbidden_words", "words": ["banana"]}], 0.0),
    ("ifeval", '{"a": [1, 2]}', [{"type": "json_format"}], 1.0),
    ("ifeval", '```json\n{"a": 1}\n```', [{"type": "json_format"}], 1.0),
    ("ifeval", '{"a": 1,}', [{"type": "json_format"}], 0.0),
    ("ifeval", "Here it is: {\"a\": 1}", [{"type": "json_format"}], 0.0),
    ("ifeval", "all lower case, 123.", [{"type": "lowercase"}], 1.0),
    ("ifeval", "Not lower", [{"type": "lowercase"}], 0.0),
    ("ifeval", "123 456", [{"type": "lowercase"}], 0.0),
    ("ifeval", "ALL CAPS!", [{"type": "uppercase"}], 1.0),
    ("ifeval", "  Dear Sir, hello", [{"type": "starts_with", "phrase": "dear sir"}], 1.0),
    ("ifeval", "Hello. Is there anything else I can help with?  ", [{"type": "ends_with", "phrase": "Is there anything else I can help with?"}], 1.0),
    ("ifeval", "hello world", [{"type": "lowercase"}, {"type": "uppercase"}], 0.5),
    (
        "ifeval",
        "apple pie. banana split.",
        [
            {"type": "keywords", "keywords": ["apple"]},
            {"type": "forbidden_words", "words": ["banana"]},
            {"type": "sentence_count", "min": 2, "max": 2},
            {"type": "lowercase"},
        ],
        0.75,
    ),
    ("ifeval", "short answer", '{"constraints": [{"type": "word_count", "max": 10}]}', 1.0),
    (
        "ifeval",
        "tiny reply",
        {"instruction_id_list": ["length_constraints:number_words", "change_case:english_lowercase"],
         "kwargs": [{"relation": "at least", "num_words": 3}, {}]},
        0.5,
    ),
    # code: sandboxed stdin/stdout and assert tests
    ("code", "```python\nprint(int(input()) * 2)\n```", {"tests": [{"input": "3", "output": "6"}]}, 1.0),
    ("code", "print(int(input()) * 2)", {"inputs": ["1", "5"], "outputs": ["2", "11"]}, 0.5),
    ("code", "```python\ndef f(x):\n    return x + 1\n```", {"asserts": ["assert f(1) == 2", "assert f(2) == 4"]}, 0.5),
    ("code", "```python\nimport sys\nprint(sys.stdin.read().upper(), end='')\n```", {"tests": [{"input": "ab\ncd\n", "output": "AB\nCD"}]}, 1.0),
    ("code", "I cannot solve this.", {"tests": [{"input": "", "output": "1"}]}, 0.0),
    ("code", "```python\nprint('1 2')\n```", {"tests": [{"input": "", "output": "1  2"}]}, 0.0),
]


def _case_id(case: tuple) -> str:
    grader, response, label, expected = case
    return f"{grader}:{response[:30]!r}->{str(label)[:40]!r}={expected}"


def test_rewards_table_has_at_least_150_cases_across_all_local_graders() -> None:
    assert len(CASES) >= 150
    assert {case[0] for case in CASES} == set(default_registry.names()) - {"remote"}


@pytest.mark.parametrize("case", CASES, ids=[_case_id(case) for case in CASES])
def test_rewards_grader_gives_expected_reward(case: tuple) -> None:
    grader_name, response, label, expected = case
    grader = default_registry.create(grader_name)
    reward = grader(prompt="question", response=response, label=label, metadata={})
    assert reward == pytest.approx(expected)
