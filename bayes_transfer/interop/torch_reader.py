"""Read PyTorch ``.pt`` files without torch and without running pickled code.

``torch.save`` (torch >= 1.6) writes a zip archive::

    NAME/data.pkl          a pickle of the saved object; tensors are references to storages
    NAME/data/0, data/1    the raw bytes of each storage (little-endian unless byteorder says)
    NAME/byteorder         "little" or "big"
    NAME/version           the serialization version ("3")

Unpickling ``data.pkl`` with the standard :mod:`pickle` would run whatever callables it
names, so a downloaded ``.pt`` file can execute arbitrary code. :func:`load` unpickles
it with a restricted unpickler instead: the only globals it resolves are

=====================================================  =====================================
global in the pickle                                   what it becomes here
=====================================================  =====================================
``torch._utils._rebuild_tensor_v2``                    a numpy array built from the storage
                                                       bytes with the given offset, shape and
                                                       strides (all checked against the storage)
``torch._utils._rebuild_parameter``                    the same array (``nn.Parameter`` data)
``torch._utils._rebuild_parameter_with_state``         the same array (the state must be empty)
``collections.OrderedDict``                            a dict (state dicts; ``_metadata`` dropped)
``torch.FloatStorage``, ``DoubleStorage``,             the dtype of a storage, used only inside
``HalfStorage``, ``BFloat16Storage``,                  the persistent id ``('storage', type, key,
``LongStorage``, ``IntStorage``, ``ShortStorage``,     location, numel)``
``CharStorage``, ``ByteStorage``, ``BoolStorage``,
``ComplexFloatStorage``, ``ComplexDoubleStorage``
=====================================================  =====================================

Every other global (whether reached through ``GLOBAL``, ``STACK_GLOBAL``, ``INST``,
``OBJ``, ``NEWOBJ``, ``REDUCE`` or an extension code) raises :class:`UnsafePickleError`
naming it, before anything is called. ``REDUCE`` can therefore only call the functions
above, and ``BUILD`` can only set plain attributes of a state dict (``_metadata``);
``BUILD`` on anything else is refused. Each storage is checked against its zip entry
(``numel × itemsize`` must equal the entry's size) and each tensor's offset, shape and
strides against its storage, so a file cannot make the reader read out of bounds or
allocate absurd amounts of memory.

Example::

    from bayes_transfer.interop import torch_reader
    state_dict = torch_reader.load("resnet50_ssl_prior_model.pt")   # {name: np.ndarray}
    mean = torch_reader.load("resnet50_ssl_prior_mean.pt")           # np.ndarray (d,)

Arrays of contiguous tensors are views of their storage's buffer (tensors that share a
storage in the file share memory, as in torch); bfloat16 tensors come back as
``ml_dtypes.bfloat16`` arrays. Legacy (pre-1.6, non-zip) files raise
:class:`LegacyTorchFormatError`: re-save them with a recent torch.
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from bayes_transfer.errors import (BayesTransferError, LegacyTorchFormatError, TorchFormatError,
                                   UnsafePickleError)

try:
    from lzma import LZMAError as _LZMAError
except ImportError:             # Python built without lzma: zipfile cannot produce it either
    class _LZMAError(Exception):
        pass

#: What zipfile raises on a corrupt archive or member: besides BadZipFile, a header field
#: can ask for encryption (RuntimeError: password required), a newer zip version or an
#: unknown method (NotImplementedError), or route garbage through a decompressor.
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError,
               NotImplementedError, RuntimeError, _LZMAError)

__all__ = ["load", "ALLOWED_GLOBALS", "STORAGE_DTYPES", "MAX_PICKLE_BYTES", "MAX_NDIM"]

#: torch storage class name -> numpy dtype.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}

#: Largest ``data.pkl`` accepted (a ResNet-50 state dict's pickle is ~50 KB).
MAX_PICKLE_BYTES = 256 << 20
#: Most dimensions a tensor may have.
MAX_NDIM = 32
# deflate cannot expand data by more than ~1032x; a bigger claimed size is a zip bomb
_MAX_DEFLATE_RATIO = 1032
_CHUNK = 16 << 20
_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_RESAVE = ("load it with torch (`obj = torch.load(path, weights_only=True)`) and save it "
           "again with `torch.save(obj, new_path)` from torch >= 1.6")


# ====================================================================== public API
def load(path, *, max_pickle_bytes: int = MAX_PICKLE_BYTES) -> Any:
    """The object saved in the ``.pt`` file ``path``, with tensors as numpy arrays.

    Nested dicts (state dicts, ``OrderedDict`` included), lists and tuples are kept;
    tensors and ``nn.Parameter`` become ``np.ndarray``; strings, numbers, booleans and
    ``None`` come back as themselves. Nothing in the file is executed.

    Raises:
      UnsafePickleError: the pickle names a global outside the allowlist (the module
        docstring lists it), or uses ``BUILD`` on something other than a state dict.
      LegacyTorchFormatError: the file is a pre-1.6 (non-zip) torch file.
      TorchFormatError: anything else wrong with the file: not a torch file, truncated
        or corrupt zip, a storage whose size disagrees with its declared element count,
        a tensor whose offset or strides reach outside its storage, absurd sizes.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise TorchFormatError(f"no PyTorch file at {path}: "
                               f"{'not a regular file' if path.exists() else 'it does not exist'}")
    if not zipfile.is_zipfile(path):
        _explain_not_zip(path)
    try:
        archive = zipfile.ZipFile(path)
    except _ZIP_ERRORS as e:
        raise TorchFormatError(f"{path} is not a readable torch.save zip archive ({e}); the "
                               f"file is truncated or corrupt: download or save it again") from None
    with archive:
        reader = _ArchiveReader(path, archive, max_pickle_bytes)
        return reader.load()


