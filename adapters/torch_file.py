"""Files written by `torch.save`, read without torch: a restricted unpickler and the standard library.

The pickle sandbox's child (adapters/sandbox.py) reads with this module. It imports neither torch
nor numpy, so a child starts in a few hundredths of a second and a few MiB, where torch took two
seconds and a GiB of address space.

The unpickler resolves only these globals; any other is code, and it is refused by name without
being imported:

- `torch._utils._rebuild_tensor_v2`, `_rebuild_tensor`, `_rebuild_parameter` and
  `_rebuild_parameter_with_state`, which make a `TensorRecord`: a storage, an offset, a size and a
  stride, checked only when the tensor is copied out;
- torch's storage types (`torch.FloatStorage` and the like), which only name a dtype;
- `collections.OrderedDict`, the type of a module's `state_dict()`, and `torch.Size` as a tuple;
- torch's other `_rebuild_*` functions (sparse, quantized, nested and meta tensors), its layouts,
  dtypes, quantization schemes and memory formats, and `torch.serialization._get_layout`: inert
  markers. A tensor built from them is `Unsupported`, which the caller refuses as a layout.

What the pickle makes is inert: records that refuse to be changed after they are made, markers
that cannot be called, and plain containers. Formats: the zip archive `torch.save` writes (since
PyTorch 1.6), and the older stream (`_use_new_zipfile_serialization=False`), in either byte order.
"""

from __future__ import annotations

import array
import io
import itertools
import json
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from typing import Any, BinaryIO

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch's storage type name: (dtype name, bytes per element, safetensors dtype or None)
_STORAGES = {
    "FloatStorage": ("float32", 4, "F32"),
    "DoubleStorage": ("float64", 8, "F64"),
    "HalfStorage": ("float16", 2, "F16"),
    "BFloat16Storage": ("bfloat16", 2, "BF16"),
    "LongStorage": ("int64", 8, None),
    "IntStorage": ("int32", 4, None),
    "ShortStorage": ("int16", 2, None),
    "CharStorage": ("int8", 1, None),
    "ByteStorage": ("uint8", 1, None),
    "BoolStorage": ("bool", 1, None),
    "ComplexFloatStorage": ("complex64", 8, None),
    "ComplexDoubleStorage": ("complex128", 16, None),
    "QInt8Storage": ("qint8", 1, None),
    "QUInt8Storage": ("quint8", 1, None),
    "QInt32Storage": ("qint32", 4, None),
    "QUInt4x2Storage": ("quint4x2", 1, None),
    "QUInt2x4Storage": ("quint2x4", 1, None),
    "UntypedStorage": ("uint8", 1, None),
}
# Same-width unsigned integers move the elements: nothing is computed, so bfloat16 needs no type.
_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
# torch's other rebuilding functions: the kind of tensor each makes, which the caller refuses.
_UNSUPPORTED_REBUILDS = {
    "_rebuild_sparse_tensor": "sparse",
    "_rebuild_sparse_csr_tensor": "sparse",
    "_rebuild_qtensor": "quantized",
    "_rebuild_nested_tensor": "nested",
    "_rebuild_meta_tensor_no_storage": "a meta tensor",
    "_rebuild_wrapper_subclass": "a tensor subclass",
    "_rebuild_device_tensor_from_numpy": "a device tensor",
    "_rebuild_device_tensor_from_cpu_tensor": "a device tensor",
    "_rebuild_xla_tensor": "a device tensor",
    "_rebuild_mtia_tensor": "a device tensor",
}
_TORCH_NAMES = frozenset(
    {
        *("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn", "jagged"),
        *("per_tensor_affine", "per_channel_affine", "per_tensor_symmetric", "per_channel_symmetric"),
        *("per_channel_affine_float_qparams", "contiguous_format", "channels_last", "preserve_format"),
        *("float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64", "long", "int32"),
        *("int", "int16", "short", "int8", "uint8", "bool", "complex64", "complex128", "qint8", "quint8"),
        *("qint32", "quint4x2", "quint2x4"),
    }
)


class Malformed(Exception):
    """The file is no torch.save file, or its parts do not fit together."""


class TooLarge(Exception):
    """A tensor larger than the caller allows."""


class CodeInPickle(Exception):
    """The pickle names a global outside the list: `name` is `module.attribute`."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _Frozen:
    """Fields set once in __init__; a pickle's BUILD or SETITEM cannot change them afterwards."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} cannot be changed")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} cannot be changed")


class StorageType(_Frozen):
    __slots__ = ("name", "dtype", "itemsize", "safetensors")

    def __init__(self, name: str):
        dtype, itemsize, safetensors = _STORAGES.get(name, (name.removesuffix("Storage").lower(), 1, None))
        for field, value in zip(self.__slots__, (name, dtype, itemsize, safetensors), strict=True):
            object.__setattr__(self, field, value)


class Storage(_Frozen):
    """A storage the pickle refers to by key; its bytes are the reader's, looked up by key."""

    __slots__ = ("type", "key", "numel", "start")

    def __init__(self, storage_type: StorageType, key: str, numel: int, start: int = 0):
        for field, value in zip(self.__slots__, (storage_type, key, numel, start), strict=True):
            object.__setattr__(self, field, value)


