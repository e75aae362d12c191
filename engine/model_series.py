"""A model series along a conformational trajectory: one network, many maps (Chen 2023).

One small MLP maps a latent coordinate ``z`` to the coordinates of an atomic model. Each map
``i`` of the series has a latent ``z_i`` (1-D by default: the maps' order spread over [0, 1];
or one row per map of any width, e.g. from ``cryogmm hetero analyze``). Training minimises,
over the network's weights,

    L = mean_i [ -S(model(z_i + eps), map_i) ] + w * mean_f E_geometry(model(z_f))

with ``eps`` a small Gaussian noise on the latent (keeps the series continuous), ``S`` a map
similarity of :class:`cryogmm.model_refine.MapTerm` (the same five as ``refine-model``),
``E_geometry`` the :class:`cryogmm.restraints.Restraints` energy per restraint, and ``w``
Chen's automatic weight (map gain / geometry loss over two unconstrained iterations, set at
the start of every phase). The geometry mean runs over the maps' frames and over extra
frames at random points of the latent path, so frames between the maps stay clean.

Model, coarse to fine: the residues are grouped into k-means patches (``n_patches``); the
network outputs one rigid motion per patch (rotation vector in Å at the patch's RMS radius,
translation in Å), blended per residue with Gaussian weights on the distance of its Cα to
the patch centres (so patch boundaries bend instead of tearing), plus per-atom residual
displacements that are switched on in the later phases.

Capture range (``capture``, on by default): a curriculum along the latent path with free
coordinates first. The map that the starting model fits best comes first, then its
neighbours outward; each map is fitted by :func:`cryogmm.model_refine.refine_model` (its
whole pipeline: coarse-to-fine rigid patches on blurred maps, motion domains, residues, full
atom), warm-started from the model of its nearest map already done. The network is then
fitted to these models (``prefit``: mean squared distance at the maps' latents) and trained
on the maps as above (residuals on, full-resolution maps). Without ``capture`` the network
alone is trained in phases on blurred maps (6 Å, then 3 Å extra Gaussian width, map-only
with the patch motions) and the first phase is the same curriculum in the latent: each new
map starts from the network's output at its latent, i.e. from its neighbour's model.

Finally every output frame (``frames`` evenly along the latent path through the maps, by arc
length, and one frame at each map's latent) gets a geometry polish: L-BFGS on the geometry
with a harmonic tether (``polish_anchor_A``) to the network's frame, then a Ramachandran
repair (``rama_repair``: residues left as outliers get a peptide turn where one removes the
outlier, then the tether is released around them and the Rama weight raised; rotamer
outliers set to a mode without new clashes). On the 20 frames of the stored adenylate kinase
series the tethered polish left 1-7 Rama outliers per frame; the repair left none.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryogmm.errors import InputError, MapError, OptionError

__all__ = ["RefineSeriesConfig", "refine_series", "SeriesNet", "latent_path", "read_latent", "GOALS", "demo_series",
           "series_example",
           "passes_goals"]

# the geometry goals of the series proof (issue #6)
GOALS = {"rama_outlier_pct": 0.0, "rotamer_outlier_pct": 1.0, "clashscore": 2.0, "bond_rmsz": 1.0, "angle_rmsz": 1.0}


def passes_goals(fig: dict) -> bool:
    return all(fig.get(k, math.inf) <= v + 1e-9 for k, v in GOALS.items())


@dataclass
class RefineSeriesConfig:
    model: Path
    maps: tuple
    out: Path
    resolution_A: float
    frames: int = 20
    latent: Path | None = None  # text file, one row per map
    similarity: str = "relative-entropy"
    steps: int = 60  # Adam steps per phase (the curriculum gives each new map steps // 3)
    n_patches: int = 24
    patch_width_A: float = 4.0  # Gaussian width of the residue-to-patch blending
    hidden: int = 64
    latent_noise: float = 0.02  # sd of the latent noise, in units of the latent path's extent
    batch_maps: int = 3  # maps per step
    geometry_rounds: int = 1  # random latent points per step scored on geometry only
    geometry_weight: float = 1.0  # multiplies the automatic weight
    lr: float = 3e-3
    polish_iters: int = 40
    capture: bool = True  # per-map refine-model curriculum before the network (see module doc)
    capture_steps: int = 30  # refine-model steps per phase in the capture
    polish_anchor_A: float = 0.3
    references: tuple | None = None  # one model per map: Cα RMSD of each map's frame (benchmarks)
    seed: int = 0
    device: str = "cpu"
    threads: int = 1  # many small tensors: one thread is fastest on a shared CPU
    extra: dict = field(default_factory=dict)


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
        from cryogmm.model_refine import kmeans_patches

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
        from cryogmm.model_refine import _rotvec_to_rotmat

        p, r = self.net(z)
        p = p * self.motion_scale
        R = _rotvec_to_rotmat(p[..., :3] / self.rad)  # [B, K, 3, 3]
        rel = self.x0[:, None, :] - self.cen[None]  # [N, K, 3]
        y = torch.einsum("bkij,nkj->bnki", R, rel) + self.cen + p[:, None, :, 3:]  # [B, N, K, 3]
        x = (self.w[None, :, :, None] * y).sum(2)
        if self.use_resid:
            x = x + self.resid_scale * r
        return x


# ----------------------------------------------------------------------------- training

class _SeriesFit:
    def __init__(self, topo, cfg: RefineSeriesConfig, grids, z: np.ndarray, progress=None):
        from cryogmm.gmm import ELECTRONS
        from cryogmm.jobs import pick_device
        from cryogmm.restraints import Restraints

        self.topo, self.cfg, self.grids, self.progress = topo, cfg, grids, progress
        self.dt = torch.float64
        self.dev = pick_device(cfg.device)
        self.rs = Restraints(topo, dtype=self.dt, device=self.dev)
        self.x_all = torch.as_tensor(topo.coords, dtype=self.dt, device=self.dev)
        self.move = np.nonzero(topo.movable & ~topo.is_h)[0]
        self.move_t = torch.as_tensor(self.move, device=self.dev)
        self.heavy_t = torch.as_tensor(np.nonzero(~topo.is_h)[0], device=self.dev)
        self.amp = torch.as_tensor([ELECTRONS.get(e, 6) for e in topo.element[~topo.is_h]], dtype=self.dt,
                                   device=self.dev)
        self.n_geo = max(1, len(topo.bonds) + len(topo.angles) + len(topo.rama))
        self.z = z
        self.zt = torch.as_tensor(z, dtype=self.dt, device=self.dev)
        self.rng = np.random.default_rng(cfg.seed)
        self.model = SeriesModel(topo, self.move, z.shape[1], cfg, self.dt, self.dev)
        self.pairs = {}
        self.log = []
        self.step_count = 0

    def assemble(self, x_move):
        """All atoms (riding H placed) from the moving heavy atoms ``[N, 3]``."""
        return self.rs.with_h(self.x_all.index_copy(0, self.move_t, x_move))

    def geometry(self, x_full, key=None, refresh=False):
        """Geometry energy per restraint; neighbour pairs cached per ``key`` (a map index),
        rebuilt when ``refresh`` or for random points (``key=None``)."""
        if key is None or refresh or key not in self.pairs:
            self.rs.update_pairs(x_full.detach())
            if key is not None:
                self.pairs[key] = self.rs.pairs
        else:
            self.rs.pairs = self.pairs[key]
        return self.rs.energy(x_full, place_h=False) / self.n_geo

    def mapterms(self, blur):
        from cryogmm.model_refine import MapTerm

        return [MapTerm(g, self.cfg.resolution_A, self.cfg.similarity, self.amp, blur_A=blur, dtype=self.dt,
                        device=self.dev) for g in self.grids]

    def _noisy(self, idx):
        z = self.zt[idx]
        return z + self.cfg.latent_noise * torch.randn(z.shape, dtype=self.dt, device=self.dev)

    def loss(self, idx, mts, w_geo, n_random, noise=True, map_only=False):
        """Mean map loss over maps ``idx`` plus ``w_geo`` x mean geometry (map frames and
        ``n_random`` random path points; none with ``map_only``)."""
        zi = self._noisy(idx) if noise else self.zt[idx]
        n_random = 0 if map_only else n_random
        zr = torch.as_tensor(random_path_points(self.z, n_random, self.rng), dtype=self.dt, device=self.dev)
        zz = torch.cat([zi, zr]) if n_random else zi
        xs = self.model.coords(zz)
        refresh = self.step_count % 10 == 0
        s_sum, g_sum = 0.0, 0.0
        for b in range(len(zz)):
            xf = self.assemble(xs[b])
            if b < len(idx):
                s_sum = s_sum + mts[int(idx[b])].score(xf[self.heavy_t])
                if not map_only:
                    g_sum = g_sum + self.geometry(xf, key=int(idx[b]), refresh=refresh)
            else:
                # neighbour pairs of the nearest map's frame (rebuilding them costs more than the terms)
                near = int(np.argmin(np.linalg.norm(self.z - zr[b - len(idx)].cpu().numpy(), axis=1)))
                g_sum = g_sum + self.geometry(xf, key=near)
        s = s_sum / len(idx)
        g = g_sum / len(zz) if not map_only else torch.zeros((), dtype=self.dt)
        return -s + w_geo * g, s, g

    def auto_weight(self, idx, mts, floor):
        """Chen's rule over the network: map gain / geometry loss of two map-only iterations."""
        params = [p for p in self.model.net.parameters()]
        saved = [p.detach().clone() for p in params]
        opt = torch.optim.Adam(params, lr=self.cfg.lr)
        with torch.no_grad():
            _, s0, _ = self.loss(idx, mts, 0.0, 0, noise=False, map_only=True)
            g0 = self._geo_of(idx)
        for _ in range(2):
            opt.zero_grad()
            loss, _, _ = self.loss(idx, mts, 0.0, 0, noise=False, map_only=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            _, s2, _ = self.loss(idx, mts, 0.0, 0, noise=False, map_only=True)
            g2 = self._geo_of(idx)
            for p, v in zip(params, saved):
                p.copy_(v)
        gain, lossg = float(s2 - s0), g2 - g0
        w = gain / lossg if (gain > 0 and lossg > 1e-12) else 1.0
        return float(np.clip(w, floor, 1e4)) * self.cfg.geometry_weight

    def _geo_of(self, idx):
        xs = self.model.coords(self.zt[idx])
        return float(sum(self.geometry(self.assemble(xs[b]), key=int(idx[b]), refresh=True)
                         for b in range(len(idx))) / len(idx))

    def phase(self, name, mts, steps, include, floor, newest=None, map_only=False, lr_factor=1.0):
        """Adam steps over maps ``include`` (a batch of ``batch_maps`` per step; ``newest``
        always in the batch)."""
        cfg = self.cfg
        include = np.asarray(include)
        w_geo = 0.0 if map_only else self.auto_weight(
            include[: cfg.batch_maps] if newest is None else np.unique(np.r_[newest, include[: cfg.batch_maps - 1]]),
            mts, floor)
        net = self.model.net
        heads = list(net.patch.parameters()) + list(net.resid.parameters())
        lr = cfg.lr * lr_factor
        opt = torch.optim.Adam([{"params": list(net.body.parameters()), "lr": lr},
                                {"params": heads, "lr": lr * float(cfg.extra.get("head_lr_factor", 1.0))}])
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: 0.1 + 0.45 * (1 + math.cos(math.pi * min(i, steps) / steps)))
        for it in range(steps):
            nb = min(cfg.batch_maps, len(include))
            if newest is not None:
                rest = include[include != newest]
                pick = self.rng.choice(rest, size=min(nb - 1, len(rest)), replace=False) if len(rest) else []
                idx = np.r_[newest, pick].astype(np.int64)
            else:
                idx = self.rng.choice(include, size=nb, replace=False).astype(np.int64)
            opt.zero_grad()
            loss, s, g = self.loss(idx, mts, w_geo, cfg.geometry_rounds, map_only=map_only)
            loss.backward()
            opt.step()
            sched.step()
            self.step_count += 1
            if it % 20 == 0 or it == steps - 1:
                self.log.append(dict(phase=name, step=it, maps=[int(i) for i in idx], map=float(s.detach()),
                                     geometry=float(g.detach()), w_geo=w_geo))
            if self.progress is not None:
                self.progress(name, it + 1, steps)
        return w_geo

    def order_maps(self):
        """Curriculum order: the map the start fits best (3 Å blur), then outward along the latent."""
        mts = self.mapterms(3.0)
        with torch.no_grad():
            x0 = self.x_all[self.heavy_t]
            s_start = [float(mt.score(x0)) for mt in mts]
        first = int(np.argmax(s_start))
        self.order = np.argsort(np.linalg.norm(self.z - self.z[first], axis=1), kind="stable")
        self.start_scores = s_start
        return self.order

    def capture(self, work: Path):
        """The curriculum with free coordinates: ``refine_model`` into each map in curriculum
        order, the first from the start, every later one from its nearest (in latent) map
        already done. Returns the models ``[M][atoms, 3]`` (this topology's order)."""
        from cryogmm.model_refine import RefineModelConfig, ca_rmsd, refine_model
        from cryogmm.topology import build_topology, write_model

        cfg = self.cfg
        done = {}
        self.capture_log = []
        start_pdb = work / "start.pdb"
        write_model(self.topo, self.topo.coords, start_pdb)
        for rank, i in enumerate(self.order):
            i = int(i)
            if done:
                src_i = min(done, key=lambda k: float(np.linalg.norm(self.z[k] - self.z[i])))
                src = work / f"capture_{src_i:03d}" / "refined.pdb"
            else:
                src_i, src = None, start_pdb
            # refine-model's whole pipeline (coarse-to-fine rigid patches on blurred maps, motion
            # domains, residues, full atom): a neighbour's model is a warm start, not a guarantee
            # captures keep refine-model's firm polish (one round at the full covalent weight)
            # and one full-atom round: the network learns from them, and interpolated frames
            # inherit their geometry (with the relaxed default polish, an in-between frame of
            # the 1-60 test series left the geometry goals)
            extra = dict(polish_iters=2 * cfg.capture_steps, polish_order="relax", polish_schedule=(1.0,))
            extra.update(cfg.extra.get("capture_extra", {}))
            t0 = time.time()
            rep = refine_model(RefineModelConfig(
                model=src, map=Path(cfg.maps[i]), resolution_A=cfg.resolution_A, out=work / f"capture_{i:03d}",
                stages=cfg.extra.get("capture_stages", ("rigid", "residue", "full")),
                similarity=cfg.similarity, n_patches=cfg.n_patches, steps=cfg.capture_steps, seed=cfg.seed,
                device=cfg.device, threads=cfg.threads, extra=extra))
            xt = build_topology(work / f"capture_{i:03d}" / "refined.pdb").coords
            if xt.shape != self.topo.coords.shape:
                raise RuntimeError(f"capture of map {i}: atom count changed ({xt.shape} vs {self.topo.coords.shape})")
            done[i] = xt
            row = dict(map=i, rank=rank, from_map=src_i, seconds=time.time() - t0,
                       map_cc=rep["after"].get("map_cc_mask"), geometry=_geometry_summary(rep["after"]))
            if cfg.references is not None:
                row["ca_rmsd_to_reference_A"] = ca_rmsd(self.topo, xt, cfg.references[i])
            self.capture_log.append(row)
            if self.progress is not None:
                self.progress("capture", rank + 1, len(self.order))
        return [done[i] for i in range(len(self.grids))]

    def prefit(self, targets, steps: int = 300):
        """Fit the network to the captured models (mean squared distance of the moving atoms
        at the maps' latents), patches and residuals together."""
        tgt = torch.stack([torch.as_tensor(t, dtype=self.dt, device=self.dev)[self.move_t] for t in targets])
        self.model.use_resid = True
        opt = torch.optim.Adam(self.model.net.parameters(), lr=self.cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: 0.1 + 0.45 * (1 + math.cos(math.pi * min(i, steps) / steps)))
        for it in range(steps):
            opt.zero_grad()
            d2 = ((self.model.coords(self.zt) - tgt) ** 2).sum(-1).mean()
            d2.backward()
            opt.step()
            sched.step()
            if it % 50 == 0 or it == steps - 1:
                self.log.append(dict(phase="prefit", step=it, rms_to_captured_A=float(d2.detach().sqrt())))
            if self.progress is not None:
                self.progress("prefit", it + 1, steps)

    def train(self, work: Path | None = None):
        cfg = self.cfg
        n = cfg.steps
        m = len(self.grids)
        order = self.order_maps()
        if cfg.capture:
            self.prefit(self.capture(work), steps=int(cfg.extra.get("prefit_steps", 300)))
            phases = cfg.extra.get("phases", ((0.0, True),))
        else:
            phases = cfg.extra.get("phases", ((6.0, False), (3.0, False), (0.0, True)))
        for pi, (blur, resid) in enumerate(phases):
            self.model.use_resid = bool(resid)
            mts = self.mapterms(blur)
            # patch phases are map-only (each residue moves nearly rigidly, as refine-model's
            # rigid stage, where Chen's weight sits at its floor); the geometry enters with the residuals
            map_only = not resid
            if pi == 0 and m > 1 and not cfg.capture:
                for j in range(m):
                    self.phase(f"curriculum{j + 1}_blur{blur:g}", mts, max(5, n // 3), order[: j + 1], 0.05,
                               newest=order[j], map_only=map_only)
            if cfg.capture:
                # after the prefit the network already holds refined models: small steps, and the
                # geometry weighted at least as the map (at Chen's floor the shared weights tear it)
                self.phase(f"finetune{pi + 1}_blur{blur:g}", mts, n, order, float(cfg.extra.get("finetune_min_weight", 1.0)),
                           lr_factor=float(cfg.extra.get("finetune_lr_factor", 0.1)))
            else:
                self.phase(f"phase{pi + 1}_blur{blur:g}" + ("_residual" if resid else ""), mts, n, order, 0.05,
                           map_only=map_only)

    @torch.no_grad()
    def frame(self, zrow) -> np.ndarray:
        z = torch.as_tensor(np.asarray(zrow)[None], dtype=self.dt, device=self.dev)
        return self.assemble(self.model.coords(z)[0]).detach()

    def polish(self, x_full: torch.Tensor) -> torch.Tensor:
        """L-BFGS on the geometry with a harmonic tether (``polish_anchor_A``) to ``x_full``."""
        cfg = self.cfg
        if cfg.polish_iters <= 0:
            return x_full
        from cryogmm.model_refine import lbfgs_relax

        a = cfg.polish_anchor_A

        def loss_fn(x, delta):
            return (self.rs.energy(x, place_h=False) + 0.5 * ((delta / a) ** 2).sum()) / self.n_geo

        y = lbfgs_relax(self.rs, self.assemble, x_full[self.move_t].clone(), loss_fn, cfg.polish_iters)[0]
        if cfg.extra.get("rama_repair", True):
            y = self.rama_repair(y)
        return y

    def rama_repair(self, x_full: torch.Tensor, rounds: int = 3, window: int = 2, rama_factor: float = 10.0,
                    rotamers: bool = True):
        """Residues the tethered polish leaves as Ramachandran outliers: a peptide turn that
        removes the outlier (``model_rotamers.flip_for_rama``), then L-BFGS with the tether
        released on them and ``window`` residues either side and the Rama weight x
        ``rama_factor``; up to ``rounds`` times (``model_refine.rama_repair``). Then, with
        ``rotamers``, rotamer outliers go to the nearest allowed conformation without new
        clashes (``rebuild_rotamers``). On the stored frames of the adenylate kinase series
        (10 maps, 20 frames) the tethered polish alone left 1-7 Rama outliers per frame."""
        from cryogmm.model_refine import rama_repair

        x_full = rama_repair(self.rs, self.assemble, x_full, self.move_t, self.n_geo, self.cfg.polish_anchor_A,
                             iters=max(self.cfg.polish_iters, 100), rounds=rounds, window=window, rama_factor=rama_factor)
        if rotamers:
            from types import SimpleNamespace

            from cryogmm.model_rotamers import rebuild_rotamers

            rf = SimpleNamespace(topo=self.topo, rs=self.rs, x_all=x_full, on_coords=None, log=[])
            rebuild_rotamers(rf)
            x_full = rf.x_all
        return x_full


# ----------------------------------------------------------------------------- the job

def _check_inputs(cfg: RefineSeriesConfig):
    from cryogmm.model_refine import SIMILARITIES

    if cfg.similarity not in SIMILARITIES:
        raise OptionError("--similarity", f"unknown {cfg.similarity!r}; expected one of {', '.join(SIMILARITIES)}")
    if len(cfg.maps) < 2:
        raise OptionError("--maps", f"needs at least 2 maps for a series, got {len(cfg.maps)}")
    if cfg.resolution_A is None or not cfg.resolution_A > 0:
        raise OptionError("--resolution", f"must be a positive resolution in Å, got {cfg.resolution_A}")
    if cfg.frames < 2:
        raise OptionError("--frames", f"must be >= 2, got {cfg.frames}")
    if cfg.steps < 1:
        raise OptionError("--steps", f"must be >= 1, got {cfg.steps}")
    if cfg.references is not None and len(cfg.references) != len(cfg.maps):
        raise OptionError("--references", f"{len(cfg.references)} models for {len(cfg.maps)} maps; give one per map")
    for p in cfg.maps:
        if not Path(p).is_file():
            raise MapError(p, "does not exist")


def _read_grids(cfg: RefineSeriesConfig, topo):
    from cryogmm.model_density import read_map_grid
    from cryogmm.validate import _check_overlap

    grids = [read_map_grid(p) for p in cfg.maps]
    g0 = grids[0]
    for p, g in zip(cfg.maps, grids):
        if g.shape != g0.shape or abs(g.apix - g0.apix) > 1e-4 or np.abs(g.origin_A - g0.origin_A).max() > 1e-3:
            raise MapError(p, f"has box {tuple(g.shape)} at {g.apix:g} Å/px, origin {np.round(g.origin_A, 2).tolist()} Å, "
                              f"but {cfg.maps[0]} has {tuple(g0.shape)} at {g0.apix:g} Å/px, origin "
                              f"{np.round(g0.origin_A, 2).tolist()} Å; the maps of a series must share box and sampling")
        _check_overlap(topo, g, p)
    if cfg.resolution_A < 2 * g0.apix - 1e-6:
        raise OptionError("--resolution", f"{cfg.resolution_A:g} Å is finer than Nyquist of the maps ({2 * g0.apix:g} Å)")
    return grids


def _geometry_summary(fig: dict) -> dict:
    keys = ("bond_rmsz", "angle_rmsz", "bond_outliers", "angle_outliers", "rama_favoured_pct", "rama_outlier_pct",
            "rotamer_outlier_pct", "clashscore", "cbeta_deviations", "chiral_outliers", "plane_rms_A")
    out = {k: fig[k] for k in keys if k in fig}
    out["passes_goals"] = passes_goals(fig)
    return out


def _map_fit(topo, coords, grid, res) -> dict:
    from cryogmm.validate import map_figures

    mf = map_figures(topo, coords, grid, res)
    return {k: v for k, v in mf.items() if k != "qscore_per_residue"}


class _HeavyView:
    """The heavy atoms of a topology as :func:`cryogmm.gmm.write_models` reads a model."""

    def __init__(self, topo):
        h = ~topo.is_h
        self.atom_name, self.res_name, self.chain = topo.atom_name[h], topo.res_name[h], topo.chain[h]
        self.seq_id, self.element = topo.seq_id[h], topo.element[h]


def refine_series(cfg: RefineSeriesConfig, progress=None) -> dict:
    """Fit one latent-to-model network to the maps ``cfg.maps``; write ``series.pdb``
    (``cfg.frames`` models evenly along the latent path), ``frame_XX.pdb``, ``map_XX.pdb``
    (the frame at each map's latent), ``network.pt`` and ``report.json`` into ``cfg.out``.
    Returns the report."""
    from cryogmm.bridge.fileio import OutputDir
    from cryogmm.gmm import write_models
    from cryogmm.jobs import write_report
    from cryogmm.model_refine import ca_rmsd
    from cryogmm.restraints import Restraints
    from cryogmm.topology import build_topology, write_model
    from cryogmm.validate import validate_coords

    t0 = time.time()
    _check_inputs(cfg)
    topo = build_topology(cfg.model)
    grids = _read_grids(cfg, topo)
    m = len(grids)
    if cfg.latent is not None:
        z_raw = read_latent(cfg.latent, m)
    else:
        z_raw = np.linspace(0.0, 1.0, m)[:, None]
    z = normalise_latent(z_raw)
    if cfg.references is not None:
        for p in cfg.references:
            if not Path(p).is_file():
                raise InputError(p, "does not exist")
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))

    fit = _SeriesFit(topo, cfg, grids, z, progress)
    t_train = time.time()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cryogmm-series-") as work:
        fit.train(Path(work))
    t_train = time.time() - t_train

    val = Restraints(topo)
    t_pol = time.time()
    # frames at the maps' latents and evenly along the path
    pts, seg, frac = latent_path(z, cfg.frames)
    raw_maps = [fit.frame(z[i]) for i in range(m)]
    raw_frames = [fit.frame(p) for p in pts]
    map_frames = [fit.polish(x).cpu().numpy() for x in raw_maps]
    frames = [fit.polish(x).cpu().numpy() for x in raw_frames]
    t_pol = time.time() - t_pol

    t_val = time.time()
    per_map = []
    for i in range(m):
        row = {"map": str(cfg.maps[i]), "latent": z_raw[i].tolist(), "latent_normalised": z[i].tolist(),
               "curriculum_rank": int(np.nonzero(fit.order == i)[0][0])}
        row["start"] = _map_fit(topo, topo.coords, grids[i], cfg.resolution_A)
        row["frame"] = _map_fit(topo, map_frames[i], grids[i], cfg.resolution_A)
        row["frame_geometry"] = _geometry_summary(validate_coords(topo, map_frames[i], val))
        row["network_geometry"] = _geometry_summary(validate_coords(topo, raw_maps[i].cpu().numpy(), val))
        if cfg.references is not None:
            row["start_ca_rmsd_to_reference_A"] = ca_rmsd(topo, topo.coords, cfg.references[i])
            row["ca_rmsd_to_reference_A"] = ca_rmsd(topo, map_frames[i], cfg.references[i])
            row["network_ca_rmsd_to_reference_A"] = ca_rmsd(topo, raw_maps[i].cpu().numpy(), cfg.references[i])
        per_map.append(row)
    per_frame = []
    for f in range(cfg.frames):
        j = int(seg[f])
        row = {"frame": f + 1, "latent_normalised": pts[f].tolist(), "between_maps": [j, j + 1],
               "fraction": float(frac[f])}
        row.update(_geometry_summary(validate_coords(topo, frames[f], val)))
        row["network_geometry"] = _geometry_summary(validate_coords(topo, raw_frames[f].cpu().numpy(), val))
        row["map_cc_neighbours"] = [_map_fit(topo, frames[f], grids[k], cfg.resolution_A)["map_cc_mask"]
                                    for k in (j, j + 1)]
        per_frame.append(row)
    t_val = time.time() - t_val
    mv = topo.movable & ~topo.is_h
    steps_between = [float(np.sqrt(((frames[f + 1][mv] - frames[f][mv]) ** 2).sum(1).mean()))
                     for f in range(cfg.frames - 1)]

    heavy = ~topo.is_h
    with OutputDir(cfg.out) as d:
        write_models(d.path("series.pdb"), _HeavyView(topo), np.stack([f[heavy] for f in frames]))
        for f, x in enumerate(frames):
            write_model(topo, x, d.path(f"frame_{f + 1:02d}.pdb"))
        for i, x in enumerate(map_frames):
            write_model(topo, x, d.path(f"map_{i + 1:02d}.pdb"))
        torch.save({"state_dict": fit.model.net.state_dict(), "latent": z_raw, "latent_normalised": z,
                    "n_patches": fit.model.n_patches, "hidden": cfg.hidden}, d.path("network.pt"))
        rep = {
            "model": str(cfg.model), "maps": [str(p) for p in cfg.maps], "resolution_A": cfg.resolution_A,
            "similarity": cfg.similarity, "latent": None if cfg.latent is None else str(cfg.latent),
            "latent_dim": int(z.shape[1]), "frames": cfg.frames, "steps_per_phase": cfg.steps,
            "n_patches": fit.model.n_patches, "latent_noise": cfg.latent_noise, "geometry_rounds": cfg.geometry_rounds,
            "goals": GOALS, "curriculum_order": [int(i) for i in fit.order],
            "all_frames_pass_goals": all(r["passes_goals"] for r in per_frame),
            "all_map_frames_pass_goals": all(r["frame_geometry"]["passes_goals"] for r in per_map),
            "capture": getattr(fit, "capture_log", None), "per_map": per_map, "per_frame": per_frame, "rms_step_between_frames_A": steps_between,
            "fixed_residues": topo.fixed_residues, "warnings": topo.warnings, "log": fit.log,
            "seconds": {"train": t_train, "polish": t_pol, "validate": t_val, "total": time.time() - t0},
            "seed": cfg.seed,
        }
        rep = write_report(d.path("report.json"), rep)
    return rep


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

    from cryogmm.gmm import ELECTRONS, sigma_from_resolution
    from cryogmm.mapio import write_map
    from cryogmm.metrics import lowpass
    from cryogmm.model_density import splat
    from cryogmm.topology import build_topology, write_model

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
    amp = torch.tensor([ELECTRONS.get(e, 6) for e in a.element], dtype=torch.float64)
    rng = np.random.default_rng(seed)
    start_path = out / "start.pdb"
    write_model(a, xb if start == "closed" else xa, start_path)
    maps, truth_paths = [], []
    for k, x in enumerate(truths):
        tp = out / f"truth_{k + 1:02d}.pdb"
        write_model(a, x, tp)
        mm = splat(torch.as_tensor(x), amp, sigma_from_resolution(resolution_A), (n, n, n), apix, lo)
        noisy = mm + torch.as_tensor(rng.normal(scale=noise * float(mm.std()), size=mm.shape))
        noisy = lowpass(noisy, resolution_A, apix)
        mp = out / f"map_{k + 1:02d}.mrc"
        write_map(mp, noisy.numpy().astype(np.float32), apix, origin_A=lo)
        maps.append(mp)
        truth_paths.append(tp)
    for p in paths.values():
        p.unlink()
    return {"start": start_path, "maps": maps, "truths": truth_paths, "t": ts.tolist(), "box": n, "apix": apix}


