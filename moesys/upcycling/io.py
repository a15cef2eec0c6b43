"""Files for upcycling: validated reading of dense safetensors checkpoints, a streaming sharded
safetensors writer, and an output directory that appears only when complete.

The writer knows every output tensor's shape before reading any (see plan.py), so it writes each
shard's header first and then the tensor bytes in order; it holds at most `budget_bytes` of produced
tensors before writing them out (plus the one being produced), whatever the model size. Tensors that
are verbatim copies of a source tensor go file to file (`os.copy_file_range`); the others are read
through `safetensors.safe_open`, one tensor at a time, with the file closed after each read so the
mapped pages of a large shard do not pile up in the resident set.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from moesys import owned_tmp
from moesys.upcycling.plan import OutTensor

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
_NO_COPY_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM}
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def parse_bytes(size: int | str) -> int:
    """`2147483648`, `"2GiB"`, `"5GB"`, `"512MiB"` -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"size {size!r} is not a byte count like 2147483648, '2GiB' or '5GB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def read_header(path: Path, remedy: str = "re-download the checkpoint"
                ) -> dict[str, tuple[tuple[int, ...], torch.dtype, int]]:
    """Name -> (shape, dtype, byte offset in the file) of a safetensors file, after checking the file
    holds every byte its header promises (a truncated download fails here, before anything is written).
    Cheap: the 8-byte header length must fit the file and the header must be JSON, so random bytes are a
    ValueError naming the file and ending with `remedy` (what the reader should do), never a huge read.
    The one header check of upcycle, init_from, generate's offload source and export."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (-1,)
            if not 0 < n <= size - 8:
                raise ValueError
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError
    except FileNotFoundError:
        raise ValueError(f"safetensors file {path} is missing; {remedy}") from None
    except (ValueError, UnicodeDecodeError, struct.error):
        raise ValueError(f"{path} is not a readable safetensors file (bad or truncated header); {remedy}") from None
    out = {}
    data_bytes = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES.get(info.get("dtype"))
            shape, (begin, end) = tuple(info["shape"]), info["data_offsets"]
            nbytes = math.prod(shape) * (dtype.itemsize if dtype is not None else 0)
        except (AttributeError, KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: the header entry of tensor {name} is malformed; {remedy}") from None
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        if begin < 0 or end > data_bytes or end - begin != nbytes:
            raise ValueError(f"{path} is truncated or corrupt: tensor {name} needs bytes {begin}..{end} of "
                             f"{data_bytes}; {remedy}")
        out[name] = (shape, dtype, 8 + n + begin)
    return out


def source_tensors(dense_dir: Path) -> tuple[dict[str, tuple[Path, int]],
                                             dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """(name -> (file, byte offset), name -> (shape, dtype)) for a single-file or index-sharded checkpoint."""
    index = dense_dir / INDEX_NAME
    single = dense_dir / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError):
            raise ValueError(f"{index} is not a safetensors index (no weight_map)") from None
        files = {name: dense_dir / f for name, f in weight_map.items()}
    elif single.exists():
        files = {}
    elif any((dense_dir / p).exists() for p in _PICKLE_NAMES):
        raise ValueError(f"{dense_dir} holds only pickle (.bin/.pt) weights; moesys never unpickles. Convert "
                         f"them to safetensors first (e.g. save_pretrained(..., safe_serialization=True))")
    else:
        raise ValueError(f"{dense_dir} has no model.safetensors and no {INDEX_NAME}")
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    where: dict[str, tuple[Path, int]] = {}
    for path in sorted(set(files.values())) if files else [single]:
        for name, (shape, dtype, offset) in read_header(path).items():
            if files and files.get(name) != path:
                continue  # the index decides which file owns a tensor
            shapes[name], where[name] = (shape, dtype), (path, offset)
    missing = sorted(set(files) - set(shapes))
    if missing:
        raise ValueError(f"{INDEX_NAME} lists {len(missing)} tensor(s) absent from their files, e.g. {missing[:3]}")
    # Old checkpoints carry RoPE's inverse frequencies; every model recomputes them.
    for name in [k for k in shapes if k.endswith("rotary_emb.inv_freq")]:
        del shapes[name], where[name]
    return where, shapes


class SourceReader:
    """`get(name)`: one source tensor, read through safe_open; the last one is kept, since the experts
    of a layer read the same dense matrix E times in a row. `locate(name)`: its (file, byte offset).

    Each read opens and closes its file (the mapped pages of a large shard do not pile up), unless
    `keep_open`: then each file is opened once until `close()`, as a model load reading thousands of
    small per-expert tensors wants (opening parses the whole header, milliseconds each time)."""

    def __init__(self, where: dict[str, tuple[Path, int]], keep_open: bool = False):
        self.where = where
        self._last: tuple[str, torch.Tensor] | None = None
        self._open: dict[Path, object] | None = {} if keep_open else None

    @contextlib.contextmanager
    def _file(self, name: str):
        path = self.where[name][0]
        if self._open is None:
            with safe_open(str(path), framework="pt") as f:
                yield f
            return
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        yield self._open[path]

    def close(self) -> None:
        """Close the files `keep_open` kept (nothing otherwise)."""
        for f in (self._open or {}).values():
            f.__exit__(None, None, None)
        if self._open is not None:
            self._open.clear()

    def __call__(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = None  # free the previous tensor before reading the next
            with self._file(name) as f:
                self._last = (name, f.get_tensor(name))
        return self._last[1]

    def rows(self, name: str, ids: Sequence[int]) -> torch.Tensor:
        """Rows `ids` (ascending) of dim 0 of tensor `name`, reading only those rows' bytes: one
        `get_slice` per run of consecutive ids (the experts a rank owns, out of a fused [E, ...] tensor)."""
        runs: list[list[int]] = []
        for i in ids:
            if runs and i == runs[-1][1]:
                runs[-1][1] += 1
            else:
                runs.append([i, i + 1])
        with self._file(name) as f:
            part = f.get_slice(name)
            parts = [part[a:b] for a, b in runs] or [part[0:0]]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def locate(self, name: str) -> tuple[Path, int]:
        return self.where[name]


def layout_shards(tensors: Sequence[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header_bytes(tensors: Sequence[OutTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes the planned tensors into safetensors shards, streaming. `peak_held_bytes` records the
    most tensor bytes it held at once, so tests can check the memory bound.

    A tensor that is a verbatim copy of a source tensor (`OutTensor.copy_of`; with the default options
    that is every expert) goes file to file with `os.copy_file_range`, as `cp` does: no read into user
    memory, no second copy on the way out. Where the kernel or file system refuses, the writer falls
    back to reading and writing for the rest of the run."""

    def __init__(self, budget_bytes: int, progress: Callable[[int], object] | None = None, copy_files: bool = True):
        self.budget_bytes = budget_bytes
        self.progress = progress or (lambda n: None)
        self.copy_files = copy_files and hasattr(os, "copy_file_range")
        self.peak_held_bytes = 0
        self._pending: list[torch.Tensor] = []
        self._held = 0

    def write(self, out_dir: Path, tensors: Sequence[OutTensor], get: Callable[[str], torch.Tensor],
              max_shard_bytes: int) -> list[str]:
        shards = layout_shards(tensors, max_shard_bytes)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for name, shard in zip(names, shards):
            self._write_shard(out_dir / name, shard, get)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                     "weight_map": {t.name: n for n, shard in zip(names, shards) for t in shard}}
            (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names

    def _write_shard(self, path: Path, tensors: Sequence[OutTensor], get: Callable[[str], torch.Tensor]) -> None:
        with open(path, "wb") as f:
            f.write(_header_bytes(tensors))
            for t in tensors:
                locate = getattr(get, "locate", None)
                if t.copy_of is not None and locate is not None and self.copy_files:
                    self._flush(f)
                    f.flush()  # the kernel copy writes at the file descriptor's offset
                    if self._copy(f, t, *locate(t.copy_of)):
                        continue
                x = t.make(get)
                if tuple(x.shape) != t.shape or x.dtype != t.dtype:
                    raise AssertionError(f"{t.name}: made {tuple(x.shape)} {x.dtype}, planned {t.shape} {t.dtype}")
                self._pending.append(x.contiguous())
                self._held += t.nbytes
                self.peak_held_bytes = max(self.peak_held_bytes, self._held)
                if self._held >= self.budget_bytes:
                    self._flush(f)
            self._flush(f)
            f.flush()
            os.fsync(f.fileno())

    def _copy(self, f, t: OutTensor, src_path: Path, offset: int) -> bool:
        remaining = t.nbytes
        with open(src_path, "rb") as src:
            while remaining:
                try:
                    n = os.copy_file_range(src.fileno(), f.fileno(), remaining, offset)
                except OSError as e:
                    if remaining != t.nbytes or e.errno not in _NO_COPY_ERRNOS:
                        raise
                    self.copy_files = False  # e.g. an old kernel across file systems
                    return False
                if n == 0:
                    raise ValueError(f"{src_path} ended early while copying {t.copy_of}; was it modified meanwhile?")
                offset += n
                remaining -= n
                self.progress(n)
        return True

    def _flush(self, f) -> None:
        for x in self._pending:
            f.write(x.reshape(-1).view(torch.uint8).numpy().data)
            self.progress(x.numel() * x.element_size())
        self._pending.clear()
        self._held = 0


def atomic_output_dir(out_dir: Path, overwrite: bool) -> contextlib.AbstractContextManager[Path]:
    """An owned temp dir `.NAME.upcycle-*` beside `out_dir`, renamed to it when the body finishes and
    removed on any exception; a later run removes those a dead upcycle left (see moesys.owned_tmp)."""
    return owned_tmp.atomic_output_dir(out_dir, overwrite, "upcycle")
