"""What a checkpoint file given to ``convert --weights`` is, found from its first bytes and its
index (never its data, nothing decompressed, no framework), and whether the sizes it declares
fit the spec's model, before any worker loads it.

Formats, by their signature: a zip archive (PyTorch's ``torch.save``: members ``*/data.pkl``
and ``*/data/<storage>``; NumPy's ``.npz``: ``<name>.npy`` members; a Keras ``.keras`` model
archive), HDF5 (Keras ``save_weights``), MXNet's NDArray list (Gluon ``save_parameters``),
msgpack (Flax ``to_bytes``); anything else is named as well as it can be (a ``.npy``, a
safetensors file, a Python pickle, text) and refused with what it is.

Declared sizes, as far as each format states them before its data: a zip member's
uncompressed size in the central directory (zipfile and PyTorch's reader both stop at it) and,
once those fit, for ``.npz`` each member's ``.npy`` header (shape and dtype, a few hundred
bytes read); each
array header of an MXNet file (MXNet allocates by the declared shape before reading the data);
for HDF5 and msgpack the file's own size (msgpack holds its arrays uncompressed; the Keras
worker checks every dataset's shape and dtype from the HDF5 metadata before loading).
"""

from __future__ import annotations

import ast
import math
import os
import struct
import zipfile
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy

#: the formats a backend can declare in backend.yaml (``checkpoint: {format: ...}``), in words
FORMATS = {
    "torch_zip": "a PyTorch checkpoint (torch.save's zip archive)",
    "npz": "a NumPy .npz archive of named arrays (numpy.savez)",
    "hdf5": "an HDF5 file (the format of Keras save_weights)",
    "msgpack": "msgpack data (the format of flax.serialization.to_bytes)",
    "mxnet_ndarray": "an MXNet NDArray file (the format of Gluon save_parameters)",
}

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
NPY_SIGNATURE = b"\x93NUMPY"
MXNET_LIST_MAGIC = 0x112                   # kMXAPINDArrayListMagic (src/c_api/c_api.cc)
MXNET_ARRAY_MAGICS = (0xF993FAC9, 0xF993FACA)  # NDARRAY_V2_MAGIC, NDARRAY_V3_MAGIC
#: mshadow type flags -> bytes per value (mshadow/base.h, TypeFlag)
MXNET_TYPE_SIZES = {0: 4, 1: 8, 2: 2, 3: 1, 4: 4, 5: 1, 6: 8, 7: 1, 8: 2, 9: 2, 10: 4, 11: 8,
                    12: 2}
TORCH_LEGACY_MAGIC = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # torch/serialization.py

#: what a checkpoint may hold beyond its values: per tensor (an HDF5 dataset with its group and
#: attributes, a .npy header, an NDArray header and name) and per file (indexes, a pickle)
PER_TENSOR_BYTES = 64 << 10
PER_FILE_BYTES = 1 << 20
#: header bytes of one .npy member that are read (numpy's header is at most 64 KiB in v2)
NPY_HEADER_LIMIT = 1 << 16


class CheckpointRefused(ValueError):
    """A checkpoint that is not what the source backend reads, or declares more than the spec's
    model holds: ``str()`` says what it is, in one line."""


@dataclass
class Member:
    """One stored array or archive member as the file declares it (before any data is read)."""
    name: str
    declared_bytes: int
    shape: tuple | None = None
    dtype: str | None = None


@dataclass
class Checkpoint:
    """What a checkpoint file is: its format (a key of ``FORMATS``, or another name for a file
    no backend reads), in words, and its members as declared."""
    format: str
    what: str
    size: int
    members: list[Member] = field(default_factory=list)

    @property
    def declared_bytes(self) -> int:
        return sum(m.declared_bytes for m in self.members)


def spec_capacity(spec) -> tuple[int, int]:
    """(tensors, bytes): how many tensors a native file of ``spec``'s model may hold (a shared
    parameter under each of its names, as torch's state_dict and Gluon store it) and how many
    bytes, at most, even as float64 with every format's metadata."""
    tensors = sum(1 + len(p.shared_with) for p in spec.params)
    values = sum(math.prod(p.shape) * (1 + len(p.shared_with)) for p in spec.params)
    return tensors, 8 * values + PER_TENSOR_BYTES * tensors + PER_FILE_BYTES