class TensorRecord(_Frozen):
    __slots__ = ("storage", "offset", "size", "stride", "lazy_sign")

    def __init__(self, storage: Storage, offset: int, size: tuple, stride: tuple, lazy_sign: bool):
        for field, value in zip(self.__slots__, (storage, offset, size, stride, lazy_sign), strict=True):
            object.__setattr__(self, field, value)


class Unsupported(_Frozen):
    """A tensor this reader does not copy out: `what` says what kind it is."""

    __slots__ = ("what",)

    def __init__(self, what: str):
        object.__setattr__(self, "what", what)


class _Marker(_Frozen):
    """A torch name (a dtype, a layout) that only serves as an argument: it cannot be called."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)


def _record(storage, storage_offset, size, stride, lazy_sign: bool) -> TensorRecord:
    if not isinstance(storage, Storage):
        raise Malformed("a tensor without a storage")
    return TensorRecord(storage, storage_offset, size, stride, lazy_sign)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _record(storage, storage_offset, size, stride, False)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    # metadata carries torch's conj or neg bit: then the values are not what the storage holds
    return _record(storage, storage_offset, size, stride, bool(metadata))


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


def _unsupported_rebuild(kind: str):
    def rebuild(*args):
        return Unsupported(kind)

    return rebuild


_REBUILDS = {
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter_with_state,
}


def _find_global(module: str, name: str) -> Any:
    if module == "collections" and name == "OrderedDict":
        return OrderedDict
    if module == "torch._utils" and name in _REBUILDS:
        return _REBUILDS[name]
    if module == "torch._utils" and name in _UNSUPPORTED_REBUILDS:
        return _unsupported_rebuild(_UNSUPPORTED_REBUILDS[name])
    if module == "torch" and name.endswith("Storage") and name.isidentifier():
        return StorageType(name)
    if module == "torch" and name == "Size":
        return tuple
    if module == "torch" and name in _TORCH_NAMES:
        return _Marker(name)
    if module == "torch.serialization" and name == "_get_layout":
        return _Marker
    raise CodeInPickle(f"{module}.{name}"[:120])


class _Unpickler(pickle.Unpickler):
    def __init__(self, stream: BinaryIO, persistent_load=None):
        super().__init__(stream, encoding="utf-8")
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        return _find_global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise Malformed("a reference to outside data where none may be")
        return self._persistent(pid)


def _storage_from(pid: Any, *, legacy: bool) -> tuple[Storage, tuple | None]:
    if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
        raise Malformed("an unknown reference")
    if len(pid) != (6 if legacy else 5):
        raise Malformed("a storage reference of the wrong length")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
        raise Malformed("a storage reference of the wrong shape")
    return Storage(storage_type, key, numel), (pid[5] if legacy else None)


class Loaded:
    """What a torch.save file held, with its storages' bytes: `tensor_bytes` copies one out."""

    def __init__(self, obj: Any, data: dict[str, bytes | memoryview], big_endian: bool):
        self.obj = obj
        self._data = data
        self._big_endian = big_endian

    def tensor_bytes(self, record: TensorRecord, max_bytes: int) -> tuple[str, list[int], memoryview]:
        """(safetensors dtype, shape, little-endian C-order bytes) of a float tensor.

        Raises Malformed when the record points outside its storage, and TooLarge past `max_bytes`.
        The caller checks `record.storage.type.safetensors` first.
        """
        storage, offset, size, stride = record.storage, record.offset, record.size, record.stride
        if not (isinstance(size, tuple | list) and isinstance(stride, tuple | list) and len(size) == len(stride)):
            raise Malformed("a tensor's size and stride do not match")
        if not all(type(n) is int and n >= 0 for n in (offset, *size, *stride)) or len(size) > 64:
            raise Malformed("a tensor's size, stride or offset is not a count")
        itemsize = storage.type.itemsize
        count = math.prod(size)
        if count * itemsize > max_bytes:
            raise TooLarge(f"{count * itemsize} bytes")
        raw = self._data.get(storage.key)
        if raw is None:
            raise Malformed("a tensor's storage is missing")
        available = min(storage.numel, len(raw) // itemsize) - storage.start
        if count and offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) >= available:
            raise Malformed("a tensor reaches past its storage")
        code = _CODES[itemsize]
        elements = memoryview(raw)[: (storage.start + available) * itemsize].cast(code)
        base = storage.start + offset
        if count == 0:
            values = b""
        elif _is_contiguous(size, stride):
            values = elements[base : base + count]
        else:  # one slice per innermost row, in C order
            rows = []
            last_size, last_stride = size[-1], stride[-1]
            for index in itertools.product(*(range(n) for n in size[:-1])):
                first = base + sum(i * s for i, s in zip(index, stride, strict=False))
                if last_stride == 0:
                    rows.append(elements[first : first + 1].tobytes() * last_size)
                else:
                    rows.append(elements[first : first + (last_size - 1) * last_stride + 1 : last_stride].tobytes())
            values = b"".join(rows)
        if self._big_endian and itemsize > 1:
            swapped = array.array(code)
            swapped.frombytes(memoryview(values).cast("B"))
            swapped.byteswap()
            values = swapped.tobytes()
        return storage.type.safetensors, list(size), memoryview(values).cast("B")