# ====================================================================== archive
def _explain_not_zip(path: Path):
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PK"):
        raise TorchFormatError(f"{path} starts like a zip archive but has no readable central "
                               f"directory: the file is truncated or corrupt (an incomplete "
                               f"download?); download or save it again")
    if head[:1] == b"\x80" and _LEGACY_MAGIC in head[:64]:
        raise LegacyTorchFormatError(
            f"{path} was written in torch's legacy (pre-1.6, non-zip) format, which this "
            f"reader does not parse (it is a pickle stream that would have to be trusted); "
            f"{_RESAVE}")
    if len(head) > 262 and head[257:262] == b"ustar":
        raise LegacyTorchFormatError(
            f"{path} is a tar archive: torch's oldest (< 0.4) serialization format; {_RESAVE}")
    if head[:1] == b"\x80":
        raise LegacyTorchFormatError(
            f"{path} is a bare pickle, not a torch.save zip archive (torch < 1.6, "
            f"_use_new_zipfile_serialization=False, or plain pickle.dump); a bare pickle can "
            f"run code when loaded and is not read here; {_RESAVE}")
    raise TorchFormatError(f"{path} is not a PyTorch file: torch.save (>= 1.6) writes a zip "
                           f"archive holding data.pkl and data/<n> storage files")


