"""Simulated maps of atomic models: :func:`simulate_map` (a noisy map around a model, in memory,
from :func:`cryogmm.model.density.model_map`: ChimeraX's ``cryogmm simulate``)
and a model series' maps along a known path (test data for refine-series)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from cryogmm.core.fourier import lowpass
from cryogmm.errors import OptionError
from cryogmm.io.maps import MapGrid, write_map
from cryogmm.model.density import model_map
from cryogmm.model.topology import build_topology, write_model


def simulate_map(coords, elements, resolution_A: float, *, apix: float | None = None, pad_A: float | None = None,
                 noise: float = 0.0, seed: int = 0) -> MapGrid:
    """A map of atoms in memory: a cubic box around them (``pad_A`` on every side, default
    3 x resolution + 4 Å; voxels of ``apix``, default resolution / 3), ``model_map`` plus white
    noise of ``noise`` x the map's standard deviation (``seed``). Returns a :class:`MapGrid`
    (float32) in the atoms' frame; what ``cryogmm simulate`` in ChimeraX opens as a volume."""
    if not resolution_A > 0:
        raise OptionError("resolution", f"must be positive, got {resolution_A}")
    apix = float(apix) if apix else round(resolution_A / 3.0, 3)
    if resolution_A < 2 * apix - 1e-6:
        raise OptionError("resolution", f"{resolution_A:g} Å is finer than Nyquist for spacing {apix:g} Å")
    if noise < 0:
        raise OptionError("noise", f"must be >= 0, got {noise}")
    xyz = np.asarray(coords, dtype=np.float64).reshape(-1, 3)
    if len(xyz) == 0:
        raise OptionError("model", "has no atoms")
    pad = 3 * resolution_A + 4.0 if pad_A is None else float(pad_A)
    lo = xyz.min(0) - pad
    n = int(math.ceil((xyz.max(0) + pad - lo).max() / apix))
    n += n % 2
    m = model_map(xyz, elements, resolution_A, apix, lo, (n, n, n)).numpy()
    if noise > 0:
        m = m + np.random.default_rng(seed).normal(scale=noise * m.std(), size=m.shape)
    return MapGrid(data=m.astype(np.float32), apix=apix, origin_A=lo)


# ----------------------------------------------------------------------------- a worked example


def series_example(out_dir, n_maps: int = 10, resolution_A: float = 4.0, apix: float = 1.0, noise: float = 0.3,
                   residues: tuple | None = None, seed: int = 0, pad_A: float = 10.0, start: str = "closed") -> dict:
    """Adenylate kinase from open (4AKE) to closed (1AKE): ``n_maps`` truth models by linear
    interpolation of the matching atoms (t = 0 .. 1; t = 0 is the open model itself), and
    their maps on one shared cubic box (molmap widths sigma = res / (pi sqrt 2), white noise
    of sd ``noise`` x the noise-free map's sd, low-passed to the resolution).

    ``residues=(first, last)`` keeps a fragment. ``start``: the starting model, ``closed`` (the
    last map's truth; 1AKE has no Ramachandran outlier, while 4AKE's Gly 42 is one) or
    ``open`` (the first map's). Writes ``start.pdb``,
    ``truth_XX.pdb`` and ``map_XX.mrc`` into ``out_dir``; returns their paths and ``t``."""
    from importlib import resources

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fname in (("open", "adk_open.pdb"), ("closed", "adk_closed.pdb")):
        src = Path(str(resources.files("cryogmm.data").joinpath(fname)))
        lines = [ln for ln in src.read_text().splitlines() if ln.startswith("ATOM")
                 and (residues is None or residues[0] <= int(ln[22:26]) <= residues[1])]
        paths[name] = out / f"_{name}.pdb"
        paths[name].write_text("\n".join(lines) + "\nEND\n")
    a = build_topology(paths["open"], add_hydrogens=False)
    b = build_topology(paths["closed"], add_hydrogens=False)
    key = lambda t, i: (str(t.chain[i]), int(t.seq_id[i]), str(t.atom_name[i]))  # noqa: E731
    kb = {key(b, i): i for i in range(b.n_atoms)}
    ia = [i for i in range(a.n_atoms) if key(a, i) in kb]
    ib = [kb[key(a, i)] for i in ia]
    if len(ia) != a.n_atoms:
        raise ValueError(f"{a.n_atoms - len(ia)} atoms of the open model have no match in the closed one")
    xa, xb = a.coords[ia], b.coords[ib]
    ts = np.linspace(0.0, 1.0, n_maps)
    truths = [(1 - t) * xa + t * xb for t in ts]
    allx = np.concatenate(truths)
    lo = allx.min(0) - pad_A
    n = int(math.ceil((allx.max(0) - lo).max() / apix + pad_A / apix))
    n += n % 2
    rng = np.random.default_rng(seed)
    start_path = out / "start.pdb"
    write_model(a, xb if start == "closed" else xa, start_path)
    maps, truth_paths = [], []
    for k, x in enumerate(truths):
        tp = out / f"truth_{k + 1:02d}.pdb"
        write_model(a, x, tp)
        mm = model_map(x, a.element, resolution_A, apix, lo, (n, n, n))
        noisy = mm + torch.as_tensor(rng.normal(scale=noise * float(mm.std()), size=mm.shape))
        noisy = lowpass(noisy, resolution_A, apix)
        mp = out / f"map_{k + 1:02d}.mrc"
        write_map(mp, noisy.numpy().astype(np.float32), apix, origin_A=lo)
        maps.append(mp)
        truth_paths.append(tp)
    for p in paths.values():
        p.unlink()
    return {"start": start_path, "maps": maps, "truths": truth_paths, "t": ts.tolist(), "box": n, "apix": apix}
