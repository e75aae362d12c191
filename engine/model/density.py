"""Atom densities on a map grid: differentiable local Gaussian splatting, maps with frames.

A :class:`MapGrid` is a map ``[z, y, x]`` with its pixel size and the position (x, y, z, Å)
of voxel (0, 0, 0), so atoms in the model's frame overlay it. :func:`splat` puts one
isotropic Gaussian per atom on such a grid, touching only voxels within ``cut`` sigma, so a
model of thousands of atoms costs ~N x (2 cut sigma / apix)^3 operations and its gradient
with respect to the coordinates comes from torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryogmm.core.gaussians import ELECTRONS, sigma_from_resolution
from cryogmm.errors import MapError
from cryogmm.model.topology import Topology


def blau_lindahl_sigma(resolution_A: float) -> float:
    """Spreading width of Blau & Lindahl / GROMACS density-guided simulation:
    ``res / (2 sqrt(ln 4))``, the Gaussian whose full width at half maximum is the resolution."""
    return float(resolution_A) / (2.0 * math.sqrt(math.log(4.0)))


def splat(x: torch.Tensor, amp: torch.Tensor, sigma, shape, apix: float, origin_A, cut: float = 3.0) -> torch.Tensor:
    """Density ``[z, y, x]`` of normalised 3D Gaussians (integral ``amp``, width ``sigma`` Å,
    scalar or [N]) at positions ``x [N, 3]`` (Å) on a grid; differentiable in x, amp, sigma."""
    dev, dt = x.device, x.dtype
    nz, ny, nx = shape
    org = torch.as_tensor(np.asarray(origin_A, dtype=np.float64), dtype=dt, device=dev)
    s = torch.as_tensor(sigma, dtype=dt, device=dev)
    smax = float(s.max()) if s.ndim else float(s)
    # the stencil reaches at least cut sigma from the atom wherever it sits in its voxel
    r = int(math.ceil(cut * smax / apix)) + 1
    u = (x - org) / apix  # voxel units, (x, y, z)
    base = torch.floor(u.detach()).long() - r + 1  # [N, 3]
    off = torch.arange(2 * r, device=dev)
    idx = base[:, :, None] + off[None, None, :]  # [N, 3, K]
    d = (idx.to(dt) - u[:, :, None]) * apix  # Å
    sv = s[:, None, None] if s.ndim else s
    g = torch.exp(-0.5 * (d / sv) ** 2)  # [N, 3, K]
    norm = amp / (2 * math.pi * (s**2)) ** 1.5
    lim = torch.tensor([nx, ny, nz], device=dev)
    inside = (idx >= 0) & (idx < lim[None, :, None])
    g = g * inside
    idxc = idx.clamp(min=0)
    idxc = torch.minimum(idxc, (lim - 1)[None, :, None])
    gx, gy, gz = g[:, 0], g[:, 1], g[:, 2]
    # the amplitude folded into the z factor ([N, K]) before the [N, K, K, K] outer product:
    # one product over the stencil fewer, forward and backward
    w = (gz * norm[:, None])[:, :, None, None] * gy[:, None, :, None] * gx[:, None, None, :]
    flat = (idxc[:, 2, :, None, None] * ny + idxc[:, 1, None, :, None]) * nx + idxc[:, 0, None, None, :]
    # summed in place into fresh zeros (an out-of-place index_add copies the whole grid first)
    out = torch.zeros(nz * ny * nx, dtype=dt, device=dev).index_add_(0, flat.reshape(-1), w.reshape(-1))
    return out.reshape(nz, ny, nx)


def model_map(coords, elements, resolution_A: float, apix: float, origin_A, shape) -> torch.Tensor:
    """Noise-free map of atoms on a grid (``[z, y, x]``, voxel (0, 0, 0) at ``origin_A`` (x, y, z)
    Å): each atom a Gaussian of ``sigma_from_resolution`` (molmap widths) with its electron count
    as amplitude, float64."""
    amp = torch.tensor([ELECTRONS.get(str(e).upper(), 6) for e in elements], dtype=torch.float64)
    return splat(torch.as_tensor(np.asarray(coords, dtype=np.float64)), amp, sigma_from_resolution(resolution_A),
                 tuple(shape), apix, np.asarray(origin_A, dtype=np.float64))


def sample(vol: torch.Tensor, x: torch.Tensor, apix: float, origin_A) -> torch.Tensor:
    """Trilinear interpolation of ``vol [z, y, x]`` at positions ``x [N, 3]`` (Å); zero
    outside; differentiable in x and vol."""
    nz, ny, nx = vol.shape
    org = torch.as_tensor(np.asarray(origin_A, dtype=np.float64), dtype=x.dtype, device=x.device)
    u = (x - org) / apix
    size = torch.tensor([nx - 1, ny - 1, nz - 1], dtype=x.dtype, device=x.device)
    grid = (2.0 * u / size - 1.0).reshape(1, 1, 1, -1, 3)
    out = torch.nn.functional.grid_sample(vol[None, None], grid, mode="bilinear", padding_mode="zeros",
                                          align_corners=True)
    return out.reshape(-1)


def check_overlap(topo: Topology, grid, path):
    lo, hi = grid.extent_A()
    x = topo.coords[~topo.is_h]
    inside = np.all((x >= lo) & (x <= hi), axis=1).mean()
    if inside < 0.5:
        raise MapError(path, f"does not overlap the model: only {100 * inside:.0f}% of its atoms lie inside the map "
                             f"box (x,y,z {lo.round(1).tolist()} to {hi.round(1).tolist()} Å)")
    # residues wholly outside the box (a ligand placed off the map, a chain the map does not
    # cover) refine on geometry alone: said, not refused
    heavy = ~topo.is_h
    ok = np.all((topo.coords >= lo) & (topo.coords <= hi), axis=1) & heavy
    n_in = np.bincount(topo.res_index, weights=ok, minlength=len(topo.residues))
    out = [r for r, d in enumerate(topo.residues) if n_in[r] == 0 and d.get("kind") != "fixed"
           and heavy[d["atoms"]].any()]
    if out:
        names = ", ".join(topo.res_label(r) for r in out[:10]) + (f" and {len(out) - 10} more" if len(out) > 10 else "")
        msg = (f"{len(out)} residue(s) lie wholly outside the map box of {path}: {names}; they follow geometry "
               "and their neighbours only")
        if msg not in topo.warnings:
            topo.warnings.append(msg)
    return out

