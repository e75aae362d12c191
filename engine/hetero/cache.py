"""On-disk cache of what heterogeneity training holds per particle, for streamed particles.

Held in memory, a particle costs its cropped transform, its CTF and the encoder's two input
images, computed once. Streamed without a cache, every batch of every epoch read the full-box
images again, Fourier-cropped them, computed the CTFs and projected the reference at the poses
(37 ms per batch of 64 at box 128 on one CPU thread: read 5, crop FFT 6, CTF 4, reference
projection 18; 1 ms in memory). The cache writes those per-particle arrays once and reads them
back per batch (3 ms cold, 0.3 ms from the page cache), so a streamed epoch costs what an
in-memory epoch costs plus positioned reads of small records (``benchmarks/hetero_stream.py``,
``benchmarks/results/hetero_stream_interleaved.json``: 0.84-1.04x the in-memory images/s,
uncached 0.72-0.82x, in the same runs on a loaded 2-core machine):

- ``fourier.bin``: per particle the cropped orthonormal ``rfft2`` (complex64 as float32 pairs)
  and the CTF on the cropped grid (float32), one record each, written by the noise pass of
  :func:`cryogmm.hetero.data.load_particles` (every image is read there anyway), with the
  noise sums in ``meta.json``: a reused entry needs no pass over the stacks at all;
- ``encoder-<key>.bin``: per particle the encoder's inputs (the whitened band-limited image and
  reference projection, float32 ``[2, crop, crop]``), written by
  :class:`cryogmm.hetero.vae.ForwardModel` from ``fourier.bin`` once the image scale is known;
  its key is the reference as drawn, the image scale, the noise and the band.

An entry is a folder ``particles-<key>`` of the cache folder; the key (SHA-256) covers the STAR
file's and every stack's path, size and modification time, the rows this process reads (its
shard), the box, pixel size and crop and the record layout: a changed input or option makes a
new entry, and the entries of the same STAR and settings with another key (the input changed
since) are removed when the new one is written. An entry (or an encoder file) is written under
a temporary name and renamed when complete, so an interrupted run leaves nothing that a later
run would read. Records are read with positioned reads (:func:`cryogmm.bridge.images.read_records`,
no memory map: the pages stay in the page cache, not in the process), one read per run of
consecutive rows, in the background thread that prepares the next batch.

Where it lives and how long (``cryogmm hetero train``): by default ``RUN/particle_cache``,
removed when training ends (kept after an interrupted run, which ``--resume`` then reuses;
removed when the job stops on bad input); with ``--cache-dir DIR`` it is kept, and reused by
every later run on the same particles with the same crop.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch

from cryogmm.bridge.images import read_records
from cryogmm.errors import OptionError

VERSION = 1
META = "meta.json"
FOURIER = "fourier.bin"


def check_cache_dir(path, option: str = "--cache-dir") -> Path:
    """The cache folder (not created here: :class:`ParticleCache` makes it when it writes);
    :class:`~cryogmm.errors.OptionError` naming ``option`` when it is not a folder, or cannot be
    made or written by this process."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OptionError(option, f"{p} exists and is not a folder")
    up = p
    while not up.exists():
        if up.parent == up:
            break
        up = up.parent
    if not up.is_dir():
        raise OptionError(option, f"{p} cannot be created: {up} is not a folder")
    if not os.access(up, os.W_OK | os.X_OK):
        raise OptionError(option, f"{p} is not writable" if up == p else f"{p} cannot be created in {up} (not writable)")
    return p


def _identity(path) -> list:
    st = os.stat(path)
    return [str(Path(path).resolve()), int(st.st_size), int(st.st_mtime_ns)]


def tensor_digest(*items) -> str:
    """SHA-256 of tensors, arrays and plain values (for keys)."""
    h = hashlib.sha256()
    for x in items:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().contiguous().numpy()
        if isinstance(x, np.ndarray):
            h.update(str((x.dtype.str, x.shape)).encode())
            h.update(np.ascontiguousarray(x).tobytes())
        else:
            h.update(repr(x).encode())
    return h.hexdigest()


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file()) if p.is_dir() else 0


