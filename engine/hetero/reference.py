"""The reference of a heterogeneity run: the atomic model coarse-grained into Gaussians and
placed in the particles' box (from a consensus map's origin or the model's centre)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryogmm.core.gaussians import Gaussians
from cryogmm.errors import MapError, ModelError
from cryogmm.io.structures import coarse_grain, gaussians_from_coords, read_model


# --------------------------------------------------------------------------- reference
@dataclass
class Reference:
    """The reference model and its coarse Gaussians in the particles' box frame.

    ``center_A``: the file-frame point at the box centre; ``owner [M]``: Gaussian of every
    atom; ``residue_of [N]``: residue (0-based) of every Gaussian; ``chain_of_residue [R]``;
    ``kind [N]``: 0 backbone/Cα, 1 side chain.
    """

    model: object
    gaussians: Gaussians
    center_A: np.ndarray
    owner: np.ndarray
    residue_of: np.ndarray
    chain_of_residue: np.ndarray
    kind: np.ndarray
    path: str

    def atoms_box(self) -> torch.Tensor:
        """Atom coordinates ``[M, 3]`` in the box frame (Å from the centre)."""
        return torch.as_tensor(self.model.coords[0] - self.center_A, dtype=torch.float32)

    @property
    def ca_index(self) -> np.ndarray:
        return np.flatnonzero(self.model.atom_name == "CA")


def map_center(path, box: int, apix: float) -> np.ndarray:
    """File-frame position (Å) of the centre voxel of a map, from its header origin."""
    import mrcfile

    path = Path(path)
    if not path.is_file():
        raise MapError(path, "no such file")
    try:
        with mrcfile.open(path, mode="r", permissive=True, header_only=True) as m:
            o = np.array([float(m.header.origin.x), float(m.header.origin.y), float(m.header.origin.z)])
            nx = int(m.header.nx)
            vs = float(m.voxel_size.x)
            start = np.array([int(m.header.nxstart), int(m.header.nystart), int(m.header.nzstart)])
    except Exception as e:
        raise MapError(path, f"is not a readable MRC file ({e})") from None
    if nx != box:
        raise MapError(path, f"is {nx} px wide but the particles are {box} px")
    if vs > 0 and abs(vs - apix) > 1e-3 * apix:
        raise MapError(path, f"pixel size {vs:g} Å differs from the particles' {apix:g} Å")
    if not np.any(o) and np.any(start):
        o = start * apix
    return o + (box // 2) * apix


def load_reference(path, *, box: int, apix: float, mode: str = "ca", resolution_A: float | None = None,
                   center_A=None) -> Reference:
    """Read the reference model and build its coarse Gaussians centred in the box.

    Raises :class:`ModelError` naming the residues that lie outside the particle box (the
    model does not overlay the particles' map).
    """

    model = read_model(path)
    center = model.center_of_mass() if center_A is None else np.asarray(center_A, dtype=np.float64)
    res = resolution_A or 2.0 * apix
    g = gaussians_from_coords(model, model.coords[0], mode, resolution_A=res, center_A=center)
    groups = coarse_grain(model, mode)
    owner = np.empty(len(model.element), dtype=np.int64)
    for i, grp in enumerate(groups):
        owner[grp] = i
    residue_of = np.array([model.res_id[grp[0]] for grp in groups], dtype=np.int64)
    kind = np.array([0 if mode != "residue2" or np.isin(model.atom_name[grp], ("N", "CA", "C", "O", "OXT")).any()
                     else 1 for grp in groups], dtype=np.int64)
    n_res = int(model.res_id.max()) + 1
    chain_names = {c: i for i, c in enumerate(dict.fromkeys(model.chain.tolist()))}
    chain_of_residue = np.zeros(n_res, dtype=np.int64)
    chain_of_residue[model.res_id] = [chain_names[c] for c in model.chain]
    # every atom must lie inside the box, with room for the particle's motion
    half = box // 2 * apix
    xyz = model.coords[0] - center
    out = np.abs(xyz).max(1) > half
    if out.any():
        bad = np.unique(model.seq_id[out])
        chains = sorted(set(model.chain[out].tolist()))
        raise ModelError(path, f"{len(bad)} residue(s) (chain {','.join(chains)} {bad[0]}..{bad[-1]}) lie outside "
                         f"the {box}-px box of {apix:g} Å around the particles' centre "
                         f"({center[0]:.1f}, {center[1]:.1f}, {center[2]:.1f}) Å: the model does not overlay the "
                         f"particles (give --map, the consensus map the model was fitted in)")
    return Reference(model, g, center, owner, residue_of, chain_of_residue, kind, str(path))