def identify(fh: BinaryIO) -> Checkpoint:
    """What the open file ``fh`` is, from its signature and index; CheckpointRefused when its
    index is malformed."""
    size = os.fstat(fh.fileno()).st_size
    head = fh.read(64) or b""
    fh.seek(0)
    if not head:
        return Checkpoint("empty", "an empty file", size)
    if head.startswith(ZIP_SIGNATURES):
        return _zip(fh, size)
    if head.startswith(HDF5_SIGNATURE):
        return Checkpoint("hdf5", FORMATS["hdf5"], size)
    if head.startswith(NPY_SIGNATURE):
        return Checkpoint("npy", "a single NumPy array (.npy, numpy.save), not named arrays",
                          size)
    if len(head) >= 8 and struct.unpack("<Q", head[:8])[0] == MXNET_LIST_MAGIC:
        return _mxnet(fh, size)
    if head[:1] == b"\x80" and TORCH_LEGACY_MAGIC in head[:16]:
        return Checkpoint("torch_legacy", "a PyTorch file in the legacy pickle format (before "
                          "PyTorch 1.6; load it and torch.save it again for the zip format)",
                          size)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return Checkpoint("pickle", "a Python pickle, which is never loaded (it can run code)",
                          size)
    if len(head) > 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
        return Checkpoint("safetensors", "a safetensors file (no backend here reads that "
                          "format)", size)
    if 0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF):  # a msgpack map: Flax's tree
        return Checkpoint("msgpack", FORMATS["msgpack"], size)
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return Checkpoint("text", f"a text file (it starts {head[:24].decode()!r})", size)
    return Checkpoint("unknown", f"in no format convert knows (it starts {head[:12]!r})", size)


def _zip(fh: BinaryIO, size: int) -> Checkpoint:
    """A zip archive's members from its central directory; for ``.npz`` each member's .npy
    header too (shape and dtype), reading at most NPY_HEADER_LIMIT bytes of each."""
    try:
        zf = zipfile.ZipFile(fh)
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointRefused(f"a damaged zip archive ({exc})") from None
    names = [i.filename for i in infos]
    members = [Member(i.filename, i.file_size) for i in infos]
    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return Checkpoint("torch_zip", FORMATS["torch_zip"], size, members)
    if "config.json" in names and any(n.endswith(".weights.h5") for n in names):
        return Checkpoint("keras_archive", "a Keras model archive (.keras: a zip holding "
                          "config.json and model.weights.h5), not a weights file", size, members)
    if names and all(n.endswith(".npy") for n in names):
        return Checkpoint("npz", FORMATS["npz"], size, members)
    return Checkpoint("zip", f"a zip archive of {len(names)} members (e.g. "
                      f"{names[:3]}) that is neither a PyTorch checkpoint nor an .npz", size,
                      members)


