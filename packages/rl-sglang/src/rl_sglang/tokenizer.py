"""Loading a tokenizer as it was saved.

`AutoTokenizer` picks the tokenizer class from the model's `config.json` when the tokenizer files name a
generic class: under transformers 5.x a character tokenizer saved as a `PreTrainedTokenizerFast` next to a
Qwen2 config comes back as a `Qwen2Tokenizer`, whose pre-tokenizer drops spaces ("rev abc=" loses its
space). A folder whose tokenizer.json is the whole tokenizer is therefore loaded from that file alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GENERIC_CLASSES = (None, "PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(model_path: str | Path) -> Any:
    """The tokenizer in `model_path`, exactly as saved (its own tokenizer.json when the saved class is generic)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(model_path)
    config_file = folder / "tokenizer_config.json"
    saved_class = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if (folder / "tokenizer.json").is_file() and saved_class in GENERIC_CLASSES:
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))
