"""Reading and writing maps (MRC) with the checks every job needs.

Maps are returned as float32 numpy arrays indexed ``[z, y, x]`` with their pixel size in Å.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryogmm.errors import MapError
from cryogmm.io.outputs import atomic_output


def read_mrc(path):
    """Open an MRC file leniently: ``(data float32 copy, apix from the header (0 if unset),
    header)``. Raises :class:`MapError` naming the file when it is missing or unreadable;
    the callers check shape, values and pixel size."""
    import mrcfile

    path = Path(path)
    if not path.is_file():
        raise MapError(path, "no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", permissive=True) as m:
                if m.data is None:
                    raise MapError(path, "is not a readable MRC file (no data block)")
                return np.asarray(m.data, dtype=np.float32).copy(), float(m.voxel_size.x), m.header.copy()
    except MapError:
        raise
    except Exception as e:
        raise MapError(path, f"is not a readable MRC file ({e})") from None


def read_map(path, *, require_cubic: bool = True, expect_apix: float | None = None):
    """Read a 3D map. Returns ``(data [z, y, x] float32, apix)``.

    Raises :class:`MapError` naming the file for: a missing or unreadable file, a map that is
    not 3D or not cubic (when required), NaN or infinite values, or a pixel size different
    from ``expect_apix`` (1e-3 relative) when the header has one.
    """
    data, apix, _ = read_mrc(path)
    if data.ndim != 3:
        raise MapError(path, f"is not a 3D map (shape {data.shape})")
    if require_cubic and not (data.shape[0] == data.shape[1] == data.shape[2]):
        raise MapError(path, f"is not cubic (shape {data.shape[2]}x{data.shape[1]}x{data.shape[0]}); expected NxNxN")
    if not np.all(np.isfinite(data)):
        raise MapError(path, f"holds {int((~np.isfinite(data)).sum())} NaN or infinite values")
    if expect_apix is not None and apix > 0 and abs(apix - expect_apix) > 1e-3 * expect_apix:
        raise MapError(path, f"pixel size {apix:g} Å differs from the expected {expect_apix:g} Å")
    return data, apix


def write_map(path, data, apix: float, origin_A=None) -> None:
    """Write a 3D map ``[z, y, x]`` as float32 MRC (atomically). ``origin_A`` (x, y, z) is the
    position in Å of voxel (0, 0, 0), so a model in its own frame overlays the map."""
    import mrcfile

    data = np.ascontiguousarray(np.asarray(data, dtype=np.float32))
    with atomic_output(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(data)
            m.voxel_size = apix
            if origin_A is not None:
                m.header.origin.x, m.header.origin.y, m.header.origin.z = (float(v) for v in origin_A)


class write_stack:
    """A particle stack written batch by batch into a memory-mapped MRC (then renamed into place).

    ``with write_stack(path, n, box, apix) as s: s[i:j] = images``.
    """

    def __init__(self, path, n: int, box: int, apix: float):
        self.path, self.n, self.box, self.apix = Path(path), int(n), int(box), float(apix)

    def __enter__(self):
        import mrcfile

        self._ctx = atomic_output(self.path)
        tmp = self._ctx.__enter__()
        self._m = mrcfile.new_mmap(tmp, shape=(self.n, self.box, self.box), mrc_mode=2, overwrite=True)
        self._m.set_image_stack()
        self._m.voxel_size = self.apix
        return self

    def __setitem__(self, idx, images):
        self._m.data[idx] = np.asarray(images, dtype=np.float32)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._m.update_header_stats()
            self._m.close()
        finally:
            self._ctx.__exit__(exc_type, exc, tb)
        return False


@dataclass
class MapGrid:
    data: np.ndarray  # [z, y, x] float32
    apix: float
    origin_A: np.ndarray  # (x, y, z) Å of voxel (0, 0, 0)
    path: str | None = None

    @property
    def shape(self):
        return self.data.shape

    def extent_A(self):
        """(min xyz, max xyz) of the voxel centres."""
        lo = self.origin_A
        hi = self.origin_A + (np.array(self.data.shape[::-1]) - 1) * self.apix
        return lo, hi


def read_map_grid(path) -> MapGrid:
    """Read an MRC map with its frame (origin header, or n*start x pixel size)."""

    path = Path(path)
    data, apix, h = read_mrc(path)
    org = np.array([float(h.origin.x), float(h.origin.y), float(h.origin.z)])
    start = np.array([int(h.nxstart), int(h.nystart), int(h.nzstart)], dtype=np.float64)
    axes = (int(h.mapc), int(h.mapr), int(h.maps))
    if data.ndim != 3:
        raise MapError(path, f"is not a 3D map (shape {data.shape})")
    if not np.all(np.isfinite(data)):
        raise MapError(path, f"holds {int((~np.isfinite(data)).sum())} NaN or infinite values")
    if apix <= 0:
        raise MapError(path, "has no pixel size in its header")
    if axes not in ((1, 2, 3), (0, 0, 0)):
        raise MapError(path, f"has axis order {axes}; expected 1 2 3 (x fastest)")
    if not np.any(org) and np.any(start):
        org = start * apix
    return MapGrid(data=data, apix=apix, origin_A=org, path=str(path))


def map_origin_A(path) -> np.ndarray:
    """Where voxel (0, 0, 0) of an MRC map lies, (x, y, z) in Å: the header's origin, or
    ``nxstart, nystart, nzstart`` times the pixel size when the origin is zero (the rule
    ChimeraX follows)."""
    import warnings

    import mrcfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, mode="r", permissive=True, header_only=True) as m:
            h, vs = m.header, m.voxel_size
            o = np.array([float(h.origin.x), float(h.origin.y), float(h.origin.z)])
            if not np.any(o):
                o = np.array([float(h.nxstart) * float(vs.x), float(h.nystart) * float(vs.y),
                              float(h.nzstart) * float(vs.z)])
    return o
