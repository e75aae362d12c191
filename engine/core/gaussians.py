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

import torch

# electrons per element (neutral atoms); hydrogens are not modelled
ELECTRONS = {"C": 6, "N": 7, "O": 8, "S": 16, "P": 15, "SE": 34, "MG": 12, "ZN": 30,
             "FE": 26, "CA": 20, "NA": 11, "CL": 17, "K": 19, "MN": 25, "H": 1}


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


def axis_factors(coord: torch.Tensor, sigmas: torch.Tensor, box: int, apix: float) -> torch.Tensor:
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
        gx = axis_factors(c[sl, 0], s[sl], box, apix)
        gy = axis_factors(c[sl, 1], s[sl], box, apix)
        gz = axis_factors(c[sl, 2], s[sl], box, apix) * norm[sl, None]
        zy = (gz[:, :, None] * gy[:, None, :]).reshape(gx.shape[0], box * box)
        vol = vol + zy.T @ gx
    return vol.reshape(box, box, box)


B_PER_SIGMA2 = 8.0 * math.pi**2
