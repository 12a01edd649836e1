"""`python -m rl_sglang.embedded --model-path DIR --host 127.0.0.1 --port N ...`: serve until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys

from rl_sglang.embedded.options import FLAG_HELP, EngineOptions
from rl_sglang.embedded.server import EmbeddedEngine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rl_sglang.embedded", description=__doc__)
    parser.add_argument("--model-path", required=True, help="folder with a HF config, safetensors and tokenizer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-running-requests", type=int, default=64)
    parser.add_argument("--random-seed", "--seed", dest="random_seed", type=int, default=0, help="SGLang's name; --seed is kept")
    parser.add_argument("--mem-fraction-static", type=float, default=None, help=FLAG_HELP["mem_fraction_static"])
    parser.add_argument("--max-total-tokens", type=int, default=None, help=FLAG_HELP["max_total_tokens"])
    parser.add_argument("--context-length", type=int, default=None, help=FLAG_HELP["context_length"])
    parser.add_argument("--chunked-prefill-size", type=int, default=8192, help=FLAG_HELP["chunked_prefill_size"])
    parser.add_argument("--cuda-graph-max-bs", type=int, default=None, help=FLAG_HELP["cuda_graph_max_bs"])
    parser.add_argument("--disable-cuda-graph", action="store_true", help=FLAG_HELP["disable_cuda_graph"])
    parser.add_argument("--disable-radix-cache", action="store_true", help=FLAG_HELP["disable_radix_cache"])
    parser.add_argument("--enable-torch-compile", action="store_true", help=FLAG_HELP["enable_torch_compile"])
    parser.add_argument("--torch-compile-max-bs", type=int, default=None, help=FLAG_HELP["torch_compile_max_bs"])
    parser.add_argument("--disable-overlap-schedule", action="store_true", help=FLAG_HELP["disable_overlap_schedule"])
    parser.add_argument("--enable-overlap-schedule", action="store_true", help=FLAG_HELP["enable_overlap_schedule"])
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


SWITCH_INTERVAL_S = 2e-4
"""How long a thread holding the GIL runs before a waiting one may take it. The event loop (HTTP, scheduling) and the
model thread (launching steps) share the GIL; at Python's default, 5 ms, as long as a whole decode step, a stretch
of pure Python on either side holds up the other that long."""


def options_from_args(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions(**{name: getattr(args, name) for name in FLAG_HELP})


async def serve(args: argparse.Namespace) -> None:
    engine = EmbeddedEngine(
        args.model_path,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        max_running_requests=args.max_running_requests,
        seed=args.random_seed,
        options=options_from_args(args),
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    await engine.start()
    # What start-up made (torch, transformers, the model, compiled graphs) lives as long as the engine: out of the
    # collector's reach, a full collection does not walk it while the event loop waits (a memory release drops only
    # what reference counting frees: test_a_kv_cache_release_frees_the_pool_without_the_garbage_collector).
    gc.collect()
    gc.freeze()
    try:
        await stopping.wait()
    finally:
        await engine.stop()
        gc.unfreeze()  # collectable again at exit, as the extensions' leak checks expect


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
