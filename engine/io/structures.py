"""Atomic models as read for Gaussian work: every atom of every model in a file (gemmi),
multi-model PDB writing, coarse graining (Cα, backbone + side chain) into Gaussians, and
Gaussian mixtures as pseudo-atom PDB files (width in the B-factor)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryogmm.core.gaussians import B_PER_SIGMA2, ELECTRONS, Gaussians, sigma_from_resolution
from cryogmm.errors import ModelError
from cryogmm.io.outputs import atomic_output

BACKBONE = ("N", "CA", "C", "O", "OXT")
MODES = ("atoms", "ca", "residue2")


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


def read_structure_file(path):
    """The gemmi Structure of a PDB or mmCIF file, or a ModelError naming the file."""
    import gemmi

    path = Path(path)
    if not path.is_file():
        raise ModelError(path, "no such file")
    try:
        return gemmi.read_structure(str(path))
    except Exception as e:  # gemmi raises RuntimeError/ValueError with its own text
        raise ModelError(path, f"cannot be read as PDB or mmCIF ({str(e).splitlines()[0]})") from None


def read_model(path, others=()) -> Model:
    """Read heavy atoms of every model in ``path`` (PDB or mmCIF, via gemmi), plus the first
    model of each file in ``others`` as further frames.

    Frames are matched atom for atom by (chain, residue number, residue name, atom name);
    only atoms present in every frame are kept. First altloc only.
    """

    def load(p):
        p = Path(p)
        st = read_structure_file(p)
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


# --------------------------------------------------------------------------- PDB I/O

_REMARK = "REMARK 250"  # free-text remarks; PDB readers (gemmi, ChimeraX) ignore them
_CHAINS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _fixed(x: float, width: int, decimals: int) -> str:
    """``x`` in ``width`` characters, dropping decimals as far as needed."""
    for d in range(decimals, -1, -1):
        s = f"{x:{width}.{d}f}"
        if len(s) <= width:
            return s
    raise ValueError(f"{x} does not fit in {width} characters")


def write_gaussians_pdb(path, g: Gaussians, origin_A=None) -> None:
    """Write a mixture as pseudo-atoms (atomically): one ``HETATM`` per Gaussian, residue
    ``GMM``, element C, one residue per Gaussian.

    - coordinates: ``centre + origin_A`` (Å). ``origin_A`` (x, y, z) is where the box centre
      (voxel ``N // 2``) lies in the map's frame, so the atoms overlay the map in ChimeraX;
      default 0 (the box centre at the origin).
    - occupancy: ``amplitude / scale`` with ``scale`` the largest amplitude, so 0..1.
    - B-factor: ``8 pi^2 sigma^2`` Å^2 (the standard B <-> sigma relation).

    The columns hold 3 (coordinates) or 2 (occupancy, B) decimals; ``REMARK 250`` lines keep
    the scale, the origin and every Gaussian's exact amplitude and width, so
    :func:`read_gaussians_pdb` gives them back to float precision and coordinates to 1e-3 Å.
    """

    c = g.centers.detach().to("cpu", torch.float64).numpy()
    a = g.amplitudes.detach().to("cpu", torch.float64).numpy()
    s = g.sigmas.detach().to("cpu", torch.float64).numpy()
    if c.ndim != 2 or a.ndim != 1 or s.ndim != 1:
        raise ValueError("write_gaussians_pdb: expected one mixture (centers [N, 3], amplitudes [N], sigmas [N])")
    o = np.zeros(3) if origin_A is None else np.asarray(origin_A, dtype=np.float64).reshape(3)
    xyz = c + o
    if np.abs(xyz).max(initial=0.0) >= 9999.0 or not np.isfinite(xyz).all():
        raise ValueError("write_gaussians_pdb: coordinates beyond what the PDB format holds (|x| < 9999 Å)")
    scale = float(a.max()) if len(a) and a.max() > 0 else 1.0
    n = len(a)
    if n > 9999 * len(_CHAINS):
        raise ValueError(f"write_gaussians_pdb: {n} Gaussians; the PDB format holds at most {9999 * len(_CHAINS)}")
    lines = [
        f"{_REMARK} CRYOGMM GAUSSIANS {n}",
        f"{_REMARK} CRYOGMM OCCUPANCY = AMPLITUDE / {scale:.17g}",
        f"{_REMARK} CRYOGMM BFACTOR = 8 PI^2 SIGMA^2",
        f"{_REMARK} CRYOGMM ORIGIN_A {o[0]:.17g} {o[1]:.17g} {o[2]:.17g}",
    ]
    lines += [f"{_REMARK} CRYOGMM G {i + 1} {a[i]:.9e} {s[i]:.9e}" for i in range(n)]
    for i in range(n):
        x, y, z = xyz[i]
        occ = _fixed(a[i] / scale, 6, 2)
        b = _fixed(B_PER_SIGMA2 * s[i] ** 2, 6, 2)
        lines.append(
            f"HETATM{(i % 99999) + 1:5d}  C   GMM {_CHAINS[i // 9999]}{(i % 9999) + 1:4d}    "
            f"{x:8.3f}{y:8.3f}{z:8.3f}{occ}{b}           C"
        )
    lines.append("END")
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def read_gaussians_pdb(path, *, origin_A=None, dtype=torch.float32) -> Gaussians:
    """Read a mixture written by :func:`write_gaussians_pdb` (or any PDB whose ``GMM``
    residues are Gaussians: then amplitude = occupancy, sigma from the B-factor).

    Centres are ``coordinates - origin`` with the origin from ``origin_A`` or else from the
    file's ``REMARK 250 CRYOGMM ORIGIN_A`` (0 when absent). Exact amplitudes and widths from
    the remarks are used when the remarks describe as many Gaussians as the file holds
    (a file edited elsewhere may have lost them; the columns are used then, scaled by the
    remarked occupancy scale when that survived).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(path, "no such file")
    scale, origin, exact = 1.0, np.zeros(3), {}
    xyz, occ, bfac = [], [], []
    try:
        for line in path.read_text().splitlines():
            if line.startswith(_REMARK + " CRYOGMM"):
                f = line.split()
                if f[3] == "OCCUPANCY":
                    scale = float(f[-1])
                elif f[3] == "ORIGIN_A":
                    origin = np.array([float(t) for t in f[4:7]])
                elif f[3] == "G":
                    exact[int(f[4])] = (float(f[5]), float(f[6]))
            elif line.startswith(("HETATM", "ATOM  ")) and line[17:20].strip() == "GMM":
                xyz.append([float(line[30:38]), float(line[38:46]), float(line[46:54])])
                occ.append(float(line[54:60]))
                bfac.append(float(line[60:66]))
    except (ValueError, IndexError) as e:
        raise ModelError(path, f"is not a Gaussians PDB (malformed line: {e})") from None
    if not xyz:
        raise ModelError(path, "holds no GMM pseudo-atoms (HETATM records with residue name GMM)")
    n = len(xyz)
    if sorted(exact) == list(range(1, n + 1)):
        a = np.array([exact[i + 1][0] for i in range(n)])
        s = np.array([exact[i + 1][1] for i in range(n)])
    else:
        a = np.array(occ) * scale
        s = np.sqrt(np.array(bfac) / B_PER_SIGMA2)
    if not (np.all(s > 0) and np.all(a >= 0)):
        raise ModelError(path, "holds Gaussians with zero width or negative amplitude (B-factor or occupancy <= 0)")
    o = origin if origin_A is None else np.asarray(origin_A, dtype=np.float64).reshape(3)
    c = np.array(xyz) - o
    return Gaussians(torch.tensor(c, dtype=dtype), torch.tensor(a, dtype=dtype), torch.tensor(s, dtype=dtype))


def pdb_format_problem(st) -> str | None:
    """Why the PDB format cannot hold structure ``st`` without loss (None when it can): a chain
    name longer than the two characters gemmi's PDB files carry (mmCIF holds any name; atom and
    residue numbers past the PDB columns are written in hybrid-36)."""
    for ch in st[0]:
        if len(ch.name) > 2:
            return f"chain name {ch.name!r} is longer than the PDB format's 2 characters"
    return None
