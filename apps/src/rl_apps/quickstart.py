"""A task that needs no download: a character tokenizer, a small model from a config, and a digit task.

`python -m rl_apps.quickstart --out DIR [--size tiny|100m]` writes DIR/model (config, random weights,
tokenizer) and DIR/train.jsonl. The task: a prompt "a+b=" with a small sum; the reward is the math grader
on the response. A random model almost never answers right; GRPO teaches it the table.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>"]
ALPHABET = string.digits + "+-*=?:., " + string.ascii_lowercase + "<>/|"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

MODEL_SIZES = {
    # hidden, layers, heads, kv heads, intermediate
    "tiny": (64, 2, 4, 2, 128),
    "100m": (768, 12, 12, 4, 3072),
}


def build_char_tokenizer(directory: Path):
    """A character-level fast tokenizer saved in the usual Hugging Face files."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(dict.fromkeys(ALPHABET)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="?"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def build_model(directory: Path, size: str = "tiny", seed: int = 0, tie_word_embeddings: bool | None = None) -> int:
    """A Qwen2-architecture model with random weights; returns its parameter count. The tiny one ties its
    output layer to the embeddings unless `tie_word_embeddings` is False (what LoRA needs on a random
    model: with the tied matrix frozen the logits stay capped, see the README's LoRA section)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    tokenizer = build_char_tokenizer(directory)
    hidden, layers, heads, kv_heads, intermediate = MODEL_SIZES[size]
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=2048,
        tie_word_embeddings=size == "tiny" if tie_word_embeddings is None else tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(directory))
    return sum(p.numel() for p in model.parameters())


def make_addition_data(path: Path, *, max_operand: int = 4, seed: int = 0, copies: int = 4) -> int:
    """JSONL rows {"prompt": "a+b=", "label": "a+b"} for every pair of operands, shuffled."""
    rows = [{"prompt": f"{a}+{b}=", "label": str(a + b)} for a in range(max_operand + 1) for b in range(max_operand + 1)]
    rows = rows * copies
    random.Random(seed).shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rl_apps.quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write model/ and train.jsonl into")
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-operand", type=int, default=4)
    parser.add_argument("--untie-embeddings", action="store_true",
                        help="a separate output layer (LoRA on a random model needs one: --lora-target-modules all-linear lm_head)")
    args = parser.parse_args(argv)
    params = build_model(args.out / "model", args.size, args.seed, False if args.untie_embeddings else None)
    rows = make_addition_data(args.out / "train.jsonl", max_operand=args.max_operand, seed=args.seed)
    print(f"model: {params:,} parameters in {args.out / 'model'}; data: {rows} prompts in {args.out / 'train.jsonl'}")


if __name__ == "__main__":
    main()
