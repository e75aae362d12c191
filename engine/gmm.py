"""Gaussian mixtures: the engine's representation of a molecule or a map.

A mixture is ``centers [N, 3]`` (x, y, z in Å from the box centre), ``amplitudes [N]``
(integrated mass: electrons for atoms) and ``sigmas [N]`` (standard deviation in Å). The
density is ``rho(r) = sum_n a_n (2 pi s_n^2)^(-3/2) exp(-|r - c_n|^2 / (2 s_n^2))``
(electrons/Å^3).

Maps made here (:func:`gaussians_to_map`) hold ``rho`` sampled at voxel centres; a
projection (:func:`cryogmm.project.project`) is the sum of such voxels along the beam, as
``relion_project`` computes it, so maps, projections and reconstructions share one scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryogmm.errors import ModelError

__all__ = [
    "write_models",
    "Gaussians",
    "Model",
    "read_model",
    "gaussians_from_coords",
    "gaussians_from_model",
    "gaussians_to_map",
    "sigma_from_resolution",
    "ELECTRONS",
]

# electrons per element (neutral atoms); hydrogens are not modelled
ELECTRONS = {"C": 6, "N": 7, "O": 8, "S": 16, "P": 15, "SE": 34, "MG": 12, "ZN": 30,
             "FE": 26, "CA": 20, "NA": 11, "CL": 17, "K": 19, "MN": 25, "H": 1}
BACKBONE = ("N", "CA", "C", "O", "OXT")
MODES = ("atoms", "ca", "residue2")


def sigma_from_resolution(resolution_A: float) -> float:
    """Gaussian width for a given resolution, as ChimeraX ``molmap`` sets it
    (``sigma = resolution / (pi sqrt 2)``)."""
    return float(resolution_A) / (math.pi * math.sqrt(2.0))


@dataclass
class Gaussians:
    """A Gaussian mixture (see module docstring). Tensors share one device and dtype."""

    centers: torch.Tensor
    amplitudes: torch.Tensor
    sigmas: torch.Tensor

    def __post_init__(self):
        n = self.centers.shape[-2]
        if self.amplitudes.shape[-1] != n or self.sigmas.shape[-1] != n:
            raise ValueError("Gaussians: centers, amplitudes and sigmas disagree on N")

    @property
    def n(self) -> int:
        return int(self.centers.shape[-2])

    def to(self, device=None, dtype=None) -> "Gaussians":
        return Gaussians(*(t.to(device=device, dtype=dtype) for t in (self.centers, self.amplitudes, self.sigmas)))

    def detach(self) -> "Gaussians":
        return Gaussians(self.centers.detach(), self.amplitudes.detach(), self.sigmas.detach())

    def with_centers(self, centers: torch.Tensor) -> "Gaussians":
        return Gaussians(centers, self.amplitudes, self.sigmas)


@dataclass
class Model:
    """Heavy atoms of one or more models (frames) of a structure, matched atom for atom.

    ``coords`` is ``[F, M, 3]`` in the file's Å frame; the atom tables are shared by all frames.
    """

    coords: np.ndarray
    element: np.ndarray  # [M] str, upper case
    atom_name: np.ndarray  # [M] str
    res_id: np.ndarray  # [M] int: index of the residue (0-based, file order)
    res_name: np.ndarray  # [M] str
    chain: np.ndarray  # [M] str
    seq_id: np.ndarray  # [M] int: residue number in the file
    path: str | None = None

    @property
    def n_frames(self) -> int:
        return self.coords.shape[0]

    @property
    def electrons(self) -> np.ndarray:
        return np.array([ELECTRONS.get(e, 6) for e in self.element], dtype=np.float64)

    def center_of_mass(self, frame: int | None = None) -> np.ndarray:
        """Electron-weighted centre (Å); of all frames together when ``frame`` is None."""
        w = self.electrons
        c = self.coords.mean(axis=0) if frame is None else self.coords[frame]
        return (c * w[:, None]).sum(0) / w.sum()


def _atom_key(chain, res, atom):
    return (chain.name, res.seqid.num, res.seqid.icode, res.name, atom.name, atom.altloc)


def read_model(path, others=()) -> Model:
    """Read heavy atoms of every model in ``path`` (PDB or mmCIF, via gemmi), plus the first
    model of each file in ``others`` as further frames.

    Frames are matched atom for atom by (chain, residue number, residue name, atom name);
    only atoms present in every frame are kept. First altloc only.
    """
    import gemmi

    def load(p):
        p = Path(p)
        if not p.is_file():
            raise ModelError(p, "no such file")
        try:
            st = gemmi.read_structure(str(p))
        except Exception as e:  # gemmi raises RuntimeError/ValueError with its own text
            raise ModelError(p, f"cannot be read as PDB or mmCIF ({str(e).splitlines()[0]})") from None
        st.remove_hydrogens()
        st.remove_alternative_conformations()
        frames = []
        for model in st:
            atoms = {}
            for ch in model:
                for res in ch:
                    for at in res:
                        atoms[_atom_key(ch, res, at)] = (at.pos.x, at.pos.y, at.pos.z, at.element.name.upper())
            if atoms:
                frames.append(atoms)
        if not frames:
            raise ModelError(p, "holds no heavy atoms")
        return frames

    frames = load(path)
    for o in others:
        frames.append(load(o)[0])
    keys = [k for k in frames[0] if all(k in f for f in frames[1:])]
    if not keys:
        raise ModelError(others[0] if others else path, "shares no atoms with the first model")
    coords = np.array([[f[k][:3] for k in keys] for f in frames], dtype=np.float64)
    res_index, res_id = {}, []
    for k in keys:
        res_id.append(res_index.setdefault(k[:4], len(res_index)))
    return Model(
        coords=coords,
        element=np.array([frames[0][k][3] for k in keys]),
        atom_name=np.array([k[4] for k in keys]),
        res_id=np.array(res_id),
        res_name=np.array([k[3] for k in keys]),
        chain=np.array([k[0] for k in keys]),
        seq_id=np.array([k[1] for k in keys]),
        path=str(path),
    )


def write_models(path, model, frames_coords, bfactors=None) -> None:
    """Every frame ``[F, M, 3]`` (Å, file frame) as a MODEL of one PDB file, atomically.
    ``bfactors [M]`` fills the B-factor column (default 0)."""
    from cryogmm.bridge.fileio import atomic_output

    b = np.zeros(len(model.element)) if bfactors is None else np.asarray(bfactors, dtype=np.float64)
    frames_coords = np.asarray(frames_coords, dtype=np.float64)
    if frames_coords.ndim == 2:
        frames_coords = frames_coords[None]
    lines = []
    for k, coords in enumerate(frames_coords):
        lines.append(f"MODEL     {k + 1:4d}")
        for i, (x, y, z) in enumerate(coords):
            name = model.atom_name[i]
            name = f" {name:<3s}" if len(name) < 4 else name
            lines.append(
                f"ATOM  {(i + 1) % 100000:5d} {name:4s} {model.res_name[i]:>3s} {model.chain[i][:1]:1s}"
                f"{int(model.seq_id[i]):4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00{min(b[i], 999.99):6.2f}"
                f"          {model.element[i]:>2s}"
            )
        lines.append("ENDMDL")
    lines.append("END")
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def coarse_grain(model: Model, mode: str):
    """Which atoms form each Gaussian: a list of index arrays, one per Gaussian."""
    if mode == "atoms":
        return [np.array([i]) for i in range(len(model.element))]
    groups = []
    for r in np.unique(model.res_id):
        idx = np.nonzero(model.res_id == r)[0]
        names = model.atom_name[idx]
        if mode == "ca":
            groups.append(idx)  # all atoms of the residue, placed at its Cα (below)
        elif mode == "residue2":
            bb = idx[np.isin(names, BACKBONE)]
            sc = idx[~np.isin(names, BACKBONE)]
            groups.extend(g for g in (bb, sc) if len(g))
        else:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    return groups


def gaussians_from_coords(model: Model, coords: np.ndarray, mode: str = "atoms", *,
                          resolution_A: float = 3.0, sigma_A: float | None = None,
                          center_A=None, dtype=torch.float32) -> Gaussians:
    """Gaussians from one frame's atom coordinates ``coords [M, 3]`` (Å, file frame).

    ``mode``: ``atoms`` (every heavy atom), ``ca`` (one per residue at its Cα, mass of the
    whole residue), ``residue2`` (backbone and side-chain centroids). Amplitudes are electron
    counts. ``sigma_A`` defaults to :func:`sigma_from_resolution`; coarse modes add the
    spread of the grouped atoms in quadrature. ``center_A`` (file-frame Å) is put at the box
    centre; default the electron-weighted centre of the model (all frames).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    coords = np.asarray(coords, dtype=np.float64)
    e = model.electrons
    center = model.center_of_mass() if center_A is None else np.asarray(center_A, dtype=np.float64)
    s0 = sigma_from_resolution(resolution_A) if sigma_A is None else float(sigma_A)
    cs, amps, sig = [], [], []
    for g in coarse_grain(model, mode):
        w = e[g]
        if mode == "ca" and np.any(model.atom_name[g] == "CA"):
            c = coords[g][model.atom_name[g] == "CA"][0]
        else:
            c = (coords[g] * w[:, None]).sum(0) / w.sum()
        spread = 0.0 if len(g) == 1 else float(np.sqrt(((coords[g] - c) ** 2).sum(1) @ w / w.sum() / 3.0))
        cs.append(c - center)
        amps.append(w.sum())
        sig.append(math.sqrt(s0**2 + spread**2))
    return Gaussians(
        torch.tensor(np.array(cs), dtype=dtype),
        torch.tensor(amps, dtype=dtype),
        torch.tensor(sig, dtype=dtype),
    )


