"""GRPO on the quickstart task in one process, from the packages' public API: no Ray, no rl_apps.

    python -m rl_apps.quickstart --out outputs/quickstart && python examples/custom_trainer.py outputs/quickstart
"""

import asyncio
import sys
from pathlib import Path

from rl_core import JsonlDataSource, RLStepConfig, default_generator, default_rollout, load_prompt_rows
from rl_core.rl_step import rl_step
from rl_fsdp import FSDPConfig, build_backend
from rl_rewards import build_reward
from rl_sglang import EngineHandle, load_tokenizer


async def train(task: Path, rollouts: int = 200) -> list[float]:
    model, config = task / "model", RLStepConfig(rollout_batch_size=16, n_samples_per_prompt=8)
    rows = load_prompt_rows(task / "train.jsonl", tokenizer=load_tokenizer(model))
    data = JsonlDataSource(rows, n_samples_per_prompt=config.n_samples_per_prompt, shuffle=True)
    reward, policy = build_reward("math", None), build_backend(FSDPConfig(model_path=model, lr=1e-3, micro_batch_size=32))
    mean_rewards = []
    async with EngineHandle(model, device="cpu") as engine:
        generator = default_generator(engine.generate, {"temperature": 1.0, "max_new_tokens": 3})
        transport = engine.transport("broadcast")
        for version in range(1, rollouts + 1):
            groups = (await default_rollout(generator, reward, data, num_groups=config.rollout_batch_size)).groups
            samples = [s for g in groups for s in g]
            await asyncio.to_thread(rl_step, config, samples, policy)
            await asyncio.to_thread(transport.update, policy.weights(), str(version))
            mean_rewards.append(sum(s.reward for s in samples) / len(samples))
            print(f"rollout {version}: mean reward {mean_rewards[-1]:.3f}", flush=True)
        transport.close()
    policy.close()
    return mean_rewards


if __name__ == "__main__":
    asyncio.run(train(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 200))