def _npy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Member:
    """An .npz member's shape and dtype from its .npy header, without reading its data."""
    name = info.filename[:-len(".npy")]
    try:
        with zf.open(info) as member:
            version = npy.read_magic(member)
            if version not in ((1, 0), (2, 0), (3, 0)):
                raise ValueError(f"unknown .npy version {version}")
            header_len = struct.unpack("<H" if version == (1, 0) else "<I",
                                       member.read(2 if version == (1, 0) else 4))[0]
            if header_len > NPY_HEADER_LIMIT:
                raise ValueError(f"a header of {header_len:,} bytes")
            header = ast.literal_eval(member.read(header_len).decode("latin-1"))
            shape, dtype = tuple(header["shape"]), np.dtype(header["descr"])
    except (KeyError, TypeError, ValueError, SyntaxError, MemoryError, RecursionError,
            zipfile.BadZipFile, OSError, EOFError, struct.error, UnicodeDecodeError) as exc:
        raise CheckpointRefused(f"a damaged .npz: member {info.filename!r} has no readable "
                                f".npy header ({type(exc).__name__}: {exc})") from None
    if dtype.hasobject:
        raise CheckpointRefused(f"an .npz whose {name!r} holds Python objects (a pickle, "
                                "never loaded), not numbers")
    if not all(isinstance(d, int) and 0 <= d < 2 ** 62 for d in shape):
        raise CheckpointRefused(f"a damaged .npz: {name!r} declares the shape {list(shape)}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > info.file_size:  # its data cannot be shorter than its shape says
        raise CheckpointRefused(f"a damaged .npz: {name!r} declares {list(shape)} {dtype} "
                                f"({nbytes:,} bytes) in a member of {info.file_size:,} bytes")
    return Member(name, nbytes, shape, str(dtype))


def _mxnet(fh: BinaryIO, size: int) -> Checkpoint:
    """An MXNet NDArray list's arrays and names from their headers, seeking over the data
    (src/ndarray/ndarray.cc NDArray::Save / Load; dmlc vectors: a uint64 count first)."""
    def read(fmt):
        n = struct.calcsize(fmt)
        data = fh.read(n) or b""
        if len(data) != n:
            raise CheckpointRefused("a truncated MXNet NDArray file")
        return struct.unpack(fmt, data)

    def skip(n):
        if fh.tell() + n > size:
            raise CheckpointRefused(f"a truncated MXNet NDArray file (an array of {n:,} bytes "
                                    f"at byte {fh.tell():,} of {size:,})")
        fh.seek(n, os.SEEK_CUR)

    read("<QQ")  # magic, reserved
    (count,) = read("<Q")
    if count > size // 16:
        raise CheckpointRefused(f"a damaged MXNet NDArray file ({count:,} arrays declared in "
                                f"{size:,} bytes)")
    arrays = []
    for i in range(count):
        magic, stype = read("<Ii")
        if magic not in MXNET_ARRAY_MAGICS:
            raise CheckpointRefused(f"an MXNet NDArray file whose array {i} is in the legacy "
                                    "(before MXNet 1.0) layout or damaged; save it again")
        if stype != 0:
            raise CheckpointRefused(f"an MXNet NDArray file whose array {i} is sparse (storage "
                                    f"type {stype}); a model's parameters are dense")
        (ndim,) = read("<i")
        if not 0 <= ndim <= 32:
            raise CheckpointRefused(f"a damaged MXNet NDArray file (array {i} has {ndim} "
                                    "dimensions)")
        shape = read(f"<{ndim}q")
        if any(d < 0 for d in shape):
            raise CheckpointRefused(f"a damaged MXNet NDArray file (array {i} has the shape "
                                    f"{list(shape)})")
        _dev_type, _dev_id, type_flag = read("<iii")
        if type_flag not in MXNET_TYPE_SIZES:
            raise CheckpointRefused(f"an MXNet NDArray file whose array {i} has the unknown "
                                    f"type flag {type_flag}")
        nbytes = math.prod(shape) * MXNET_TYPE_SIZES[type_flag]
        skip(nbytes)
        arrays.append((shape, nbytes))
    (n_names,) = read("<Q")
    names = []
    if n_names not in (0, count):
        raise CheckpointRefused(f"a damaged MXNet NDArray file ({count} arrays, {n_names} "
                                "names)")
    for _ in range(n_names):
        (length,) = read("<Q")
        if length > 4096:
            raise CheckpointRefused(f"a damaged MXNet NDArray file (a name of {length:,} "
                                    "bytes)")
        names.append((fh.read(length) or b"").decode("utf-8", "replace"))
    names = names or [str(i) for i in range(count)]
    return Checkpoint("mxnet_ndarray", FORMATS["mxnet_ndarray"], size,
                      [Member(n, b, s) for n, (s, b) in zip(names, arrays)])


def fit_problem(ckpt: Checkpoint, spec, fh: BinaryIO | None = None) -> str | None:
    """Why ``ckpt`` cannot be a checkpoint of ``spec``'s model by the sizes it declares (the
    file, its members, their total; then, for an .npz read from ``fh``, each member's .npy
    header), or None: decided before any of its data is read. CheckpointRefused for a header
    that is damaged or holds Python objects."""
    problem = _size_problem(ckpt, spec)
    if problem is None and ckpt.format == "npz" and fh is not None:
        fh.seek(0)
        with zipfile.ZipFile(fh) as zf:
            ckpt.members = [_npy_member(zf, i) for i in zf.infolist()]
        problem = _size_problem(ckpt, spec)
    return problem


def _capacity_text(spec) -> str:
    tensors, capacity = spec_capacity(spec)
    return (f"the spec {spec.name}'s {tensors} tensors ({len(spec.params)} parameters and "
            f"statistics) hold at most {capacity:,} bytes, even as float64")


def file_size_problem(size: int, spec) -> str | None:
    """Why a file of ``size`` bytes cannot be a checkpoint of ``spec``'s model, or None
    (decided before its index is parsed: a huge central directory costs memory too)."""
    if size > spec_capacity(spec)[1]:
        return (f"a file of {size:,} bytes, larger than any checkpoint of the model: "
                f"{_capacity_text(spec)}")
    return None


def _size_problem(ckpt: Checkpoint, spec) -> str | None:
    tensors, capacity = spec_capacity(spec)
    what = _capacity_text(spec)
    problem = file_size_problem(ckpt.size, spec)
    if problem:
        return problem
    if len(ckpt.members) > 4 * tensors + 16:
        return f"{len(ckpt.members):,} members, far more than the model's {tensors} tensors"
    if ckpt.declared_bytes > capacity:
        biggest = max(ckpt.members, key=lambda m: m.declared_bytes)
        return (f"its members declare {ckpt.declared_bytes:,} bytes (the largest, "
                f"{biggest.name!r}, {biggest.declared_bytes:,}) before any is read: {what}")
    return None
