"""Read a PyTorch checkpoint (`torch.save`'s zip format) without torch, and without trusting it.

The zip holds `<root>/data.pkl` (a pickle of the state dict) and one raw file `<root>/data/<key>`
per storage. The pickle is read with an unpickler that can build only tensors: every global it
asks for must be one of the few tensor-rebuild functions or storage types below, so a checkpoint
cannot run code (`os.system`, `builtins.eval`, ...). Tensor data is not read here: each tensor
becomes a `TensorRef` whose `read()` reads its storage file's bytes when the converter asks.
"""

from __future__ import annotations

import _compat_pickle
import collections
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from mlx_openelm.errors import UserError, is_int

from .tensors import NUMPY_DTYPES, TensorRef, file_bytes, view
from .zip_entries import entry_ranges, entry_reader

# torch.<Name>Storage -> dtype name
STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
LEGACY_FIX = (
    "re-save it with a newer torch: torch.save(torch.load(path, weights_only=True), new_path)"
)


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype: str):
        self.dtype = dtype


class _Storage:
    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: str, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("a tensor without a storage")
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride


def _rebuild_tensor(storage, storage_offset, size, stride, *_rest) -> _Tensor:
    return _Tensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_rest):
    return data  # requires_grad and hooks do not matter here


def _rebuild_from_type(func, _new_type, args, _state):
    return func(*args)