class _Records:
    """A file of fixed-size float32 records ``[shape]``, read by row position."""

    def __init__(self, path: Path, shape: tuple):
        self.path, self.shape = Path(path), tuple(shape)
        self.floats = int(np.prod(self.shape))
        self.nbytes = 4 * self.floats
        self._fd = None
        self._lock = threading.Lock()  # opened on first read, by the prefetch thread or the caller

    def read(self, pos) -> np.ndarray:
        pos = np.asarray(pos, dtype=np.int64).reshape(-1)
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
        order = np.argsort(pos, kind="stable")
        out = np.empty((pos.size, *self.shape), dtype=np.float32)
        read_records(self._fd, pos[order], self.nbytes, 0, out, self.path)
        if pos.size > 1 and np.any(np.diff(pos) < 0):
            res = np.empty_like(out)
            res[order] = out
            out = res
        return out

    def close(self):
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class _Writer:
    """Appends records to ``path``'s temporary twin; ``finish`` renames it to ``path``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.fh = open(self.tmp, "wb")  # noqa: SIM115 - kept open across appends, closed by finish or abort
        self.rows = 0

    def append(self, arr: np.ndarray):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        self.fh.write(arr.tobytes())
        self.rows += arr.shape[0]

    def finish(self):
        self.fh.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


class ParticleCache:
    """One cache entry: the per-particle training inputs of this process's ``rows``.

    ``ready``: ``fourier.bin`` is complete (then ``noise`` holds the noise sums of its pass).
    Use :meth:`writer` / :meth:`finish_fourier` to write it, :meth:`fourier` to read
    ``(ft, ctf)`` of local row positions, :meth:`encoder_ready`/:meth:`write_encoder`/
    :meth:`encoder` for the encoder inputs."""

    def __init__(self, root: Path, *, star, stacks, rows: np.ndarray, n_table: int, box: int, apix: float,
                 crop: int, noise_radius_A: float):
        self.root = Path(root)
        self.crop, self.half = int(crop), int(crop) // 2 + 1
        self.rows = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
        self.settings = {"version": VERSION, "box": int(box), "apix": round(float(apix), 6), "crop": self.crop,
                         "rows": list(self.rows), "n_table": int(n_table),
                         "noise_radius_A": round(float(noise_radius_A), 6)}
        self.identity = {"star": _identity(star), "stacks": [_identity(s) for s in stacks]}
        self.key = tensor_digest(json.dumps({**self.settings, **self.identity}, sort_keys=True))
        self.folder = self.root / f"particles-{self.key[:20]}"
        h = self.crop * self.half
        self._fourier = _Records(self.folder / FOURIER, (3 * h,))
        self._enc: _Records | None = None
        self.status = {"fourier": None, "encoder": None}
        self.seconds_write = 0.0
        self.noise = None
        self._writer = None
        meta = self._read_meta()
        if meta is not None:
            self.noise = meta["noise"]
            self.status["fourier"] = "reused"

    # ------------------------------------------------------------------ entry
    def _read_meta(self):
        try:
            meta = json.loads((self.folder / META).read_text())
            size = (self.folder / FOURIER).stat().st_size
        except (OSError, ValueError):
            return None
        n = self.rows[1] - self.rows[0]
        if meta.get("key") != self.key or size != n * self._fourier.nbytes:
            return None
        return meta

    @property
    def ready(self) -> bool:
        return self.noise is not None

    @property
    def n(self) -> int:
        return self.rows[1] - self.rows[0]

    def bytes_needed(self) -> int:
        """Disk bytes of a complete entry (fourier records and encoder inputs)."""
        return self.n * (self._fourier.nbytes + 4 * 2 * self.crop * self.crop)

    def writer(self):
        """Start writing ``fourier.bin`` (in a temporary folder, renamed by :meth:`finish_fourier`)."""
        tmp = self.root / f".{self.folder.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            raise OptionError("--cache-dir", f"{self.root} cannot be written ({e.strerror or e})") from None
        self._tmp = tmp
        self._t0 = time.perf_counter()
        self._writer = _Writer(tmp / FOURIER)
        return self

    def append(self, ft: torch.Tensor, ctf: torch.Tensor):
        """Records of the next rows: cropped transforms ``[k, crop, half]`` complex and their CTFs."""
        k = ft.shape[0]
        rec = torch.cat([torch.view_as_real(ft.to(torch.complex64)).reshape(k, -1), ctf.float().reshape(k, -1)], 1)
        self._writer.append(rec.numpy())

    def finish_fourier(self, noise: list):
        """Complete the entry (``noise``: this process's noise sums) and rename it into place; the
        entries of the same STAR and settings with another key (stale: the input changed) go."""
        w = self._writer
        if w.rows != self.n:
            w.abort()
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise RuntimeError(f"cache entry got {w.rows} rows of {self.n}")
        w.finish()
        meta = {"key": self.key, **self.settings, **self.identity, "noise": list(map(float, noise)),
                "record_floats": self._fourier.floats, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (self._tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        shutil.rmtree(self.folder, ignore_errors=True)
        os.replace(self._tmp, self.folder)
        self._writer = None
        self.noise = meta["noise"]
        self.status["fourier"] = "written"
        self.seconds_write += time.perf_counter() - self._t0
        self._remove_stale()

    def abort(self):
        if self._writer is not None:
            self._writer.abort()
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._writer = None

    def _remove_stale(self):
        for d in self.root.glob("particles-*"):
            if d == self.folder or not d.is_dir():
                continue
            try:
                m = json.loads((d / META).read_text())
            except (OSError, ValueError):
                continue
            same = m.get("star", [None])[0] == self.identity["star"][0] and all(
                m.get(k) == v for k, v in self.settings.items())
            if same and m.get("key") != self.key:
                shutil.rmtree(d, ignore_errors=True)

    def fourier(self, pos) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ft [k, crop, half] complex64, ctf [k, crop, half])`` of local row positions ``pos``."""
        rec = torch.from_numpy(self._fourier.read(pos))
        k, h = rec.shape[0], self.crop * self.half
        ft = torch.view_as_complex(rec[:, : 2 * h].reshape(k, self.crop, self.half, 2).contiguous())
        return ft, rec[:, 2 * h:].reshape(k, self.crop, self.half)

    # ------------------------------------------------------------------ encoder inputs
    def _enc_path(self, key2: str) -> Path:
        return self.folder / f"encoder-{key2[:20]}.bin"

    def encoder_ready(self, key2: str) -> bool:
        p = self._enc_path(key2)
        ok = p.is_file() and p.stat().st_size == self.n * 4 * 2 * self.crop * self.crop
        if ok:
            self._enc = _Records(p, (2, self.crop, self.crop))
            self.status["encoder"] = "reused"
        return ok

    def write_encoder(self, key2: str, chunks):
        """Write the encoder inputs from ``chunks`` (``[k, 2, crop, crop]`` tensors, the rows in
        order) under a temporary name, rename it, and drop other encoder files of this entry."""
        t0 = time.perf_counter()
        p = self._enc_path(key2)
        w = _Writer(p)
        try:
            for c in chunks:
                w.append(c.numpy())
        except BaseException:
            w.abort()
            raise
        if w.rows != self.n:
            w.abort()
            raise RuntimeError(f"encoder cache got {w.rows} rows of {self.n}")
        w.finish()
        for old in self.folder.glob("encoder-*.bin"):
            if old != p:
                old.unlink(missing_ok=True)
        self._enc = _Records(p, (2, self.crop, self.crop))
        self.status["encoder"] = "written"
        self.seconds_write += time.perf_counter() - t0

    @property
    def has_encoder(self) -> bool:
        return self._enc is not None

    def encoder(self, pos) -> torch.Tensor:
        return torch.from_numpy(self._enc.read(pos))

    # ------------------------------------------------------------------ life
    def report(self) -> dict:
        return {"path": str(self.folder), "bytes": _dir_bytes(self.folder), "fourier": self.status["fourier"],
                "encoder": self.status["encoder"], "seconds_write": self.seconds_write}

    def close(self):
        self._fourier.close()
        if self._enc is not None:
            self._enc.close()

    def remove(self):
        """Delete this entry (and the cache folder when that leaves it empty)."""
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.root.rmdir()
        except OSError:
            pass
