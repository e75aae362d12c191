"""Fitting the series network: the capture curriculum along the latent, training on all maps with
latent noise, geometry rounds at random latent points, and the per-frame polish."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from cryogmm.core.gaussians import ELECTRONS
from cryogmm.model.refine.config import RefineModelConfig
from cryogmm.model.refine.job import checked_config, refine_coords, write_outputs
from cryogmm.model.refine.mapterm import MapTerm
from cryogmm.model.refine.polish import rama_repair
from cryogmm.model.refine.refiner import json_default
from cryogmm.model.refine.relax import lbfgs_relax
from cryogmm.model.restraints import Restraints
from cryogmm.model.rotamers import rebuild_rotamers
from cryogmm.model.series.config import RefineSeriesConfig, geometry_summary
from cryogmm.model.series.net import SeriesModel, random_path_points
from cryogmm.model.topology import build_topology, write_model
from cryogmm.model.validate import ca_rmsd
from cryogmm.runtime import pick_device

# ----------------------------------------------------------------------------- training


class SeriesFit:
    def __init__(self, topo, cfg: RefineSeriesConfig, grids, z: np.ndarray, progress=None):
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
        # checkpoints: the work is a sequence of units (each captured model, the prefit, each
        # training phase, each polished frame); ``save(units_done)`` is called after each one,
        # and a resumed fit skips the first ``skip`` units, their effects loaded by ``load_state``
        self.units, self.skip, self.save = 0, 0, None
        self.done, self.capture_pdb, self.capture_log, self.polished = {}, {}, [], []

    def _unit(self, work) -> bool:
        """Run ``work()`` as the next unit unless a resumed fit has it done; checkpoint after it.
        Returns whether it ran."""
        k = self.units
        self.units += 1
        if k < self.skip:
            return False
        work()
        if self.save is not None:
            self.save(self.units)
        return True

    def state(self) -> dict:
        """What a resumed fit needs to continue bit for bit (tensors and JSON; see ``_unit``)."""
        return {"net": self.model.net.state_dict(), "use_resid": bool(self.model.use_resid),
                "series_rng": json.dumps(self.rng.bit_generator.state), "step_count": int(self.step_count),
                "log": json.dumps(self.log, default=json_default),
                "capture_log": json.dumps(self.capture_log, default=json_default),
                "done": {str(i): torch.as_tensor(x) for i, x in self.done.items()},
                "capture_pdb": {str(i): t for i, t in self.capture_pdb.items()},
                "pairs": {str(k): v.detach().cpu() for k, v in self.pairs.items()},
                "rs_pairs": self.rs.pairs.detach().cpu(), "h_coef": self.rs.h_coef.detach().cpu(),
                "polished": [x.detach().cpu() for x in self.polished]}

    def load_state(self, st: dict, units_done: int):
        self.model.net.load_state_dict(st["net"])
        self.model.use_resid = bool(st["use_resid"])
        self.rng.bit_generator.state = json.loads(st["series_rng"])
        self.step_count = int(st["step_count"])
        self.log = json.loads(st["log"])
        self.capture_log = json.loads(st["capture_log"])
        self.done = {int(i): x.numpy() for i, x in st["done"].items()}
        self.capture_pdb = {int(i): t for i, t in st["capture_pdb"].items()}
        self.pairs = {int(k): v.to(self.dev) for k, v in st["pairs"].items()}
        self.rs.pairs = st["rs_pairs"].to(self.dev)
        self.rs.h_coef = st["h_coef"].to(self.dev, self.dt)
        self.polished = [x.to(self.dev, self.dt) for x in st["polished"]]
        self.skip = int(units_done)

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

        done = self.done
        start_pdb = work / "start.pdb"
        write_model(self.topo, self.topo.coords, start_pdb)
        for i, text in self.capture_pdb.items():  # captures of a resumed fit: their models as written
            (work / f"capture_{i:03d}").mkdir(parents=True, exist_ok=True)
            (work / f"capture_{i:03d}" / "refined.pdb").write_text(text)
        for rank, i in enumerate(self.order):
            self._unit(lambda: self._capture_one(work, rank, int(i), start_pdb))
            if self.progress is not None:
                self.progress("capture", rank + 1, len(self.order))
        return [done[i] for i in range(len(self.grids))]

    def _capture_one(self, work: Path, rank: int, i: int, start_pdb: Path):
        """``refine_model`` into map ``i`` (``rank``-th in the curriculum), from its nearest map
        already done (the first from the start)."""
        cfg, done = self.cfg, self.done
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
        # the map in memory (the grids the series was given); the model through its PDB file,
        # as refine-model reads one
        ccfg = checked_config(RefineModelConfig(
            model=src, map=Path(cfg.maps[i]), resolution_A=cfg.resolution_A, out=work / f"capture_{i:03d}",
            stages=cfg.extra.get("capture_stages", ("rigid", "residue", "full")),
            similarity=cfg.similarity, n_patches=cfg.n_patches, steps=cfg.capture_steps, seed=cfg.seed,
            device=cfg.device, threads=cfg.threads, restraints=cfg.restraints, extra=extra))
        src_topo = build_topology(src, dictionaries=cfg.restraints)
        rep = write_outputs(src_topo, refine_coords(src_topo, self.grids[i], ccfg, measure_after=False), ccfg,
                            grid=self.grids[i])
        refined = work / f"capture_{i:03d}" / "refined.pdb"
        xt = build_topology(refined, dictionaries=cfg.restraints).coords
        if xt.shape != self.topo.coords.shape:
            raise RuntimeError(f"capture of map {i}: atom count changed ({xt.shape} vs {self.topo.coords.shape})")
        done[i] = xt
        self.capture_pdb[i] = refined.read_text()
        row = dict(map=i, rank=rank, from_map=src_i, seconds=time.time() - t0,
                   map_cc=rep["after"].get("map_cc_mask"), geometry=geometry_summary(rep["after"]))
        if cfg.references is not None:
            row["ca_rmsd_to_reference_A"] = ca_rmsd(self.topo, xt, cfg.references[i])
        self.capture_log.append(row)

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
            targets = self.capture(work)
            self._unit(lambda: self.prefit(targets, steps=int(cfg.extra.get("prefit_steps", 300))))
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
                    self._unit(lambda: self.phase(f"curriculum{j + 1}_blur{blur:g}", mts, max(5, n // 3),
                                                  order[: j + 1], 0.05, newest=order[j], map_only=map_only))
            if cfg.capture:
                # after the prefit the network already holds refined models: small steps, and the
                # geometry weighted at least as the map (at Chen's floor the shared weights tear it)
                self._unit(lambda: self.phase(
                    f"finetune{pi + 1}_blur{blur:g}", mts, n, order, float(cfg.extra.get("finetune_min_weight", 1.0)),
                    lr_factor=float(cfg.extra.get("finetune_lr_factor", 0.1))))
            else:
                self._unit(lambda: self.phase(f"phase{pi + 1}_blur{blur:g}" + ("_residual" if resid else ""), mts, n,
                                              order, 0.05, map_only=map_only))

    @torch.no_grad()
    def frame(self, zrow) -> np.ndarray:
        z = torch.as_tensor(np.asarray(zrow)[None], dtype=self.dt, device=self.dev)
        return self.assemble(self.model.coords(z)[0]).detach()

    def polish_all(self, xs: list) -> list:
        """:meth:`polish` of each frame of ``xs`` in turn, one checkpoint unit per frame."""
        for x in xs:
            self._unit(lambda: self.polished.append(self.polish(x)))
        return list(self.polished)

    def polish(self, x_full: torch.Tensor) -> torch.Tensor:
        """L-BFGS on the geometry with a harmonic tether (``polish_anchor_A``) to ``x_full``."""
        cfg = self.cfg
        if cfg.polish_iters <= 0:
            return x_full

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

        x_full = rama_repair(self.rs, self.assemble, x_full, self.move_t, self.n_geo, self.cfg.polish_anchor_A,
                             iters=max(self.cfg.polish_iters, 100), rounds=rounds, window=window, rama_factor=rama_factor)
        if rotamers:
            from types import SimpleNamespace

            rf = SimpleNamespace(topo=self.topo, rs=self.rs, x_all=x_full, on_coords=None, log=[])
            rebuild_rotamers(rf)
            x_full = rf.x_all
        return x_full
