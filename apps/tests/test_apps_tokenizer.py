"""The shipped character tokenizer means the same text on every path that loads it: the trainer's data
source, the rollout manager and the engine. Under transformers 5.x `AutoTokenizer` alone turns it into a
Qwen2Tokenizer that drops spaces."""

import json

from rl_apps.data import build_data_source, load_tokenizer
from rl_sglang.embedded.model_runner import _load_tokenizer

TEXT = "rev abc= 1 + 2"


def test_text_with_spaces_round_trips_through_every_loading_path(tiny_run_config, tmp_path):
    config = tiny_run_config(tmp_path / "run")
    # One id per character (the tokenizer is character-level), spaces included.
    for tokenizer in (load_tokenizer(config), _load_tokenizer(str(config.hf_checkpoint))):
        ids = tokenizer(TEXT)["input_ids"]
        assert len(ids) == len(TEXT)
        assert tokenizer.decode(ids) == TEXT


def test_the_data_source_tokenizes_a_spaced_prompt_one_token_per_character(tiny_run_config, tmp_path):
    prompts = tmp_path / "spaced.jsonl"
    prompts.write_text(json.dumps({"prompt": TEXT, "label": "3"}) + "\n")
    config = tiny_run_config(tmp_path / "run", prompt_data=prompts, n_samples_per_prompt=1, rollout_batch_size=1,
                            micro_batch_size=1)
    (group,) = build_data_source(config).get_samples(1)
    tokenizer = load_tokenizer(config)
    assert len(group[0].tokens) == len(TEXT) and tokenizer.decode(group[0].tokens) == TEXT
