"""The series network (latent -> rigid patch motions blended per residue + per-atom residuals)
and the latent path helpers (reading, normalising, arc-length placement)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cryogmm.core.kmeans import kmeans_patches
from cryogmm.core.rotations import rotvec_to_rotmat
from cryogmm.errors import InputError
from cryogmm.model.series.config import RefineSeriesConfig

# ----------------------------------------------------------------------------- latent


def read_latent(path, n_maps: int) -> np.ndarray:
    """Latent coordinates ``[n_maps, d]`` from a text file (one row per map, whitespace or
    comma separated; ``#`` comments)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "does not exist")
    try:
        txt = path.read_text().replace(",", " ")
        rows = [ln.split("#", 1)[0].split() for ln in txt.splitlines()]
        rows = [r for r in rows if r]
        z = np.array([[float(v) for v in r] for r in rows], dtype=np.float64)
    except ValueError as e:
        raise InputError(path, f"is not a table of numbers ({e})") from None
    if z.ndim != 2 or len(z) == 0:
        raise InputError(path, "holds no rows of equal width")
    if len(z) != n_maps:
        raise InputError(path, f"has {len(z)} rows but {n_maps} maps were given (one row per map, in --maps order)")
    if not np.all(np.isfinite(z)):
        raise InputError(path, "holds NaN or infinite values")
    return z


def normalise_latent(z: np.ndarray) -> np.ndarray:
    """Shift and scale (one factor for all dimensions, so distances keep their ratios) into [0, 1]^d."""
    lo = z.min(0)
    ext = float((z.max(0) - lo).max())
    return (z - lo) / (ext if ext > 0 else 1.0)


def latent_path(z: np.ndarray, k: int):
    """``k`` points evenly by arc length along the polyline through ``z [M, d]`` (map order).

    Returns ``(points [k, d], seg [k], frac [k])``: point ``f`` lies on the segment from map
    ``seg[f]`` to map ``seg[f] + 1`` at fraction ``frac[f]``."""
    seglen = np.linalg.norm(np.diff(z, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seglen)])
    total = cum[-1]
    pts, seg, frac = [], [], []
    for f in range(k):
        s = total * f / max(k - 1, 1)
        j = int(np.clip(np.searchsorted(cum, s, side="right") - 1, 0, len(z) - 2))
        u = 0.0 if seglen[j] <= 0 else float(np.clip((s - cum[j]) / seglen[j], 0.0, 1.0))
        pts.append(z[j] + u * (z[j + 1] - z[j]))
        seg.append(j)
        frac.append(u)
    return np.array(pts), np.array(seg), np.array(frac)


def random_path_points(z: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uniformly random points (by arc length) on the polyline through ``z``."""
    if n <= 0:
        return np.zeros((0, z.shape[1]))
    seglen = np.linalg.norm(np.diff(z, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seglen)])
    s = rng.uniform(0, cum[-1], size=n)
    j = np.clip(np.searchsorted(cum, s, side="right") - 1, 0, len(z) - 2)
    u = np.where(seglen[j] > 0, (s - cum[j]) / np.where(seglen[j] > 0, seglen[j], 1.0), 0.0)
    return z[j] + u[:, None] * (z[j + 1] - z[j])


# ----------------------------------------------------------------------------- the network

class SeriesNet(torch.nn.Module):
    """``z [B, d] -> (patch motions [B, K, 6], residuals [B, N, 3])``, both zero at start.

    The latent enters as itself plus ``n_fourier`` random Fourier features ``sin/cos(B z)``
    (``B ~ N(0, fourier_scale^2)``, fixed by the seed), so that maps a short latent distance
    apart can get different motions from the first steps."""

    def __init__(self, d: int, n_patches: int, n_atoms: int, hidden: int = 64, n_fourier: int = 16,
                 fourier_scale: float = 4.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freq", torch.randn(d, n_fourier, generator=g) * fourier_scale)
        width = d + 2 * n_fourier
        self.body = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.SiLU(),
                                        torch.nn.Linear(hidden, hidden), torch.nn.SiLU())
        self.patch = torch.nn.Linear(hidden, n_patches * 6)
        self.resid = torch.nn.Linear(hidden, n_atoms * 3)
        for head in (self.patch, self.resid):
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
        self.k, self.n = n_patches, n_atoms

    def features(self, z):
        u = 2.0 * z - 1.0
        a = u @ self.freq.to(z.dtype)
        return torch.cat([u, torch.sin(a), torch.cos(a)], -1)

    def forward(self, z):
        h = self.body(self.features(z))
        return self.patch(h).view(-1, self.k, 6), self.resid(h).view(-1, self.n, 3)


class SeriesModel:
    """The network plus the geometry of the deformation: ``coords(z) -> [B, N, 3]`` Å for
    the moving heavy atoms (patch motions blended per residue, plus residuals)."""

    def __init__(self, topo, move: np.ndarray, d: int, cfg: RefineSeriesConfig, dtype, device):
        self.dt, self.dev = dtype, device
        x0 = topo.coords[move]
        res = topo.res_index[move]
        ures, inv = np.unique(res, return_inverse=True)
        ca = []
        for r in ures:
            idx = move[res == r]
            names = topo.atom_name[idx]
            ca.append(topo.coords[idx[names == "CA"][0]] if (names == "CA").any() else topo.coords[idx].mean(0))
        ca = np.array(ca)
        lab = kmeans_patches(ca, cfg.n_patches, seed=cfg.seed)
        k = int(lab.max()) + 1
        cen = np.array([ca[lab == j].mean(0) for j in range(k)])
        rad = np.array([max(1.0, float(np.sqrt(((x0[lab[inv] == j] - cen[j]) ** 2).sum(1).mean()))) for j in range(k)])
        d2 = ((ca[:, None] - cen[None]) ** 2).sum(-1)
        # Gaussian blending on the distance to the patch centres, relative to the nearest one
        logw = -(d2 - d2.min(1, keepdims=True)) / (2 * cfg.patch_width_A**2)
        w = np.exp(logw)
        w /= w.sum(1, keepdims=True)
        t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype, device=device)  # noqa: E731
        self.x0, self.cen, self.rad = t(x0), t(cen), t(rad)[:, None]
        self.w = t(w[inv])  # [N, K]
        self.n_patches = k
        self.net = SeriesNet(d, k, len(move), cfg.hidden, n_fourier=int(cfg.extra.get("n_fourier", 16)),
                             fourier_scale=float(cfg.extra.get("fourier_scale", 4.0)), seed=cfg.seed).to(
            device=device, dtype=dtype)
        self.motion_scale = float(cfg.extra.get("motion_scale_A", 5.0))
        self.resid_scale = float(cfg.extra.get("residual_scale_A", 1.0))
        self.use_resid = False

    def coords(self, z: torch.Tensor) -> torch.Tensor:
        p, r = self.net(z)
        p = p * self.motion_scale
        R = rotvec_to_rotmat(p[..., :3] / self.rad)  # [B, K, 3, 3]
        rel = self.x0[:, None, :] - self.cen[None]  # [N, K, 3]
        y = torch.einsum("bkij,nkj->bnki", R, rel) + self.cen + p[:, None, :, 3:]  # [B, N, K, 3]
        x = (self.w[None, :, :, None] * y).sum(2)
        if self.use_resid:
            x = x + self.resid_scale * r
        return x
