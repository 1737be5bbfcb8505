"""Row access to the arrays of an uncompressed ``.npz`` (a feature shard) without loading them.

``np.savez`` stores every array as a ``.npy`` member of a zip file *without compression* (``ZIP_STORED``), so the
bytes of row ``i`` of member ``k`` sit at a fixed offset of the file: the member's local zip header, then the
``.npy`` header, then the C-order data. :class:`NpzRows` finds those offsets once (zip central directory and
``.npy`` headers only: a few KB per shard) and reads rows with ``os.preadv`` straight into numpy buffers.

Why reads and not ``np.memmap``: a mapping counts every page it touched in the process's resident set (RSS and
USS, the numbers ``/usr/bin/time``, SLURM's accounting and the OOM killer look at) until the kernel evicts them,
so an epoch over a memory-mapped store "uses" as much memory as the data it touched. ``pread`` goes through the
page cache too (hot rows are served from RAM at memory speed) but those pages belong to the cache, which the
kernel reclaims before it kills anybody. The cost per row is one system call (BENCHMARKS.md, "Feature store").

A member that cannot be read by offset (compressed, or a Fortran-ordered array) is read whole on first use and
kept: correct, but O(rows) memory again, so a warning names the shard.

Every read is counted in :attr:`NpzRows.bytes_read` (tests check that a stage touches only what it needs).
"""
from __future__ import annotations

import logging
import os
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

log = logging.getLogger(__name__)

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # signature ... file name length, extra field length
_LOCAL_SIG = b"PK\x03\x04"


