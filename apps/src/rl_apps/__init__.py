"""Entry points that assemble the framework's packages into training programs."""

import os

# Ray's `uv run` hook (on by default, read once when ray is first imported) gives every ray.init under
# `uv run` a runtime env that ships the working directory to each job and builds a fresh venv there for
# its workers: tens of seconds of start-up per run. Our workers run in this interpreter's environment
# instead; RAY_ENABLE_UV_RUN_RUNTIME_ENV=1 opts back in (a cluster whose nodes lack this venv).
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