def gaussians_from_model(path, mode: str = "atoms", **kw) -> Gaussians:
    """Read ``path`` (first model) and build its Gaussians (see :func:`gaussians_from_coords`)."""
    m = read_model(path)
    return gaussians_from_coords(m, m.coords[0], mode, **kw)


def _axis_factors(coord: torch.Tensor, sigmas: torch.Tensor, box: int, apix: float) -> torch.Tensor:
    """``exp(-(x_k - c_n)^2 / (2 s_n^2))`` for the box's pixel positions ``x_k``: ``[..., N, box]``."""
    x = (torch.arange(box, device=coord.device, dtype=coord.dtype) - box // 2) * apix
    return torch.exp(-0.5 * ((x - coord[..., None]) / sigmas[..., None]) ** 2)


def gaussians_to_map(g: Gaussians, box: int, apix: float, chunk: int = 4096) -> torch.Tensor:
    """The density of a mixture sampled at the voxel centres of a cubic map: ``[box, box, box]``
    indexed ``[z, y, x]`` (the ``molmap`` equivalent). Separable: x, y and z factors."""
    c, a, s = g.centers, g.amplitudes, g.sigmas
    norm = a / (2.0 * math.pi * s**2) ** 1.5
    vol = torch.zeros(box * box, box, dtype=c.dtype, device=c.device)
    for i in range(0, g.n, chunk):
        sl = slice(i, i + chunk)
        gx = _axis_factors(c[sl, 0], s[sl], box, apix)
        gy = _axis_factors(c[sl, 1], s[sl], box, apix)
        gz = _axis_factors(c[sl, 2], s[sl], box, apix) * norm[sl, None]
        zy = (gz[:, :, None] * gy[:, None, :]).reshape(gx.shape[0], box * box)
        vol = vol + zy.T @ gx
    return vol.reshape(box, box, box)
