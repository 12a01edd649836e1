import json

import pytest

from rl_core.data_source import DataError, JsonlDataSource, load_prompt_rows
from rl_core.sample import SampleStatus


class CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def apply_chat_template(self, conversation, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in conversation) + ("<assistant>" if add_generation_prompt else "")


def write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rows_are_tokenized_and_grouped(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": "ab", "label": "1"}), json.dumps({"prompt": "c", "label": "2"})])
    src = JsonlDataSource(load_prompt_rows(path, tokenizer=CharTokenizer()), n_samples_per_prompt=3)
    groups = src.get_samples(2)
    assert [len(g) for g in groups] == [3, 3]
    assert groups[0][0].tokens == [97, 98] and groups[1][2].label == "2"
    assert {s.group_index for s in groups[0]} == {0}
    assert [s.index for g in groups for s in g] == list(range(6))
    assert all(s.status is SampleStatus.PENDING for g in groups for s in g)


def test_chat_messages_need_the_template_and_get_it(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": [{"role": "user", "content": "hi"}], "label": 1})])
    with pytest.raises(DataError, match=r"data.jsonl:1: .*apply-chat-template"):
        load_prompt_rows(path, tokenizer=CharTokenizer())
    rows = load_prompt_rows(path, tokenizer=CharTokenizer(), apply_chat_template=True)
    assert rows[0].text == "<user>hi<assistant>"


def test_malformed_line_error_names_file_and_line(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": "a", "label": 1}), "{not json"])
    with pytest.raises(DataError, match=r"data.jsonl:2: invalid JSON"):
        load_prompt_rows(path, tokenizer=CharTokenizer())


def test_missing_key_error_names_key_flag_and_line(tmp_path):
    path = write(tmp_path, [json.dumps({"question": "a", "label": 1})])
    with pytest.raises(DataError, match=r"data.jsonl:1: no key 'prompt' \(--input-key\); keys are \['label', 'question'\]"):
        load_prompt_rows(path, tokenizer=CharTokenizer())
    with pytest.raises(DataError, match=r"--label-key"):
        load_prompt_rows(path, input_key="question", label_key="answer", tokenizer=CharTokenizer())


def test_too_long_prompt_is_refused_with_its_length(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": "abc", "label": 1}), json.dumps({"prompt": "abcdef", "label": 1})])
    with pytest.raises(DataError, match=r"data.jsonl:2: prompt is 6 tokens, longer than rollout_max_prompt_len \(4\)"):
        load_prompt_rows(path, tokenizer=CharTokenizer(), max_prompt_len=4)


def test_epochs_reshuffle_with_the_seed_and_cover_every_prompt(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": str(i), "label": i}) for i in range(10)])
    rows = load_prompt_rows(path, tokenizer=CharTokenizer())
    src = JsonlDataSource(rows, n_samples_per_prompt=1, shuffle=True, seed=3)
    epoch0 = [g[0].label for g in src.get_samples(10)]
    epoch1 = [g[0].label for g in src.get_samples(10)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1 and src.epoch == 1
    again = JsonlDataSource(rows, n_samples_per_prompt=1, shuffle=True, seed=3)
    assert [g[0].label for g in again.get_samples(10)] == epoch0


def test_state_restores_position_and_returned_groups(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": str(i), "label": i}) for i in range(5)])
    rows = load_prompt_rows(path, tokenizer=CharTokenizer())
    src = JsonlDataSource(rows, n_samples_per_prompt=2, shuffle=True, seed=1)
    first = src.get_samples(3)
    first[0][0].tokens.append(99)
    first[0][0].response_length = 1
    first[0][0].status = SampleStatus.ABORTED
    src.add_samples([first[0]])
    state = json.loads(json.dumps(src.state_dict()))
    expected = [[s.label for s in g] for g in src.get_samples(4)]
    resumed = JsonlDataSource(rows, n_samples_per_prompt=2, shuffle=True, seed=1)
    resumed.load_state_dict(state)
    got = resumed.get_samples(4)
    assert [[s.label for s in g] for g in got] == expected
    assert got[0][0].tokens == first[0][1].tokens and got[0][0].status is SampleStatus.PENDING
