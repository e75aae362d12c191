"""Lazy access to particle images in MRC stacks (``.mrcs``, ``.mrc``), by table row.

``ImageSource.from_table(table)`` checks every stack once (exists, holds enough images,
has the table's box size and, where its header sets one, pixel size) by reading headers only; images are then read on demand with
positioned reads (``os.preadv``) straight into the batch's buffer, one read per run of
consecutive images, a bounded number of files kept open. Nothing is memory-mapped, so the
pages of a stack read once do not stay in the process's resident set: a 3 GB stack streamed
batch by batch costs a few batches of memory, not 3 GB.

``chunks(batch, indices=..., prefetch=True)`` reads the next batch in a background thread
while the caller works on the current one (reads release the GIL); at most ``prefetch``
batches wait, so memory stays bounded by ``(prefetch + 1)`` batches.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from cryogmm.errors import StackError

__all__ = ["ImageSource", "prefetched"]

_MAX_OPEN = 64


def _stack_shape(path: str, star) -> tuple[int, int, int, float]:
    """(n_images, ny, nx, pixel size in Å or 0) from the header of an MRC file."""
    import mrcfile

    p = Path(path)
    if not p.is_file():
        raise StackError(path, f"particle stack not found (referenced by {star})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # permissive: old headers without MAP ID
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as m:
                h = m.header
            if h is None:
                raise ValueError("no header")
            nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
            voxel = float(h.cella.x) / int(h.mx) if int(h.mx) > 0 else 0.0
    except Exception as e:  # mrcfile raises ValueError/OSError for bad files
        raise StackError(path, f"not a readable MRC stack ({e}) (referenced by {star})") from None
    if min(nx, ny, nz) < 1:
        raise StackError(path, f"MRC header gives an empty shape {nz}x{ny}x{nx} (referenced by {star})")
    expected = 1024 + int(h.nsymbt) + nx * ny * nz * _mode_bytes(int(h.mode))
    if p.stat().st_size < expected:
        raise StackError(
            path,
            f"file is truncated: {p.stat().st_size} bytes, its header promises {nz} images of {ny}x{nx} "
            f"({expected} bytes) (referenced by {star})",
        )
    return nz, ny, nx, voxel


def _mode_bytes(mode: int) -> int:
    return {0: 1, 1: 2, 2: 4, 3: 4, 4: 8, 6: 2, 12: 2}.get(mode, 4)


class ImageSource:
    """Particle images of a :class:`~cryogmm.bridge.table.ParticleTable`, read lazily.

    ``n``: number of particles (table rows); ``box``: image size in pixels.
    """

    def __init__(self, stacks, stack_of, index_in_stack, box: int, source=None):
        self._stacks = list(stacks)  # absolute paths
        self._stack_of = np.asarray(stack_of, dtype=np.int64)  # [n] -> stack number
        self._index = np.asarray(index_in_stack, dtype=np.int64)  # [n] -> image in stack
        self.box = int(box)
        self.source = source
        self._open: collections.OrderedDict = collections.OrderedDict()  # stack -> (fd, dtype, offset, nz)
        self._lock = threading.Lock()

    @classmethod
    def from_table(cls, table) -> "ImageSource":
        """Check every stack the table refers to (headers only) and return a lazy source.

        Raises :class:`~cryogmm.errors.StackError` naming the stack (and the metadata file)
        when a stack is missing, holds fewer images than referenced, has images of a size
        other than the optics group's ``rlnImageSize``, or a header pixel size (other than
        the unset values 0 and 1) more than 1% from ``rlnImagePixelSize``.
        """
        star = table.source if table.source is not None else "the particle table"
        paths = table.image_path
        index = table.image_index
        codes, stacks = pd.factorize(pd.Series(paths, dtype=object))
        k = len(stacks)
        max_idx = np.full(k, -1, dtype=np.int64)
        np.maximum.at(max_idx, codes, index)
        want_box = None
        if "rlnImageSize" in table.optics.columns or "rlnImageSize" in table.particles.columns:
            box_per = table.box
            first = pd.Series(np.arange(len(codes))).groupby(codes).first().to_numpy()
            want_box = box_per[first]
        want_apix = None
        if "rlnImagePixelSize" in table.optics.columns or "rlnImagePixelSize" in table.particles.columns:
            first = pd.Series(np.arange(len(codes))).groupby(codes).first().to_numpy()
            want_apix = table.apix[first]
        boxes = set()
        for s in range(k):
            nz, ny, nx, voxel = _stack_shape(stacks[s], star)
            if max_idx[s] >= nz:
                raise StackError(
                    stacks[s],
                    f"holds {nz} image(s) but {star} refers to image {max_idx[s] + 1}",
                )
            if nx != ny:
                raise StackError(stacks[s], f"images are {nx}x{ny} px: only square images are supported")
            if want_box is not None and nx != want_box[s]:
                raise StackError(
                    stacks[s], f"images are {nx}x{ny} px but {star} gives rlnImageSize {want_box[s]}"
                )
            # a header pixel size of 0 or 1 means "not set" (many tools write that)
            if want_apix is not None and voxel > 0 and abs(voxel - 1.0) > 1e-6 and abs(voxel / want_apix[s] - 1) > 0.01:
                raise StackError(
                    stacks[s],
                    f"pixel size is {voxel:g} Å in its header but {star} gives rlnImagePixelSize {want_apix[s]:g}",
                )
            boxes.add(nx)
        if len(boxes) > 1:
            raise StackError(star, f"particles have different image sizes {sorted(boxes)}: use one box size")
        box = boxes.pop() if boxes else int(want_box[0]) if want_box is not None and len(want_box) else 0
        return cls(list(stacks), codes, index, box, source=table.source)

    @property
    def n(self) -> int:
        return len(self._stack_of)

    @property
    def stacks(self) -> list:
        """The stack files (absolute paths) the table's images are in."""
        return list(self._stacks)

    def __len__(self) -> int:
        return self.n

    def _layout(self, s: int):
        """``(fd, dtype, data offset, n images)`` of stack ``s`` (opened on first use, a bounded number kept)."""
        with self._lock:
            lay = self._open.get(s)
            if lay is not None:
                self._open.move_to_end(s)
                return lay
        import mrcfile
        from mrcfile.utils import data_dtype_from_header

        path = self._stacks[s]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # permissive: old headers without MAP ID
                with mrcfile.open(path, mode="r", header_only=True, permissive=True) as m:
                    h = m.header
                    dtype = data_dtype_from_header(h)
            nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
            offset = 1024 + int(h.nsymbt)
            fd = os.open(path, os.O_RDONLY)
        except Exception as e:
            raise StackError(path, f"cannot be opened ({e})") from None
        if os.fstat(fd).st_size < offset + nx * ny * nz * dtype.itemsize:
            os.close(fd)
            raise StackError(path, "holds no readable image data (file shorter than its header says)")
        lay = (fd, dtype, offset, nz)
        with self._lock:
            if s in self._open:  # another thread opened it meanwhile
                os.close(fd)
                return self._open[s]
            self._open[s] = lay
            if len(self._open) > _MAX_OPEN:
                _, old = self._open.popitem(last=False)
                os.close(old[0])
        return lay

    def _read_sorted(self, s: int, within: np.ndarray) -> np.ndarray:
        """Images ``within`` (ascending) of stack ``s`` as float32 ``[k, box, box]``: one positioned
        read per run of consecutive images."""
        fd, dtype, offset, nz = self._layout(s)
        if within.size and within[-1] >= nz:
            raise StackError(self._stacks[s], f"holds {nz} image(s); image {int(within[-1]) + 1} was asked for")
        raw = np.empty((within.size, self.box, self.box), dtype=dtype)
        read_records(fd, within, self.box * self.box * dtype.itemsize, offset, raw, self._stacks[s])
        if raw.dtype == np.float32:
            return raw
        return raw.astype(np.float32)

    def images(self, indices) -> np.ndarray:
        """float32 [k, box, box]: the images of table rows ``indices``, in the order asked."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"image indices out of range for {self.n} particles")
        out = np.empty((idx.size, self.box, self.box), dtype=np.float32)
        st = self._stack_of[idx]
        order = np.argsort(st, kind="stable")
        bounds = np.flatnonzero(np.diff(st[order])) + 1
        for grp in np.split(order, bounds):
            if grp.size == 0:
                continue
            within = self._index[idx[grp]]
            srt = np.argsort(within, kind="stable")
            out[grp[srt]] = self._read_sorted(int(st[grp[0]]), within[srt])  # sorted reads: sequential on disk
        return out

    def chunks(self, batch_size, indices=None, prefetch: int = 0, transform=None) -> Iterator[tuple[np.ndarray, object]]:
        """Yield ``(indices, images)`` over ``indices`` (default all particles, in table order),
        ``batch_size`` at a time. ``prefetch > 0``: a background thread reads up to that many
        batches ahead while the caller works on the current one (same batches, same order).
        ``transform``: applied to each batch's images where they are read (in the background
        thread with ``prefetch``), e.g. a copy into pinned memory for a GPU upload."""
        idx_all = np.arange(self.n) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        bs = int(batch_size)
        if bs < 1:
            raise ValueError(f"batch size {batch_size}; expected >= 1")
        parts = [idx_all[a:a + bs] for a in range(0, idx_all.size, bs)]
        read = self.images if transform is None else (lambda idx: transform(self.images(idx)))
        if prefetch <= 0 or len(parts) <= 1:
            for idx in parts:
                yield idx, read(idx)
            return
        yield from prefetched(read, parts, int(prefetch))

    def close(self) -> None:
        with self._lock:
            while self._open:
                _, lay = self._open.popitem()
                try:
                    os.close(lay[0])
                except OSError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def read_records(fd: int, positions, record_bytes: int, offset: int, out: np.ndarray, path) -> np.ndarray:
    """Fixed-size records ``positions`` (ascending) of an open file into ``out`` (a C-contiguous
    array of ``len(positions) * record_bytes`` bytes), record ``i`` at ``offset + i *
    record_bytes``: one positioned read (``os.preadv``, no memory map: the pages stay in the page
    cache, not in the process) per run of consecutive records. ``path`` names the file in errors."""
    pos = np.asarray(positions, dtype=np.int64).reshape(-1)
    flat = out.reshape(-1).view(np.uint8)
    if flat.size != pos.size * record_bytes:
        raise ValueError(f"buffer of {flat.size} bytes for {pos.size} records of {record_bytes}")
    breaks = np.flatnonzero(np.diff(pos) != 1) + 1
    starts = np.concatenate([[0], breaks]).astype(np.int64)
    ends = np.concatenate([breaks, [pos.size]]).astype(np.int64)
    for a, b in zip(starts.tolist(), ends.tolist()):
        _pread_into(fd, memoryview(flat[a * record_bytes: b * record_bytes]), offset + int(pos[a]) * record_bytes, path)
    return out


def _pread_into(fd: int, buf: memoryview, offset: int, path) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` (looping over short reads)."""
    done, total = 0, len(buf)
    while done < total:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise StackError(path, f"ended early: {total - done} bytes missing at offset {offset + done}")
        done += got


_DONE = object()


def prefetched(fn, parts, depth: int):
    """Yield ``(part, fn(part))`` for each of ``parts`` in order while a worker thread computes up
    to ``depth`` results ahead (``fn`` should release the GIL: file reads, torch ops). An
    exception in ``fn`` is raised in the caller; leaving the loop early stops the worker."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for idx in parts:
                if stop.is_set() or not put((idx, fn(idx))):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    t = threading.Thread(target=work, name="cryogmm-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join()
