"""The refiner: the state of one model refinement (coordinates, parameterisations of each
stage, restraints, map terms) and its optimisation steps."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import torch

from cryogmm.core.gaussians import ELECTRONS
from cryogmm.core.kmeans import kmeans_patches
from cryogmm.core.rotations import rotvec_to_rotmat
from cryogmm.model.refine.config import RefineModelConfig
from cryogmm.model.refine.relax import lbfgs_relax
from cryogmm.model.restraints import Restraints
from cryogmm.model.topology import Topology, read_structure
from cryogmm.runtime import pick_device

# ----------------------------------------------------------------------------- the refinement


class Refiner:
    def __init__(self, topo: Topology, cfg: RefineModelConfig, grid=None, progress=None, on_coords=None):
        self.topo, self.cfg, self.grid, self.progress = topo, cfg, grid, progress
        self.t0 = time.time()  # log rows carry t_s, seconds since the refiner was made
        self.on_coords = on_coords
        self.dt = torch.float64

        self.dev = pick_device(cfg.device)
        self.rs = Restraints(topo, dtype=self.dt, device=self.dev, weights=cfg.extra.get("restraint_weights"))
        self.x_all = torch.as_tensor(topo.coords, dtype=self.dt, device=self.dev)
        self.move = np.nonzero(topo.movable & ~topo.is_h)[0]
        self.heavy = np.nonzero(~topo.is_h)[0]
        self.move_t = torch.as_tensor(self.move, device=self.dev)
        self.heavy_t = torch.as_tensor(self.heavy, device=self.dev)
        self.amp = torch.as_tensor([ELECTRONS.get(e, 6) for e in topo.element[self.heavy]], dtype=self.dt,
                                   device=self.dev)
        self.start = self.x_all.clone()
        self.trajectory = [topo.coords.copy()]
        self.log = []
        self.n_geo = max(1, len(topo.bonds) + len(topo.angles) + len(topo.rama))
        self.rs.update_pairs(self.rs.with_h(self.x_all))
        anchor = cfg.anchor_sigma_A
        if anchor is None and (cfg.geometry_only or grid is None):
            anchor = 0.15
        self.anchor = anchor
        self.map_k = 1.0
        self.ref_ca = None
        if cfg.reference is not None:

            st = read_structure(cfg.reference)
            ref = {(ch.name, r.seqid.num): r.find_atom("CA", "*") for ch in st[0] for r in ch}
            idx, pos = [], []
            for i in np.nonzero((topo.atom_name == "CA") & topo.movable)[0]:
                a = ref.get((str(topo.chain[i]), int(topo.seq_id[i])))
                if a is not None:
                    idx.append(i); pos.append((a.pos.x, a.pos.y, a.pos.z))
            if idx:
                self.ref_ca = (torch.as_tensor(idx, device=self.dev), torch.as_tensor(pos, dtype=self.dt, device=self.dev))

    def ref_rmsd(self, x):
        i, p = self.ref_ca
        return float(((x[i] - p) ** 2).sum(-1).mean().sqrt())

    # coordinates of all atoms from the moving heavy atoms
    def assemble(self, x_move):
        x = self.x_all.index_copy(0, self.move_t, x_move)
        return self.rs.with_h(x)

    def geometry(self, x_full):
        tot = self.rs.energy(x_full, place_h=False)
        if self.anchor:
            d = x_full[self.move_t] - self.start[self.move_t]
            tot = tot + 0.5 * ((d / self.anchor) ** 2).sum()
        return tot / self.n_geo

    def step_loss(self, params, fn, mapterm, w_geo):
        """The objective of one Adam step: ``w_geo x geometry - map_k x map score`` of the model
        ``fn(params)`` (the moving heavy atoms). Returns (loss, geometry, map score or None, all atoms)."""
        x = self.assemble(fn(params))
        geo = self.geometry(x)
        loss = w_geo * geo
        s = None
        if mapterm is not None:
            s = mapterm.score(x[self.heavy_t])
            loss = loss - self.map_k * s
        return loss, geo, s, x

    def run_phase(self, name, params, fn, steps, lr, mapterm, w_geo=None, adapt=False, floor=0.05):
        """Adam on ``params``; ``fn(params) -> x_move``. Returns the final geometry weight."""
        opt = torch.optim.Adam(params, lr=lr)
        # cosine decay to 10 %: large early moves, then settling without Adam's ±lr jitter
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.1 + 0.45 * (1 + math.cos(math.pi * min(i, steps) / steps)))
        if mapterm is not None and w_geo is None:
            w_geo = self.auto_weight(params, fn, lr, mapterm, floor=floor)
        w_geo = 1.0 if w_geo is None else w_geo
        smooth, prev = None, None
        alpha = 0.05
        with torch.no_grad():  # conformation-dependent targets at this phase's start
            self.rs.refresh_targets(self.assemble(fn(params)))
        for it in range(steps):
            if it % 10 == 0:
                with torch.no_grad():
                    self.rs.update_pairs(self.assemble(fn(params)))
            opt.zero_grad()
            loss, geo, s, x = self.step_loss(params, fn, mapterm, w_geo)
            loss.backward()
            opt.step()
            sched.step()
            if s is not None and adapt:
                sv = float(s.detach())
                smooth = sv if smooth is None else 0.8 * smooth + 0.2 * sv
                if prev is not None:
                    self.map_k *= (1 / (1 + alpha)) if smooth > prev else (1 + 2 * alpha)
                    self.map_k = float(min(max(self.map_k, 0.1), 10.0))
                prev = smooth
            if (it + 1) % self.cfg.trajectory_every == 0 or it == steps - 1:
                self.trajectory.append(x.detach().cpu().numpy().copy())
                if self.on_coords is not None:
                    self.on_coords(self.trajectory[-1])
            if it == steps - 1 or it % 25 == 0:
                row = dict(phase=name, step=it, geometry=float(geo.detach()), map=None if s is None else float(s.detach()),
                           w_geo=float(w_geo), map_k=self.map_k, t_s=round(time.time() - self.t0, 2))
                if self.ref_ca is not None:
                    row["ca_rmsd_to_reference_A"] = self.ref_rmsd(x.detach())
                self.log.append(row)
            if self.progress is not None:
                self.progress(name, it + 1, steps)
        with torch.no_grad():
            self.x_all = self.assemble(fn(params)).detach()
        return w_geo

    def lbfgs_phase(self, name, mapterm, w_geo, iters):
        """Full-atom L-BFGS (strong Wolfe line search) on map + weighted geometry: converges
        the stereochemistry far faster than Adam once the model is in place."""

        def loss_fn(x, delta):
            loss = w_geo * self.geometry(x)
            if mapterm is not None:
                loss = loss - mapterm.score(x[self.heavy_t])
            return loss

        def after_round(xx):
            self.trajectory.append(xx.cpu().numpy().copy())
            if self.on_coords is not None:
                self.on_coords(self.trajectory[-1])

        progress = None if self.progress is None else (lambda k: self.progress(name, min(k, iters), iters))
        self.x_all, n_eval = lbfgs_relax(self.rs, self.assemble, self.x_all[self.move_t].detach().clone(), loss_fn,
                                         iters, progress=progress, after_round=after_round)
        with torch.no_grad():
            geo = float(self.geometry(self.x_all))
            s = None if mapterm is None else float(mapterm.score(self.x_all[self.heavy_t]))
        row = dict(phase=name, evaluations=n_eval, geometry=geo, map=s, w_geo=float(w_geo), t_s=round(time.time() - self.t0, 2))
        if self.ref_ca is not None:
            row["ca_rmsd_to_reference_A"] = self.ref_rmsd(self.x_all)
        self.log.append(row)

    def auto_weight(self, params, fn, lr, mapterm, floor=0.05):
        """Chen's rule: map gain / geometry loss over two map-only iterations (params restored)."""
        saved = [p.detach().clone() for p in params]
        opt = torch.optim.Adam(params, lr=lr)
        with torch.no_grad():
            x0 = self.assemble(fn(params))
            s0, g0 = float(mapterm.score(x0[self.heavy_t])), float(self.geometry(x0))
        for _ in range(2):
            opt.zero_grad()
            x = self.assemble(fn(params))
            (-mapterm.score(x[self.heavy_t])).backward()
            opt.step()
        with torch.no_grad():
            x2 = self.assemble(fn(params))
            s2, g2 = float(mapterm.score(x2[self.heavy_t])), float(self.geometry(x2))
            for p, v in zip(params, saved):
                p.copy_(v)
        gain, loss = s2 - s0, g2 - g0
        w = gain / loss if (gain > 0 and loss > 1e-12) else 1.0
        # floor: the map may stretch geometry between patches but not tear it
        return float(np.clip(w, floor, 1e4)) * self.cfg.geometry_weight

    # ---- stages
    def rigid_bodies(self, labels, name, steps, mapterm, lr_t=0.2, floor=0.05):
        """Move groups of moving atoms (``labels`` per moving atom) as rigid bodies."""
        opt_params, fn, skip = self.rigid_parameters(labels)
        with self.rs.weights_set(**skip):
            # rotation and translation live on different scales: scale rv so one lr fits both
            self.run_phase(name, opt_params, fn, steps, lr_t, mapterm, floor=floor)
        return self

    def rigid_parameters(self, labels):
        """The rigid-body parameterisation of groups of moving atoms (``labels`` per moving
        atom): parameters ``[rotation vectors, translations]`` (zero), ``fn(params) -> x_move``,
        and the restraint weights to zero while it runs."""
        lab = torch.as_tensor(labels, device=self.dev)
        k = int(labels.max()) + 1
        x0 = self.x_all[self.move_t].detach()
        cnt = torch.bincount(lab, minlength=k).to(self.dt)[:, None]
        cen = torch.zeros(k, 3, dtype=self.dt, device=self.dev).index_add(0, lab, x0) / cnt
        # rotations are parameterised in Å at the patch's RMS radius, so one step size fits both
        rad = torch.sqrt(torch.zeros(k, dtype=self.dt, device=self.dev).index_add(
            0, lab, ((x0 - cen[lab]) ** 2).sum(-1)) / cnt[:, 0]).clamp(min=1.0)[:, None]
        rv = torch.zeros(k, 3, dtype=self.dt, device=self.dev, requires_grad=True)
        tr = torch.zeros(k, 3, dtype=self.dt, device=self.dev, requires_grad=True)

        def fn(ps):
            R = rotvec_to_rotmat(ps[0] / rad)[lab]
            return torch.einsum("nij,nj->ni", R, x0 - cen[lab]) + cen[lab] + ps[1][lab]

        opt_params = [rv, tr]
        # rotamer and chirality terms lie inside residues: when every residue moves as one
        # body they are constant, and skipping them makes a step ~1.5x cheaper (the logged
        # geometry then leaves them out)
        res = self.topo.res_index[self.move]
        whole = len(np.unique(res.astype(np.int64) * (k + 1) + labels)) == len(np.unique(res))
        return opt_params, fn, (dict(rotamer=0.0, chiral=0.0) if whole else {})

    def residue_labels(self):
        return self.topo.res_index[self.move]

    def patch_labels(self, k):
        topo = self.topo
        res = self.residue_labels()
        ures, counts = np.unique(res, return_counts=True)
        # each residue's moving atoms in topology order (one stable sort, not a scan per residue)
        groups = np.split(self.move[np.argsort(res, kind="stable")], np.cumsum(counts)[:-1])
        ca = []
        for idx in groups:
            names = topo.atom_name[idx]
            ca.append(topo.coords[idx[names == "CA"][0]] if (names == "CA").any() else topo.coords[idx].mean(0))
        pl = kmeans_patches(np.array(ca), k, seed=self.cfg.seed)
        return np.asarray(pl)[np.searchsorted(ures, res)]

    def full_atom(self, name, steps, mapterm, lr=0.02, w_geo=None):
        x0 = self.x_all[self.move_t].detach().clone()
        delta = torch.zeros_like(x0, requires_grad=True)
        if steps <= 0:  # no Adam phase: only the automatic weight, for the polish
            return w_geo if w_geo is not None else self.auto_weight([delta], lambda ps: x0 + ps[0], lr, mapterm)
        return self.run_phase(name, [delta], lambda ps: x0 + ps[0], steps, lr, mapterm, w_geo=w_geo,
                              adapt=self.cfg.extra.get("adaptive_scaling", False))

    # ---- checkpoints
    def state(self) -> dict:
        """The refinement's state between stages, as tensors and JSON (what a resumed run needs
        to continue bit for bit): coordinates, the anchor's start, the map force, the trajectory
        (heavy atoms: its riding H are placed again on loading), the log, and the restraints' contact pairs and riding-H rotor coefficients (both carried
        from stage to stage)."""
        # the trajectory's heavy atoms (what trajectory.pdb holds): half the size with riding H
        return {"x_all": self.x_all.detach().cpu(), "start": self.start.detach().cpu(), "map_k": float(self.map_k),
                "trajectory": torch.as_tensor(np.stack([f[self.heavy] for f in self.trajectory])),
                "log": json.dumps(self.log, default=json_default), "pairs": self.rs.pairs.detach().cpu(),
                "h_coef": self.rs.h_coef.detach().cpu()}

    def load_state(self, st: dict):
        """Restore what :meth:`state` saved."""
        self.x_all = st["x_all"].to(self.dev, self.dt)
        self.start = st["start"].to(self.dev, self.dt)
        self.map_k = float(st["map_k"])
        self.trajectory = []
        with torch.no_grad():
            for f in st["trajectory"].to(self.dev, self.dt):  # riding H placed again (not written)
                self.trajectory.append(self.rs.with_h(self.x_all.index_copy(0, self.heavy_t, f)).cpu().numpy())
        self.log = json.loads(st["log"])
        self.rs.pairs = st["pairs"].to(self.dev)
        self.rs.h_coef = st["h_coef"].to(self.dev, self.dt)


def json_default(x):
    """numpy scalars and arrays in a log row, for ``json.dumps``."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