class _ArchiveReader:
    def __init__(self, path: Path, archive: zipfile.ZipFile, max_pickle_bytes: int):
        self.path = path
        self.zip = archive
        self.max_pickle_bytes = max_pickle_bytes
        self.file_size = path.stat().st_size
        infos = archive.infolist()
        if not infos:
            raise TorchFormatError(f"{path} is an empty zip archive, not a torch.save file")
        self.infos = {i.filename: i for i in infos}
        root = infos[0].filename.split("/", 1)[0]
        if not all(name.startswith(root + "/") for name in self.infos):
            raise TorchFormatError(f"{path} is a zip archive but not a torch.save file: its "
                                   f"entries do not all sit under one top-level folder")
        self.root = root
        if f"{root}/data.pkl" not in self.infos:
            if f"{root}/constants.pkl" in self.infos or any(
                    n.startswith(f"{root}/code/") for n in self.infos):
                raise TorchFormatError(f"{path} is a TorchScript archive (torch.jit.save), not a "
                                       f"torch.save file; save the state dict instead: "
                                       f"torch.save(model.state_dict(), path)")
            raise TorchFormatError(f"{path} is a zip archive without {root}/data.pkl; it is not "
                                   f"a torch.save file")
        self.byteorder = self._byteorder()
        self.storages: dict[str, np.ndarray] = {}

    def _read_small(self, name: str, limit: int) -> bytes:
        info = self.infos[name]
        if info.file_size > limit:
            raise TorchFormatError(f"{self.path}: {name} is {info.file_size} bytes, more than the "
                                   f"{limit} accepted; refusing an absurd size")
        try:
            return self.zip.read(info)
        except _ZIP_ERRORS as e:
            raise TorchFormatError(f"{self.path}: cannot read {name} ({e}); the file is "
                                   f"truncated or corrupt: download or save it again") from None

    def _byteorder(self) -> str:
        name = f"{self.root}/byteorder"
        if name not in self.infos:
            return "little"          # files from before torch recorded it were little-endian
        value = self._read_small(name, 64).decode("ascii", "replace").strip()
        if value not in ("little", "big"):
            raise TorchFormatError(f"{self.path}: byteorder record says {value!r}, expected "
                                   f"'little' or 'big'")
        return value

    def load(self):
        data = self._read_small(f"{self.root}/data.pkl", self.max_pickle_bytes)
        self._check_memo_indices(data)
        unpickler = _RestrictedUnpickler(io.BytesIO(data), self)
        try:
            obj = unpickler.load()
        except BayesTransferError:
            raise
        except RecursionError:
            raise TorchFormatError(f"{self.path}: data.pkl nests too deeply to be a state dict") \
                from None
        except MemoryError:
            raise TorchFormatError(f"{self.path}: data.pkl asks for more memory than is "
                                   f"available; refusing it") from None
        except Exception as e:  # noqa: BLE001 - any other failure is a malformed pickle
            raise TorchFormatError(f"{self.path}: data.pkl is not a valid torch pickle "
                                   f"({type(e).__name__}: {e})") from None
        try:
            return _materialize(obj, self)
        except BayesTransferError:
            raise
        except RecursionError:
            raise TorchFormatError(f"{self.path}: data.pkl nests too deeply to be a state dict") \
                from None
        except Exception as e:  # noqa: BLE001 - e.g. an array used as a dict key
            raise TorchFormatError(f"{self.path}: data.pkl is not a valid torch pickle "
                                   f"({type(e).__name__}: {e})") from None

    def _check_memo_indices(self, data: bytes) -> None:
        """Refuse memo indices that no pickle of this length uses, before unpickling.

        The C unpickler grows its memo table to twice the largest index a PUT names and
        zero-fills it, so a 5-byte ``LONG_BINPUT`` with index 10**9 commits 16 GB. Memo
        indices are handed out in order, one per memoising opcode, so a real pickle's
        indices stay below its length. Nothing is executed by the scan.
        """
        try:
            for op, arg, pos in pickletools.genops(data):
                if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and arg >= len(data):
                    raise TorchFormatError(
                        f"{self.path}: data.pkl stores memo index {arg} (at byte {pos}) in a "
                        f"{len(data)}-byte pickle; refusing an absurd memo size")
        except TorchFormatError:
            raise
        except Exception as e:  # noqa: BLE001 - genops reports malformed opcodes variously
            raise TorchFormatError(f"{self.path}: data.pkl is not a valid torch pickle "
                                   f"({type(e).__name__}: {e})") from None

    # ------------------------------------------------------------------ storages
    def storage(self, ref: "_StorageRef") -> np.ndarray:
        """The 1-d array of a storage, read (once) from its zip entry and checked."""
        cached = self.storages.get(ref.key)
        if cached is not None:
            if cached.dtype != ref.dtype or cached.size != ref.numel:
                raise TorchFormatError(
                    f"{self.path}: storage {ref.key!r} is referenced both as {cached.size} "
                    f"{cached.dtype} and as {ref.numel} {ref.dtype}")
            return cached
        name = f"{self.root}/data/{ref.key}"
        info = self.infos.get(name)
        if info is None:
            raise TorchFormatError(f"{self.path}: the pickle references storage {ref.key!r} but "
                                   f"the archive has no {name}; the file is truncated or corrupt")
        nbytes = ref.numel * ref.dtype.itemsize
        if info.file_size != nbytes:
            raise TorchFormatError(
                f"{self.path}: storage {ref.key!r} is declared as {ref.numel} {ref.dtype} "
                f"values ({nbytes} bytes) but {name} holds {info.file_size} bytes; the file is "
                f"corrupt")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size or info.file_size > self.file_size:
                raise TorchFormatError(f"{self.path}: {name} claims {info.file_size} bytes, "
                                       f"more than the archive holds; the file is truncated")
        elif info.file_size > _MAX_DEFLATE_RATIO * max(info.compress_size, 1):
            raise TorchFormatError(f"{self.path}: {name} claims to expand from "
                                   f"{info.compress_size} to {info.file_size} bytes; refusing "
                                   f"an absurd size")
        buf = np.empty(nbytes, np.uint8)
        try:
            with self.zip.open(info) as f:
                view = memoryview(buf)
                pos = 0
                while pos < nbytes:
                    n = f.readinto(view[pos:pos + _CHUNK])
                    if not n:
                        break
                    pos += n
                if pos != nbytes or f.read(1):
                    raise TorchFormatError(f"{self.path}: {name} does not hold the {nbytes} "
                                           f"bytes its header records; the file is corrupt")
        except _ZIP_ERRORS as e:
            raise TorchFormatError(f"{self.path}: cannot read {name} ({e}); the file is "
                                   f"truncated or corrupt: download or save it again") from None
        array = _from_bytes(buf, ref.dtype, self.byteorder)
        self.storages[ref.key] = array
        return array