def demo_series(out_dir, seed: int = 0, progress=None) -> dict:
    """A short model series for ``cryogmm demo`` (about 45 s of CPU time on one thread):
    adenylate kinase residues 1-60 from closed to open, 3 maps at 4.5 Å (2 Å/px), 4 frames.
    The configuration of ``tests/test_model_series.py::test_series_recovers_known_motion``.
    Returns per map the Cα RMSD of the start and of the map's frame to the truth, whether
    every frame meets the geometry goals, seconds and the output folder."""
    out = Path(out_dir)
    ex = series_example(out / "data", n_maps=3, residues=(1, 60), apix=2.0, resolution_A=4.5, noise=0.2, seed=seed)
    rep = refine_series(RefineSeriesConfig(model=ex["start"], maps=tuple(ex["maps"]), out=out / "series",
                                           resolution_A=4.5, frames=4, steps=10, capture_steps=30, polish_iters=40,
                                           n_patches=8, references=tuple(ex["truths"]), seed=seed), progress=progress)
    return {"ca_rmsd_start_A": [m["start_ca_rmsd_to_reference_A"] for m in rep["per_map"]],
            "ca_rmsd_frame_A": [m["ca_rmsd_to_reference_A"] for m in rep["per_map"]],
            "all_frames_pass_goals": rep["all_frames_pass_goals"], "seconds": rep["seconds"]["total"],
            "out": str(out / "series")}