class _Inert:
    """A class named in the pickle that is only ever compared or passed along, never called."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args: Any) -> Any:
        raise pickle.UnpicklingError(f"the checkpoint calls {self.name}")


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    """OrderedDict(pairs), refusing a repeated key (a tensor named twice: which one is meant?)."""
    d: collections.OrderedDict = collections.OrderedDict()
    pairs = (args[0].items() if isinstance(args[0], dict) else args[0]) if args else ()
    for k, v in pairs:
        if k in d:
            raise pickle.UnpicklingError(f"the state dict names {k!r} twice")
        d[k] = v
    return d


# The only globals a checkpoint may name (what torch's own `weights_only=True` loader needs for
# plain tensors and state dicts).
ALLOWED: dict[str, Any] = {
    "collections.OrderedDict": _ordered_dict,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.Tensor": _Inert("torch.Tensor"),
    "torch.nn.parameter.Parameter": _Inert("torch.nn.parameter.Parameter"),
}


def _python3_name(module: str, name: str) -> str:
    # Protocol 2 pickles may use Python 2 names (`__builtin__.eval`), as pickle itself maps them.
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The pure-Python unpickler, so BUILD and SETITEM(S) can be checked too: a pickle may only
    set the attributes of a dict (torch's `_metadata`), and may not name a key twice."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        full = _python3_name(module, name)
        if full in ALLOWED:
            return ALLOWED[full]
        raise pickle.UnpicklingError(f"refused to load `{full}`")

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', storage_type, key, location, numel), as torch.save writes it
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.200}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r:.100}")
        if not isinstance(key, (str, int)) or not is_int(numel) or not 0 <= numel < 1 << 48:
            raise pickle.UnpicklingError(f"bad storage {key!r:.100} of {numel!r:.100} elements")
        return _Storage(str(key), storage_type.dtype, numel)

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        if not (type(inst) is collections.OrderedDict and isinstance(state, dict)):
            raise pickle.UnpicklingError(f"the pickle modifies a {type(inst).__name__}")
        if not all(isinstance(k, str) for k in state):
            raise pickle.UnpicklingError("the pickle sets an attribute that is not a name")
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    def load_setitem(self) -> None:
        self._check_keys(self.stack[-3], [self.stack[-2]])
        pickle._Unpickler.load_setitem(self)  # type: ignore[attr-defined]

    def load_setitems(self) -> None:
        below = self.metastack[-1] if self.metastack else []  # the stack under the MARK
        self._check_keys(below[-1] if below else None, self.stack[::2])
        pickle._Unpickler.load_setitems(self)  # type: ignore[attr-defined]

    @staticmethod
    def _check_keys(d: Any, keys: list) -> None:
        if not isinstance(d, dict):
            raise pickle.UnpicklingError(f"the pickle sets items of a {type(d).__name__}")
        seen = set(d)
        for k in keys:
            if k in seen:
                raise pickle.UnpicklingError(f"the state dict names {k!r:.100} twice")
            seen.add(k)

    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems


def _not_a_zip(path: Path) -> UserError:
    with open(path, "rb") as f:
        head = f.read(512)
    # The legacy format is a bare pickle (or, before torch 0.4, a tar archive).
    if head[:4] == b"PK\x03\x04":
        return UserError(f"{path} is a truncated or corrupt zip: re-download or re-save it")
    if head[:1] == b"\x80" or head[257:262] == b"ustar":
        return UserError(f"{path} is in PyTorch's legacy (pre-1.6) format: {LEGACY_FIX}")
    return UserError(f"{path} is not a PyTorch checkpoint (not a zip file)")


def read_torch_zip(path: str | Path) -> dict[str, Any]:
    """The unpickled checkpoint, with every tensor as a `TensorRef` (nothing read yet).

    Raises ValueError for a legacy or corrupt file, or a pickle that names anything but tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such checkpoint: {path}")
    if not zipfile.is_zipfile(path):
        raise _not_a_zip(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise UserError(f"{path}: corrupt zip ({e}): re-download or re-save it") from None
    with zf:
        pkls = sorted((n for n in zf.namelist() if n.endswith("data.pkl")), key=len)
        if not pkls:
            raise UserError(f"{path} is a zip without data.pkl: not a PyTorch checkpoint")
        root = pkls[0][: -len("data.pkl")]
        big_endian = root + "byteorder" in zf.namelist() and zf.read(root + "byteorder") == b"big"
        try:
            obj = RestrictedUnpickler(zf.open(pkls[0])).load()
        except pickle.UnpicklingError as e:
            raise UserError(
                f"{path}: {e}; a PyTorch checkpoint should hold only tensors, so this file was "
                "not loaded (it may be malicious)"
            ) from None
        except Exception as e:  # a corrupt pickle can raise almost anything
            raise UserError(f"{path}: corrupt data.pkl ({type(e).__name__}: {e})") from None
        spans = entry_ranges(path, zf)
        infos = {i.filename: i for i in zf.infolist()}
        return _resolve(obj, path, root, infos, spans, big_endian)


MAX_DEPTH = 32  # a state dict nests 1-4 levels; deeper (or a self-referencing pickle) is refused


def _resolve(obj: Any, path: Path, root: str, infos: dict, spans: dict, big_endian: bool) -> Any:
    """Replace every `_Tensor` in the unpickled object with a checked `TensorRef`."""
    read_bytes = file_bytes(path)
    storages: dict[str, Any] = {}

    def storage_reader(s: _Storage) -> Any:
        if s.key not in storages:
            name = f"{root}data/{s.key}"
            if name not in infos:
                raise UserError(f"{path}: storage data/{s.key} is missing: truncated or corrupt")
            nbytes = s.numel * np.dtype(NUMPY_DTYPES[s.dtype]).itemsize
            storages[s.key] = (s, entry_reader(path, infos[name], spans[name], read_bytes, nbytes))
        first, read = storages[s.key]
        if (first.dtype, first.numel) != (s.dtype, s.numel):
            raise UserError(f"{path}: storage data/{s.key} is given two different sizes")
        return read

    def to_ref(t: _Tensor) -> TensorRef:
        s = t.storage
        dims = (*t.shape, *t.stride, t.offset)
        if len(t.stride) != len(t.shape) or any(not is_int(d) or d < 0 for d in dims):
            # torch never writes negative strides; they would read outside the storage
            raise UserError(f"{path}: a tensor has a bad shape {t.shape} / stride {t.stride}")
        numel = math.prod(t.shape)  # Python ints: a crafted shape cannot overflow
        last = t.offset + sum((d - 1) * st for d, st in zip(t.shape, t.stride, strict=True))
        last = last if numel else -1
        if last >= s.numel or len(t.shape) > 8 or any(d >= 1 << 31 for d in t.shape):
            raise UserError(
                f"{path}: a tensor of shape {t.shape} reaches past its storage data/{s.key}"
            )
        raw = storage_reader(s)

        def read() -> np.ndarray:
            flat = view(raw(), s.dtype, (s.numel,), big_endian)
            if numel == 0:
                return np.zeros(t.shape, flat.dtype)
            item = flat.dtype.itemsize
            return np.lib.stride_tricks.as_strided(
                flat[t.offset :], t.shape, [st * item for st in t.stride], writeable=False
            )

        return TensorRef(t.shape, s.dtype, path, read)

    def walk(o: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise UserError(
                f"{path}: data.pkl nests deeper than {MAX_DEPTH} levels (or refers to "
                "itself): not a state dict"
            )
        if isinstance(o, _Tensor):
            return to_ref(o)
        if isinstance(o, (_Storage, _StorageType, _Inert)):
            raise UserError(f"{path}: data.pkl holds a bare {type(o).__name__.strip('_')}")
        if isinstance(o, dict):
            return type(o)((k, walk(v, depth + 1)) for k, v in o.items())
        if isinstance(o, (list, tuple)):
            return type(o)(walk(v, depth + 1) for v in o)
        return o

    return walk(obj)
