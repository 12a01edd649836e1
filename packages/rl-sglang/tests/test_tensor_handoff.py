"""CPU tensor handles open in a process that is no child of the sender (an engine started apart from the
trainer, as rl-train's Ray actors start them)."""

from __future__ import annotations

import subprocess
import sys

import torch

from rl_sglang.tensor_handoff import flattened_bucket, serialize_entry

OPEN_AND_SUM = """
import sys
from rl_sglang.tensor_handoff import load_entry, named_tensors_of
for name, tensor in named_tensors_of(load_entry(sys.stdin.read()), "flattened_bucket"):
    print(name, tensor.dtype, list(tensor.shape), float(tensor.double().sum()))
"""


def test_a_cpu_entry_opens_in_an_unrelated_process_and_reads_the_senders_memory():
    weight, bias = torch.randn(3, 4), torch.arange(5, dtype=torch.bfloat16)
    entry = serialize_entry(flattened_bucket([("w", weight), ("b", bias)]))
    # a fresh interpreter: its multiprocessing authkey differs from ours, as an engine's does
    opened = subprocess.run([sys.executable, "-c", OPEN_AND_SUM], input=entry, capture_output=True, text=True, timeout=120)
    assert opened.returncode == 0, opened.stderr[-2000:]
    read = {line.split()[0]: (line.split()[1], float(line.split()[-1])) for line in opened.stdout.splitlines()}
    assert read["w"] == ("torch.float32", float(weight.double().sum()))
    assert read["b"] == ("torch.bfloat16", float(bias.double().sum()))