def _is_contiguous(size: tuple, stride: tuple) -> bool:
    expected = 1
    for n, step in zip(reversed(size), reversed(stride), strict=True):
        if n != 1 and step != expected:
            return False
        expected *= n
    return True


def load(data: bytes) -> Loaded:
    """Read a torch.save file from `data`. Raises CodeInPickle, Malformed, and the pickle module's errors."""
    if data[:4] == b"PK\x03\x04":
        return _load_zip(data)
    return _load_legacy(data)


def _load_zip(data: bytes) -> Loaded:
    archive = zipfile.ZipFile(io.BytesIO(data))
    pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise Malformed("no single data.pkl in the archive")
    prefix = pickles[0].removesuffix("data.pkl")
    names = set(archive.namelist())
    order = archive.read(prefix + "byteorder") if prefix + "byteorder" in names else b"little"
    if order not in (b"little", b"big"):
        raise Malformed("an unknown byte order")
    storages: dict[str, bytes] = {}

    def persistent_load(pid: Any) -> Storage:
        storage, _ = _storage_from(pid, legacy=False)
        if storage.key not in storages:
            entry = prefix + "data/" + storage.key
            if entry not in names:
                raise Malformed("a storage is missing from the archive")
            storages[storage.key] = archive.read(entry)
        return storage

    obj = _Unpickler(io.BytesIO(archive.read(pickles[0])), persistent_load).load()
    return Loaded(obj, storages, big_endian=order == b"big")


def _load_legacy(data: bytes) -> Loaded:
    stream = io.BytesIO(data)
    if _Unpickler(stream).load() != LEGACY_MAGIC:
        raise Malformed("no torch.save magic number")
    if _Unpickler(stream).load() != LEGACY_PROTOCOL:
        raise Malformed("an unknown torch.save protocol version")
    sys_info = _Unpickler(stream).load()
    big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
    roots: dict[str, StorageType] = {}
    views: dict[str, Storage] = {}

    def persistent_load(pid: Any) -> Storage:
        storage, view = _storage_from(pid, legacy=True)
        if roots.setdefault(storage.key, storage.type).name != storage.type.name:
            raise Malformed("one storage read as two types")
        if view is None:
            return storage
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)):
            raise Malformed("a storage view of the wrong shape")
        view_key, start, view_numel = view
        if type(start) is not int or type(view_numel) is not int or start < 0 or view_numel < 0:
            raise Malformed("a storage view of the wrong shape")
        return views.setdefault(view_key, Storage(storage.type, storage.key, start + view_numel, start))

    obj = _Unpickler(stream, persistent_load).load()
    keys = _Unpickler(stream).load()
    if not isinstance(keys, list) or set(keys) != set(roots) or len(keys) != len(roots):
        raise Malformed("the storages listed are not those the pickle refers to")
    order = ">" if big_endian else "<"
    storages: dict[str, memoryview] = {}
    view = memoryview(data)
    for key in keys:
        size_field = stream.read(8)
        if len(size_field) != 8:
            raise Malformed("a storage is cut short")
        (numel,) = struct.unpack(order + "q", size_field)
        start, length = stream.tell(), numel * roots[key].itemsize
        if numel < 0 or start + length > len(data):
            raise Malformed("a storage is cut short")
        storages[key] = view[start : start + length]
        stream.seek(start + length)
    return Loaded(obj, storages, big_endian)


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], memoryview]]) -> list[bytes | memoryview]:
    """The parts of a safetensors file holding `tensors`, in order: the header, then each tensor's bytes."""
    header: dict[str, Any] = {}
    position = 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + len(raw)]}
        position += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return [struct.pack("<Q", len(encoded)), encoded, *(raw for _, _, raw in tensors.values())]


def warm_up() -> None:
    """Use once what a load uses, so that nothing is imported lazily after the sandbox's lock-down."""
    b"x".decode("cp437")  # zipfile decodes names that are not UTF-8 as cp437
    sample = io.BytesIO()
    with zipfile.ZipFile(sample, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"a": 1}))
        archive.writestr("archive/data/0", b"\0" * 16, compress_type=zipfile.ZIP_DEFLATED)
    _load_zip(sample.getvalue())
    storages = {"0": zipfile.ZipFile(sample).read("archive/data/0")}
    for itemsize, name, stride in ((4, "FloatStorage", (1, 2)), (2, "BFloat16Storage", (2, 1))):
        record = TensorRecord(Storage(StorageType(name), "0", 16 // itemsize), 0, (2, 2), stride, False)
        for big_endian in (False, True):
            b"".join(safetensors_bytes({"w": Loaded(None, storages, big_endian).tensor_bytes(record, 64)}))
