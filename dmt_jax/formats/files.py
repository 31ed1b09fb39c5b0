"""Reading a checkpoint file into a dict of arrays without running anything from it.

- .pth / .pth.tar / .bin / .pt written by torch.save: torch.load(weights_only=True) (tensors, plain
  containers and argparse.Namespace only).
- TorchScript archives (OpenAI CLIP's ViT-B-16.pt ...): the tensors of data.pkl, read by a restricted
  unpickler that maps the archive's storages; the archive's TorchScript code is never compiled or run.
- .safetensors: safetensors.
- .npz (big_vision): np.load(allow_pickle=False), every array read (a truncated file fails here).
torch is imported only inside functions.
"""

from __future__ import annotations

import argparse
import collections
import io
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dmt_jax.formats._base import FormatError


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def read_checkpoint(src) -> Mapping:
    """The checkpoint's top-level dict (tensors, or numpy arrays for .npz); FormatError (one line) else."""
    path = Path(src)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    if path.name.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.name.endswith(".npz"):
        return read_npz(path)
    if torchscript_prefix(path) is not None:
        return read_torchscript(path)
    return _read_torch(path)


def _read_safetensors(path: Path) -> Mapping:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{path}: not a readable safetensors file ({_first_line(e)})") from e


def _read_torch(path: Path) -> Mapping:
    import torch

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # DINO/iBOT/MAE training files hold args
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            lines = [line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
            why = lines[0].strip() if lines else _first_line(e)
            raise FormatError(
                f"{path}: refused to unpickle: it holds more than tensors, containers and argparse.Namespace "
                f"({why}); nothing in it was run"
            ) from e
        raise FormatError(f"{path}: not a PyTorch checkpoint ({_first_line(e)})") from e
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile, AttributeError) as e:
        raise FormatError(f"{path}: truncated or not a PyTorch checkpoint ({_first_line(e)})") from e
    if not isinstance(ckpt, Mapping):
        raise FormatError(f"{path}: not a checkpoint: it holds a {type(ckpt).__name__}, not a dict")
    return ckpt


# ---------------------------------------------------------------- big_vision .npz


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of a .npz, read now (np.load is lazy: a truncated file would fail later, mid-way)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: np.asarray(npz[name]) for name in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise FormatError(f"{path}: truncated or not an .npz file ({_first_line(e)})") from e


# ---------------------------------------------------------------- TorchScript archives


def torchscript_prefix(path: Path) -> str | None:
    """The archive folder of a TorchScript zip ('ViT-B-16/'), None for anything else (torch.save zips
    have data.pkl too, but no code/ or constants.pkl)."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    for name in names:
        if name.endswith("/data.pkl"):
            prefix = name[: -len("data.pkl")]
            if any(n.startswith(prefix + "code/") or n == prefix + "constants.pkl" for n in names):
                return prefix
    return None


class TorchScriptState(dict):
    """The tensors of a TorchScript archive by attribute path: only OpenAI released CLIP this way."""


class _ScriptObject:
    """A TorchScript module object (GLOBAL '__torch__...'): keeps its attributes, runs nothing."""

    def __init__(self, *args):
        self.state: dict = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


_STORAGE_DTYPES = {  # torch.<Name>Storage -> torch dtype name
    "HalfStorage": "float16", "FloatStorage": "float32", "DoubleStorage": "float64",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}  # fmt: skip


class _TorchScriptUnpickler(pickle.Unpickler):
    """Rebuilds data.pkl's objects from an allow-list: module objects become _ScriptObject, tensors are
    views of the archive's storages; any other global is refused."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module: str, name: str):
        import torch

        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return getattr(torch, _STORAGE_DTYPES[name])
        if module == "torch.jit._pickle" and name.startswith("build_"):
            return lambda values: values
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return lambda value, type_str: value
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid):
        import torch

        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, dtype, key, _location, numel = pid
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            storage = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if storage.numel() < numel:
                raise pickle.UnpicklingError(f"storage {key} holds {storage.numel()} values, not {numel}")
            self.storages[key] = storage
        return self.storages[key]


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    import torch

    return torch.as_strided(storage, tuple(size), tuple(stride), offset).clone()


def read_torchscript(path: Path) -> TorchScriptState:
    """{'visual.conv1.weight': tensor, ...}: every tensor attribute of the archive's module tree, named by
    its attribute path as the module's state_dict names it."""
    import torch

    prefix = torchscript_prefix(path)
    try:
        with zipfile.ZipFile(path) as archive:
            root = _TorchScriptUnpickler(archive.read(f"{prefix}data.pkl"), archive, prefix).load()
    except pickle.UnpicklingError as e:
        why = _first_line(e)
        raise FormatError(f"{path}: refused to read the TorchScript archive ({why}); nothing was run") from e
    except (EOFError, KeyError, ValueError, RuntimeError, OSError, zipfile.BadZipFile, TypeError) as e:
        raise FormatError(f"{path}: truncated or damaged TorchScript archive ({_first_line(e)})") from e
    tensors: dict = {}

    def walk(obj, name: str, depth: int = 0):
        if depth > 64:
            raise FormatError(f"{path}: TorchScript modules nested deeper than 64 levels")
        for key, value in obj.state.items():
            if isinstance(value, torch.Tensor):
                tensors[name + key] = value
            elif isinstance(value, _ScriptObject):
                walk(value, f"{name}{key}.", depth + 1)

    if isinstance(root, _ScriptObject):
        walk(root, "")
    if not tensors:
        raise FormatError(f"{path}: a TorchScript archive holding no tensors: nothing to convert")
    return TorchScriptState(tensors)
