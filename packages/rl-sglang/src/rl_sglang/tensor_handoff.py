"""The payload of /update_weights_from_tensor, as SGLang 0.5.23 reads it.

Each engine TP rank gets one entry: the base64 of torch's multiprocessing pickler output
(`MultiprocessingSerializer` in SGLang). Storage is shared, not copied: a CUDA tensor becomes a
CUDA-IPC handle, a CPU tensor the name of a shared-memory file (so a CPU entry can be opened once,
by any process on the same host). CUDA handles name the GPU by UUID,
not index, because the engine's processes number their visible devices differently (SGLang patches
torch's reduction the same way). The sender must keep the tensors alive until the engine answers.

Per `load_format`, an entry holds a list of `(name, tensor)` (null: the model's HF names;
"direct": exact parameter names), or for "flattened_bucket" a dict `{"flattened_tensor": 1-D uint8,
"metadata": [(name, shape, dtype, start_idx, end_idx, numel), ...]}` with the metadata as
`types.SimpleNamespace` records, a type SGLang's safe unpickler admits and reads by attribute.

`load_entry` is the receiving side (the embedded engine): an allow-list unpickler in the spirit of
SGLang's, never for data from a network peer one does not trust.
"""

from __future__ import annotations

import base64
import io
import pickle
import types
from collections.abc import Iterable
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
import torch.multiprocessing
from torch.multiprocessing import reductions

LOAD_FORMATS = (None, "direct", "flattened_bucket")
_DEVICE_ARG = 6  # position of the device index in torch's rebuild_cuda_tensor arguments


def _reduce_tensor_with_uuid(tensor: torch.Tensor) -> tuple[Any, tuple[Any, ...]]:
    rebuild, args = reductions.reduce_tensor(tensor)
    if tensor.is_cuda:
        args = (*args[:_DEVICE_ARG], str(torch.cuda.get_device_properties(args[_DEVICE_ARG]).uuid), *args[_DEVICE_ARG + 1 :])
    return rebuild, args


def _reduce_cpu_storage_by_name(storage: torch.UntypedStorage) -> tuple[Any, tuple[Any, ...]]:
    """CPU memory goes as a shared-memory file name (torch's file_system strategy), never as a file
    descriptor: a descriptor is handed over by the sender's resource sharer, which admits only processes
    holding the sender's multiprocessing authkey (its own children), and an engine is seldom one."""
    if storage.device.type != "cpu" or storage.size() == 0:
        return reductions.reduce_storage(storage)
    metadata = storage._share_filename_cpu_()
    storage._shared_incref()  # the receiver's rebuild takes this reference over
    reductions.shared_cache[metadata[1]] = reductions.StorageWeakRef(storage)
    return reductions.rebuild_storage_filename, (type(storage), *metadata)


class _HandlePickler(ForkingPickler):
    """torch's multiprocessing pickler, CUDA devices named by UUID, CPU memory by shared-memory file name."""

    def __init__(self, file: io.BytesIO):
        super().__init__(file)
        self.dispatch_table[torch.Tensor] = _reduce_tensor_with_uuid
        self.dispatch_table[torch.nn.Parameter] = _reduce_tensor_with_uuid
        self.dispatch_table[torch.UntypedStorage] = _reduce_cpu_storage_by_name


