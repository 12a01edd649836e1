import json

import pytest

from rl_core.data_source import DataError, JsonlDataSource, load_prompt_rows
from rl_core.prompt_files import read_records, split_row_slice


class CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def jsonl(tmp_path, n, name="data.jsonl"):
    path = tmp_path / name
    lines = [json.dumps({"prompt": f"p{i}", "label": str(i)}) for i in range(n)]
    lines.insert(2, "")  # a blank line is not a record
    path.write_text("\n".join(lines) + "\n")
    return path


def test_row_slice_syntax_is_split_from_the_path():
    assert split_row_slice("a/b.jsonl@[10:20]") == (split_row_slice("a/b.jsonl")[0], slice(10, 20))
    assert split_row_slice("b.parquet@[-5:]")[1] == slice(-5, None)
    assert split_row_slice("b.parquet@[:3]")[1] == slice(None, 3)
    assert split_row_slice("odd@name.jsonl")[1] is None


@pytest.mark.parametrize(("spec", "expected"), [("@[1:4]", ["p1", "p2", "p3"]), ("@[-2:]", ["p4", "p5"]), ("@[:1]", ["p0"]), ("", None)])
def test_a_row_slice_selects_records_like_a_python_slice(tmp_path, spec, expected):
    path = jsonl(tmp_path, 6)
    rows = load_prompt_rows(f"{path}{spec}", tokenizer=CharTokenizer())
    assert [r.prompt for r in rows] == (expected or [f"p{i}" for i in range(6)])


def test_errors_in_a_slice_still_name_the_file_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "label": 1}\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: no key 'label'"):
        load_prompt_rows(f"{path}@[1:]", tokenizer=CharTokenizer())
    assert len(load_prompt_rows(f"{path}@[:1]", tokenizer=CharTokenizer())) == 1  # the broken row is outside this slice


def test_an_empty_slice_is_refused(tmp_path):
    path = jsonl(tmp_path, 3)
    with pytest.raises(DataError, match=r"@\[5:9\]: no prompts"):
        load_prompt_rows(f"{path}@[5:9]", tokenizer=CharTokenizer())


def test_parquet_prompts_are_read_and_sliced(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data.parquet"
    table = pa.table({"prompt": [f"q{i}" for i in range(5)], "label": [str(i) for i in range(5)],
                      "metadata": [{"level": i} for i in range(5)]})
    pq.write_table(table, path)
    rows = load_prompt_rows(f"{path}@[1:3]", tokenizer=CharTokenizer())
    assert [(r.prompt, r.label, r.metadata) for r in rows] == [("q1", "1", {"level": 1}), ("q2", "2", {"level": 2})]
    source = JsonlDataSource(load_prompt_rows(path, tokenizer=CharTokenizer()), n_samples_per_prompt=2)
    assert [g[0].prompt for g in source.get_samples(5)] == [f"q{i}" for i in range(5)]


def test_a_bad_parquet_row_is_named_by_its_row_number(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": ["a", None], "label": ["1", "2"]}), path)
    with pytest.raises(DataError, match=r"data.parquet: row 1: 'prompt' must be a string"):
        load_prompt_rows(path, tokenizer=CharTokenizer())


def test_a_corrupt_parquet_file_is_a_data_error(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "data.parquet"
    path.write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_records(path)