def _from_bytes(buf: np.ndarray, dtype: np.dtype, byteorder: str) -> np.ndarray:
    if byteorder == "little" or dtype.itemsize == 1:
        return buf.view(dtype)
    # big-endian file: swap each element's bytes (complex: each of the two halves)
    part = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
    swapped = buf.view(np.dtype(f">u{part}")).astype(np.dtype(f"<u{part}"))
    return swapped.view(np.uint8).view(dtype)


# ====================================================================== unpickling
class _Opaque:
    """Objects the pickle can hold but not modify: BUILD on them is refused."""

    __slots__ = ()

    def __setstate__(self, state):
        raise UnsafePickleError(f"the pickle applies BUILD (__setstate__) to a "
                                f"{type(self).__name__.lstrip('_')}; torch files never do")

    def __reduce__(self):  # never re-pickled
        raise TypeError(f"{type(self).__name__} cannot be pickled")


class _StorageType(_Opaque):
    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]

    def __repr__(self):
        return f"torch.{self.name}"


class _StorageRef(_Opaque):
    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef(_Opaque):
    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride


class _StateDict(collections.OrderedDict):
    """``collections.OrderedDict`` as unpickled here: BUILD may only set ``_metadata``-like
    attributes (plain names, no dunders), which are then dropped."""

    def __setstate__(self, state):
        if not isinstance(state, dict) or not all(
                isinstance(k, str) and k.isidentifier() and not k.startswith("__")
                for k in state):
            raise UnsafePickleError("the pickle applies BUILD to an OrderedDict with a state "
                                    "other than plain attributes (torch sets only _metadata)")
        self.__dict__.update(state)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _empty(x) -> bool:
    """None or an empty dict (torch's empty backward-hook OrderedDict / metadata)."""
    return x is None or (isinstance(x, dict) and not x)


def _int_tuple(x, what: str) -> tuple[int, ...]:
    if isinstance(x, (tuple, list)) and all(_is_int(v) for v in x):
        return tuple(int(v) for v in x)
    raise TorchFormatError(f"a tensor's {what} must be a tuple of integers, got {x!r:.200}")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _StorageRef):
        raise TorchFormatError(f"_rebuild_tensor_v2 needs a storage, got "
                               f"{type(storage).__name__}")
    if not _is_int(storage_offset) or storage_offset < 0:
        raise TorchFormatError(f"a tensor's storage offset must be an integer >= 0, got "
                               f"{storage_offset!r:.100}")
    shape = _int_tuple(size, "size")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise TorchFormatError(f"a tensor has size {shape} but stride {strides}")
    if len(shape) > MAX_NDIM:
        raise TorchFormatError(f"a tensor has {len(shape)} dimensions (at most {MAX_NDIM})")
    if any(s < 0 for s in shape) or any(s < 0 for s in strides):
        raise TorchFormatError(f"a tensor has negative size or stride: size {shape}, "
                               f"stride {strides}")
    if not isinstance(requires_grad, bool):
        raise TorchFormatError("a tensor's requires_grad must be a bool")
    if not _empty(backward_hooks):
        raise TorchFormatError("a tensor in the file carries backward hooks; refusing it")
    if not _empty(metadata):
        raise TorchFormatError(f"a tensor carries metadata {metadata!r:.200} (a tensor "
                               f"subclass or special layout); only plain tensors are read")
    numel = math.prod(shape)
    if numel:
        last = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides))
        if storage_offset >= storage.numel or last >= storage.numel:
            raise TorchFormatError(
                f"a tensor of size {shape}, stride {strides} at offset {storage_offset} reads "
                f"up to element {last} of a storage holding {storage.numel}; the file is "
                f"corrupt or malicious")
        if numel > storage.numel:
            raise TorchFormatError(
                f"a tensor of size {shape} has {numel} elements but its storage holds "
                f"{storage.numel} (an expanded view); refusing an absurd size")
    elif storage_offset > storage.numel:
        raise TorchFormatError(f"an empty tensor's offset {storage_offset} lies outside its "
                               f"storage of {storage.numel} elements")
    return _TensorRef(storage, storage_offset, shape, strides)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, _TensorRef):
        raise TorchFormatError(f"_rebuild_parameter needs a tensor, got {type(data).__name__}")
    if not _empty(backward_hooks):
        raise TorchFormatError("a parameter in the file carries backward hooks; refusing it")
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    if not (_empty(state) or state == ()):
        raise TorchFormatError(f"a parameter carries Python state {state!r:.200}; only plain "
                               f"parameters are read")
    return _rebuild_parameter(data, requires_grad, backward_hooks)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): _StateDict,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}