def serialize_entry(obj: Any) -> str:
    """One TP rank's entry: base64 text of the pickled object (tensors shared by handle)."""
    buffer = io.BytesIO()
    _HandlePickler(buffer).dump(obj)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def flattened_bucket(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """SGLang's flattened bucket: the tensors' bytes back to back in one uint8 tensor (dtypes may
    be mixed), plus where each one lies."""
    flats, metadata, start = [], [], 0
    for name, tensor in named_tensors:
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        metadata.append(
            types.SimpleNamespace(
                name=name, shape=tensor.shape, dtype=tensor.dtype, start_idx=start, end_idx=start + flat.numel(), numel=flat.numel()
            )
        )
        flats.append(flat)
        start += flat.numel()
    if not flats:
        raise ValueError("a flattened bucket needs at least one tensor (SGLang refuses an empty one)")
    return {"flattened_tensor": torch.cat(flats), "metadata": metadata}


# ---- the receiving side ---------------------------------------------------------------------


def _rebuild_cuda_tensor_by_uuid(*args: Any) -> torch.Tensor:
    device = args[_DEVICE_ARG]
    if isinstance(device, str):
        matches = [i for i in range(torch.cuda.device_count()) if str(torch.cuda.get_device_properties(i).uuid) == device]
        if not matches:
            raise ValueError(f"no visible GPU has uuid {device}")
        args = (*args[:_DEVICE_ARG], matches[0], *args[_DEVICE_ARG + 1 :])
    return reductions.rebuild_cuda_tensor(*args)


class _Record:
    """Stands in for SGLang's own classes (bucket metadata, bucket, per-rank tensor) when a sender
    pickled those: read by attribute like SimpleNamespace."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __getattr__(self, name: str) -> Any:  # the pickled fields, unknown until unpickled
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")


def _record(name: str) -> type:
    return type(name, (_Record,), {})


_SGLANG_CLASSES = {
    ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata"): _record("FlattenedTensorMetadata"),
    ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorBucket"): _record("FlattenedTensorBucket"),
    ("sglang.srt.model_executor.model_runner_components.weight_updater", "LocalSerializedTensor"): _record("LocalSerializedTensor"),
    ("sglang.srt.model_executor.model_runner", "LocalSerializedTensor"): _record("LocalSerializedTensor"),
}
_ALLOWED = {
    ("builtins", n) for n in ("bool", "bytearray", "bytes", "dict", "float", "frozenset", "int", "list", "set", "slice", "str", "tuple", "complex", "range")
} | {
    ("collections", "OrderedDict"), ("copyreg", "__newobj__"), ("copyreg", "__newobj_ex__"), ("copyreg", "_reconstructor"),
    ("types", "SimpleNamespace"), ("multiprocessing.resource_sharer", "DupFd"), ("multiprocessing.reduction", "_rebuild_partial"),
    ("torch", "Size"), ("torch", "device"), ("torch", "Tensor"), ("torch", "UntypedStorage"),
    ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"), ("torch.nn.parameter", "Parameter"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch._tensor", "_rebuild_from_type_v2"),
} | {
    ("torch.multiprocessing.reductions", n)
    for n in ("rebuild_tensor", "rebuild_storage_fd", "rebuild_storage_filename", "rebuild_storage_empty", "rebuild_typed_storage", "rebuild_typed_storage_child", "rebuild_meta_tensor")
}
_CUDA_REBUILDS = {("torch.multiprocessing.reductions", "rebuild_cuda_tensor"), ("sglang.srt.utils.patch_torch", "_rebuild_cuda_tensor_modified")}


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CUDA_REBUILDS:
            return _rebuild_cuda_tensor_by_uuid
        if (module, name) in _SGLANG_CLASSES:
            return _SGLANG_CLASSES[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name.endswith("Storage") and name[:-7].isalnum():
            return super().find_class(module, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name} from a tensor payload")


def load_entry(entry: str | bytes) -> Any:
    """Unpickle one TP rank's entry (base64 text, as on the wire)."""
    data = base64.b64decode(entry, validate=True) if isinstance(entry, str) else bytes(entry)
    return _AllowListUnpickler(io.BytesIO(data)).load()


def named_tensors_of(payload: Any, load_format: str | None, tp_rank: int = 0) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs an entry carries, for each supported `load_format`."""
    if load_format == "flattened_bucket":
        flat, metadata = (payload["flattened_tensor"], payload["metadata"]) if isinstance(payload, dict) else (payload.flattened_tensor, payload.metadata)
        return [(m.name, flat[m.start_idx : m.end_idx].view(m.dtype).reshape(m.shape)) for m in metadata]
    if load_format in (None, "direct"):
        out = []
        for name, tensor in payload:
            if isinstance(tensor, _Record):  # LocalSerializedTensor: one nested entry per TP rank
                tensor = load_entry(tensor.values[tp_rank])
            out.append((name, tensor))
        return out
    raise ValueError(f"load_format {load_format!r} is not one of {list(LOAD_FORMATS)}")
