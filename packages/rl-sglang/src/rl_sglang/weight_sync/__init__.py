"""Trainer-side weight transports (rl-core's `WeightTransport` shape: `update(named_tensors,
weight_version)`, `close()`), synchronous for the trainer loop. The engine HTTP calls run on a
private event loop in a background thread.

All consume `named_tensors` lazily in buckets of about `bucket_bytes`, so a trainer that yields
gathered tensors one by one never holds the whole model twice. The broadcast and tensor transports
send each update inside a weight-update session (`/begin_weight_update` ... `/end_weight_update`),
which SGLang 0.5.23 requires, and cast floating tensors to the engine's dtype (fewer bytes, and
the engine would cast anyway); tensors that share storage (tied embeddings) are sent once.
"""

from rl_sglang.weight_sync.broadcast import BroadcastWeightTransport
from rl_sglang.weight_sync.common import DEFAULT_BUCKET_BYTES
from rl_sglang.weight_sync.disk import DiskWeightTransport
from rl_sglang.weight_sync.tensor import TensorWeightTransport

__all__ = ["DEFAULT_BUCKET_BYTES", "BroadcastWeightTransport", "DiskWeightTransport", "TensorWeightTransport"]
