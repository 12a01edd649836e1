"""Builds the tokenizer and the prompt data source from the config."""

from __future__ import annotations

from typing import Any

from rl_apps.train_config import TrainConfig
from rl_core.data_source import JsonlDataSource, load_prompt_rows, pop_first
from rl_core.hooks import load_function


def load_tokenizer(config: TrainConfig) -> Any:
    """The --hf-checkpoint tokenizer as saved (the engine loads it the same way)."""
    from rl_sglang.tokenizer import load_tokenizer as load_saved_tokenizer

    return load_saved_tokenizer(config.hf_folder)


def load_eval_rows(config: TrainConfig, tokenizer: Any | None = None) -> dict[str, list[Any]]:
    """Name -> prompt rows of every --eval-prompt-data set (errors name the file and line)."""
    tokenizer = tokenizer or load_tokenizer(config)
    return {
        name: load_prompt_rows(
            path,
            input_key=config.eval_input_key or config.input_key,
            label_key=config.eval_label_key or config.label_key,
            metadata_key=config.metadata_key,
            tokenizer=tokenizer,
            apply_chat_template=config.apply_chat_template,
            max_prompt_len=config.rollout_max_prompt_len,
            tool_key=config.tool_key,
            apply_chat_template_kwargs=config.apply_chat_template_kwargs,
        )
        for name, path in config.eval_datasets()
    }


def build_data_source(config: TrainConfig, tokenizer: Any | None = None) -> JsonlDataSource:
    assert config.prompt_data is not None, "a data source is built only where --prompt-data is given"
    rows = load_prompt_rows(
        config.prompt_data,
        input_key=config.input_key,
        label_key=config.label_key,
        metadata_key=config.metadata_key,
        tokenizer=tokenizer or load_tokenizer(config),
        apply_chat_template=config.apply_chat_template,
        max_prompt_len=config.rollout_max_prompt_len,
        tool_key=config.tool_key,
        apply_chat_template_kwargs=config.apply_chat_template_kwargs,
    )
    buffer_filter = load_function(config.buffer_filter_path, flag="--buffer-filter-path") if config.buffer_filter_path else pop_first
    return JsonlDataSource(
        rows,
        n_samples_per_prompt=config.n_samples_per_prompt,
        shuffle=config.rollout_shuffle,
        seed=config.rollout_seed,
        buffer_filter=buffer_filter,
    )


def load_sample_filter(config: TrainConfig) -> Any | None:
    """The dynamic-sampling filter named by --dynamic-sampling-filter-path, if any."""
    if config.dynamic_sampling_filter_path is None:
        return None
    return load_function(config.dynamic_sampling_filter_path, flag="--dynamic-sampling-filter-path")


def load_generation_hooks(config: TrainConfig) -> tuple[Any, Any, Any]:
    """The --custom-generate-function-path, --rollout-function-path and --eval-function-path callables (None
    where not given; evaluation falls back to the rollout function, as in slime)."""
    load = lambda flag, spec: load_function(spec, flag=flag) if spec else None  # noqa: E731
    generate = load("--custom-generate-function-path", config.custom_generate_function_path)
    rollout = load("--rollout-function-path", config.rollout_function_path)
    evaluation = load("--eval-function-path", config.eval_function_path) or rollout
    return generate, rollout, evaluation


def load_sample_hooks(config: TrainConfig) -> Any:
    """slime's sample hooks between rollout and training (rl_core.sample_hooks)."""
    from rl_core.sample_hooks import SampleHooks

    load = lambda flag, spec: load_function(spec, flag=flag) if spec else None  # noqa: E731
    return SampleHooks(
        sample_filter=load("--rollout-sample-filter-path", config.rollout_sample_filter_path),
        all_samples_process=load("--rollout-all-samples-process-path", config.rollout_all_samples_process_path),
        reward_post_process=load("--custom-reward-post-process-path", config.custom_reward_post_process_path),
        convert_to_train_data=load("--custom-convert-samples-to-train-data-path",
                                   config.custom_convert_samples_to_train_data_path),
    )