@dataclass(frozen=True)
class Member:
    """One ``.npy`` member: its dtype and shape, and where its C-order data start (None: not addressable)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int | None

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return int(self.shape[0]) if self.shape else 0


class NpzRows:
    """The members of one ``.npz`` by name, readable whole or by rows. Opens the file lazily, per process."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.members: dict[str, Member] = {}
        self.bytes_read = 0
        self._fd: int | None = None
        self._pid: int | None = None
        self._loaded: dict[str, np.ndarray] = {}  # members that had to be read whole
        if not self.path.exists():
            raise UserError(f"{self.path}: feature shard does not exist")
        try:
            with zipfile.ZipFile(self.path) as zf, open(self.path, "rb") as f:
                for info in zf.infolist():
                    if not info.filename.endswith(".npy"):
                        continue
                    name = info.filename[:-4]
                    self.members[name] = self._member(f, info, name)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, struct.error) as e:
            raise UserError(f"{self.path}: not a readable feature shard ({type(e).__name__}: {e})") from None

    # ------------------------------------------------------------------------------------------ headers
    def _member(self, f, info: zipfile.ZipInfo, name: str) -> Member:
        if info.compress_type != zipfile.ZIP_STORED:
            with zipfile.ZipFile(self.path) as zf, zf.open(info) as m:
                dtype, shape = self._npy_header(m)
            return Member(name, dtype, shape, None)
        f.seek(info.header_offset)
        sig, *_rest, n_name, n_extra = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if sig != _LOCAL_SIG:
            raise ValueError(f"member {info.filename}: bad local zip header")
        f.seek(info.header_offset + _LOCAL_HEADER.size + n_name + n_extra)
        dtype, shape, fortran = self._npy_header(f, with_order=True)
        offset = f.tell()
        if dtype.hasobject:
            raise ValueError(f"member {name} holds Python objects (pickles are not allowed)")
        if fortran and len(shape) > 1:
            offset = None
        return Member(name, dtype, shape, offset)

    @staticmethod
    def _npy_header(f, with_order: bool = False):
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
        return (dtype, tuple(shape), fortran) if with_order else (dtype, tuple(shape))

    # ---------------------------------------------------------------------------------------------- io
    def _fileno(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:  # a forked data worker opens its own descriptor
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = pid
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):  # pickled into spawned data workers: no descriptor, no whole-loaded members
        state = dict(self.__dict__)
        state.update(_fd=None, _pid=None, _loaded={})
        return state

    def __contains__(self, name: str) -> bool:
        return name in self.members

    def _whole(self, m: Member) -> np.ndarray:
        if m.name not in self._loaded:
            log.warning("%s: member '%s' is compressed or Fortran-ordered and is read whole (write feature shards "
                        "with np.savez / morphfuse features to stream them)", self.path, m.name)
            with np.load(self.path, allow_pickle=False) as z:
                self._loaded[m.name] = np.ascontiguousarray(z[m.name])
            self.bytes_read += self._loaded[m.name].nbytes
        return self._loaded[m.name]

    def _pread(self, buf: np.ndarray, offset: int) -> None:
        view = memoryview(buf).cast("B")
        fd, done = self._fileno(), 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise UserError(f"{self.path}: file ends inside member data (truncated shard?); rerun "
                                "`morphfuse features`")
            done += n
        self.bytes_read += done

    def member(self, name: str) -> Member:
        try:
            return self.members[name]
        except KeyError:
            raise UserError(f"{self.path}: feature shard has no '{name}' (it has {', '.join(self.members)})") from None

    def read(self, name: str) -> np.ndarray:
        """A whole member (use for the small per-row arrays: ids, labels, splits)."""
        m = self.member(name)
        if m.offset is None:
            return self._whole(m).copy()
        out = np.empty(m.shape, m.dtype)
        if out.nbytes:
            self._pread(out, m.offset)
        return out

    def row(self, name: str, i: int) -> np.ndarray:
        """Row ``i`` of a member (a fresh array of shape ``shape[1:]``)."""
        m = self.member(name)
        i = int(i)
        if not 0 <= i < len(m):
            raise IndexError(f"{self.path}: row {i} of '{name}' out of range (0..{len(m) - 1})")
        if m.offset is None:
            return self._whole(m)[i].copy()
        out = np.empty(m.shape[1:], m.dtype)
        if out.nbytes:
            self._pread(out, m.offset + i * m.row_bytes)
        return out

    def rows(self, name: str, index) -> np.ndarray:
        """Rows ``index`` (any order) of a member; consecutive runs are read with one call each."""
        m = self.member(name)
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= len(m)):
            raise IndexError(f"{self.path}: rows out of range for '{name}' ({len(m)} rows)")
        if m.offset is None:
            return self._whole(m)[index]
        out = np.empty((index.size,) + m.shape[1:], m.dtype)
        if not out.nbytes:
            return out
        start = 0
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        for stop in list(breaks) + [index.size]:
            self._pread(out[start:stop], m.offset + int(index[start]) * m.row_bytes)
            start = stop
        return out


class ShardPool:
    """:class:`NpzRows` of many shards, at most ``max_open`` file descriptors open at a time (LRU)."""

    def __init__(self, paths, max_open: int = 64):
        self.paths = [Path(p) for p in paths]
        self.shards = [NpzRows(p) for p in self.paths]
        self.max_open = max(1, int(max_open))
        self._open: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, k: int) -> NpzRows:
        shard = self.shards[k]
        self._open.pop(k, None)
        self._open[k] = None
        while len(self._open) > self.max_open:
            old, _ = self._open.popitem(last=False)
            self.shards[old].close()
        return shard

    @property
    def bytes_read(self) -> int:
        return sum(s.bytes_read for s in self.shards)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state


class RowsView:
    """A member read on demand: ``view[rows]`` (an int, a slice or an index array) reads only those rows."""

    def __init__(self, store: NpzRows, name: str):
        self.store, self.name = store, name
        m = store.member(name)
        self.shape, self.dtype = m.shape, m.dtype
        self.ndim = len(m.shape)

    def __len__(self) -> int:
        return int(self.shape[0]) if self.shape else 0

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self.store.row(self.name, int(index))
        if isinstance(index, slice):
            index = np.arange(len(self))[index]
        return self.store.rows(self.name, index)

    def __array__(self, dtype=None, copy=None):  # np.asarray(view): the whole member (avoid on big ones)
        arr = self.store.read(self.name)
        return arr if dtype is None else arr.astype(dtype)
