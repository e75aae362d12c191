"""Lazy access to particle images in MRC stacks (``.mrcs``, ``.mrc``), by table row.

``ImageSource.from_table(table)`` checks every stack once (exists, holds enough images,
has the table's box size and, where its header sets one, pixel size) by reading headers only; images are then read on demand through
memory maps (``mrcfile.mmap``, read-only, permissive), a bounded number kept open.
"""

from __future__ import annotations

import collections
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from cryogmm.errors import StackError

__all__ = ["ImageSource"]

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
        self._open: collections.OrderedDict = collections.OrderedDict()

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

    def __len__(self) -> int:
        return self.n

    def _data(self, s: int) -> np.ndarray:
        import mrcfile

        m = self._open.get(s)
        if m is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # permissive: old headers without MAP ID
                    m = mrcfile.mmap(self._stacks[s], mode="r", permissive=True)
            except Exception as e:
                raise StackError(self._stacks[s], f"cannot be opened ({e})") from None
            if m.data is None:
                raise StackError(self._stacks[s], "holds no readable image data")
            self._open[s] = m
            if len(self._open) > _MAX_OPEN:
                _, old = self._open.popitem(last=False)
                old.close()
        else:
            self._open.move_to_end(s)
        d = m.data
        return d[None] if d.ndim == 2 else d

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
            data = self._data(int(st[grp[0]]))
            within = self._index[idx[grp]]
            srt = np.argsort(within, kind="stable")
            out[grp[srt]] = data[within[srt]]  # sorted reads: sequential on disk
        return out

    def chunks(self, batch_size) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices, images)`` over all particles, in table order, ``batch_size`` at a time."""
        for start in range(0, self.n, int(batch_size)):
            idx = np.arange(start, min(start + int(batch_size), self.n))
            yield idx, self.images(idx)

    def close(self) -> None:
        while self._open:
            _, m = self._open.popitem()
            m.close()

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