#: The globals :func:`load` resolves, as (module, name) pairs.
ALLOWED_GLOBALS: tuple[tuple[str, str], ...] = tuple(_ALLOWED)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allowlisted globals; storages come from the archive."""

    def __init__(self, file, reader: _ArchiveReader):
        super().__init__(file, encoding="utf-8")
        self._reader = reader

    def find_class(self, module, name):
        # Called for GLOBAL, STACK_GLOBAL, INST, extension codes (and hence for what
        # OBJ/NEWOBJ/REDUCE can reach); nothing is imported or called here.
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            pass
        shown = f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) \
            else f"{module!r}.{name!r}"
        raise UnsafePickleError(
            f"refusing to load {self._reader.path}: its pickle asks for the global "
            f"{shown[:200]}, which is not a tensor, storage or OrderedDict; a state dict or "
            f"tensor file never needs it, so the file is malicious or not a plain torch.save "
            f"of tensors. Nothing in the file was executed.")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchFormatError(f"{self._reader.path}: unsupported persistent id "
                                   f"{pid!r:.200}; expected ('storage', type, key, location, "
                                   f"numel)")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise TorchFormatError(f"{self._reader.path}: a storage has type "
                                   f"{storage_type!r:.100}, not a torch storage class")
        if not (isinstance(key, str) and _KEY.match(key)):
            raise TorchFormatError(f"{self._reader.path}: invalid storage key {key!r:.100}")
        if not isinstance(location, str) or not _is_int(numel) or numel < 0:
            raise TorchFormatError(f"{self._reader.path}: malformed storage reference "
                                   f"{pid!r:.200}")
        return _StorageRef(key, storage_type.dtype, int(numel))


# ====================================================================== results
_PLAIN = (str, bytes, int, float, complex, bool, type(None))


def _materialize(obj, reader: _ArchiveReader):
    """Replace tensor references by numpy arrays; OrderedDicts become dicts."""
    memo: dict[int, Any] = {}

    def visit(x):
        if isinstance(x, _PLAIN):
            return x
        if id(x) in memo:
            return memo[id(x)]
        if isinstance(x, _TensorRef):
            out = _tensor_array(x, reader)
        elif isinstance(x, dict):
            out = {}
            memo[id(x)] = out
            for k, v in x.items():
                out[visit(k)] = visit(v)
        elif isinstance(x, list):
            out = []
            memo[id(x)] = out
            out.extend(visit(v) for v in x)
        elif isinstance(x, tuple):
            out = tuple(visit(v) for v in x)
        elif isinstance(x, (_StorageRef, _StorageType)):
            raise TorchFormatError(f"{reader.path} holds a bare torch storage; only tensors "
                                   f"(and containers of tensors) are read")
        elif isinstance(x, (set, frozenset)):
            out = type(x)(visit(v) for v in x)
        else:
            raise TorchFormatError(f"{reader.path}: data.pkl holds an object of type "
                                   f"{type(x).__name__}; only tensors and containers are read")
        memo[id(x)] = out
        return out

    return visit(obj)


def _tensor_array(ref: _TensorRef, reader: _ArchiveReader) -> np.ndarray:
    storage = reader.storage(ref.storage)
    dtype = storage.dtype
    numel = math.prod(ref.shape)
    if numel == 0:
        return np.zeros(ref.shape, dtype)
    contiguous = tuple(int(math.prod(ref.shape[i + 1:])) for i in range(len(ref.shape)))
    if all(st == c or n == 1 for n, st, c in zip(ref.shape, ref.stride, contiguous)):
        return storage[ref.offset:ref.offset + numel].reshape(ref.shape)
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset:], shape=ref.shape,
        strides=tuple(s * dtype.itemsize for s in ref.stride), writeable=False)
    return np.array(view, order="C")

