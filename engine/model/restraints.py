"""Stereochemical restraints as smooth, differentiable torch functions of atom coordinates.

Every term takes coordinates ``x [M, 3]`` (Å, all atoms of a :class:`cryogmm.topology.Topology`
including riding H placed by :func:`place_hydrogens`) and index tensors from
:class:`Restraints`, and returns per-restraint values; :meth:`Restraints.energy` sums them
into one weighted geometry energy (dimensionless, ~ 0.5 z^2 per restraint).

- bonds, angles: z = (value - ideal) / sigma (Engh & Huber targets from the CCP4 monomer
  library; with ``backbone_library="cdl"`` (Phenix's default; ours is engh-huber, as the MolProbity
  judge scores) the protein backbone's twelve bonds and
  angles of every residue with φ/ψ take the conformation-dependent library's targets and sigmas
  at its current φ/ψ, :mod:`cryogmm.model.cdl`, refreshed by :meth:`Restraints.refresh_targets`),
  energy 0.5 z^2 plus a steeper (z - 4.5)^2 beyond 4.5 sigma;
- chirality: signed volume of the centre and three neighbours against its ideal;
- planarity: distances of the atoms to their least-squares plane over sigma;
- peptide omega: trans or cis (as found) with the library's sigma;
- RNA: each ribose's delta torsion restrained to the pucker its 3' phosphate implies
  (MolProbity's perpendicular-distance rule, decided on the start model: C3'-endo 82°,
  C2'-endo 146°, sigma ``PUCKER_SIGMA_DEG``), and each RNA backbone suite softly held in the
  nearest of Richardson's suite conformers (``cryogmm.model.suites.SuiteTerm``);
- nucleic-acid base pairs and stacks found on the start model (``build_topology(na_pairs=True)``):
  H-bond distances and parallel base planes, :class:`cryogmm.model.napairs.PairTerm`;
- Ramachandran and rotamer terms: -log of Gaussian mixtures fitted to the Top8000
  percentile contours (wrapped Gaussians on the torus, full covariance), with a floor so that
  far outliers stay outliers instead of being dragged through disallowed regions;
- clashes: for pairs in a neighbour list (1-2, 1-3, 1-4 pairs excluded) the overlap
  ``r_i + r_j - d`` with probe's contact radii and riding H; polar H / acceptor pairs
  get a 0.6 Å relief (not the donor's heavy atom, as in probe); penalised beyond ``clash_start`` Å (below the 0.4 Å clash threshold).

The reference tables are ``cryogmm/data/rama_top8000.npz`` and ``rotamer_top8000.npz``
(see ``tools/model_tables.py`` for their origin, citation and licence).
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch

from cryogmm.core.rotations import dihedral
from cryogmm.model.cdl import CIS_LIMIT_DEG, LIBRARIES, BackboneLibrary
from cryogmm.model.napairs import PairTerm
from cryogmm.model.suites import DELTA_TARGET_DEG, SuiteTerm, pucker_geometry
from cryogmm.model.topology import RAMA_CLASSES, Topology

HBOND_RELIEF = 0.6  # Å subtracted from the overlap of a polar H with an acceptor
CLASH_OVERLAP = 0.4  # Å: a serious clash (MolProbity clashscore)
RAMA_ALLOWED = {"general": 0.0005, "gly": 0.001, "transpro": 0.001, "cispro": 0.0020, "prepro": 0.001,
                "ileval": 0.001}
RAMA_FAVOURED = 0.02
ROTAMER_OUTLIER = 0.003
PUCKER_SIGMA_DEG = 8.0


@functools.lru_cache(maxsize=1)
def reference_tables():
    """{'rama': {cls: dict(grid, lo, hi, w, mu, cov)}, 'rotamer': {...}} from the shipped npz."""
    from importlib import resources

    out = {}
    for kind, fname in (("rama", "rama_top8000.npz"), ("rotamer", "rotamer_top8000.npz")):
        with resources.files("cryogmm.data").joinpath(fname).open("rb") as fh:
            z = np.load(fh)
            qs = float(z["q_scale"])
            names = sorted({k.rsplit("_grid", 1)[0] for k in z.files if k.endswith("_grid")})
            tab = {}
            for n in names:
                q = z[f"{n}_grid"]
                g = 10.0 ** (-q.astype(np.float64) / qs)
                g[q == 255] = 0.0
                tab[n] = dict(grid=g, lo=z[f"{n}_lo"], hi=z[f"{n}_hi"], w=z[f"{n}_gmm_w"], mu=z[f"{n}_gmm_mu"],
                              cov=z[f"{n}_gmm_cov"])
            out[kind] = tab
    return out


def grid_value(tab: dict, angles_deg: np.ndarray) -> np.ndarray:
    """Multilinear, periodic interpolation of a percentile grid at ``angles_deg [n, d]``
    (bin centres as knots, as MolProbity's NDimTable does)."""
    g, lo, hi = tab["grid"], tab["lo"], tab["hi"]
    a = np.atleast_2d(np.asarray(angles_deg, dtype=np.float64))
    n, d = a.shape
    nb = np.array(g.shape)
    width = (hi - lo) / nb
    period = hi - lo
    u = (np.mod(a - lo, period)) / width - 0.5
    i0 = np.floor(u).astype(int)
    f = u - i0
    out = np.zeros(n)
    for corner in range(2 ** d):
        bits = [(corner >> k) & 1 for k in range(d)]
        idx = tuple(np.mod(i0[:, k] + bits[k], nb[k]) for k in range(d))
        wgt = np.prod([f[:, k] if bits[k] else 1.0 - f[:, k] for k in range(d)], axis=0)
        out += wgt * g[idx]
    return out


def _angle(p0, p1, p2) -> torch.Tensor:
    u, v = p0 - p1, p2 - p1
    return torch.atan2(torch.cross(u, v, dim=-1).norm(dim=-1), (u * v).sum(-1))


def _wrap_deg(d, period):
    return torch.remainder(d + period / 2, period) - period / 2


def place_hydrogens(x: torch.Tensor, h_index, h_frame, h_coef) -> torch.Tensor:
    """Riding H: positions rebuilt from the heavy atoms' local frames (see Topology)."""
    if len(h_index) == 0:
        return x
    return x.index_copy(0, h_index, riding_positions(x, h_frame, h_coef))


def riding_positions(x: torch.Tensor, h_frame, h_coef) -> torch.Tensor:
    """Positions ``[H, 3]`` of riding H from their frames' atoms in ``x``."""
    p, a, b = x[h_frame[:, 0]], x[h_frame[:, 1]], x[h_frame[:, 2]]
    e1 = a - p
    e1 = e1 / e1.norm(dim=-1, keepdim=True)
    v = b - p
    e2 = v - (v * e1).sum(-1, keepdim=True) * e1
    e2 = e2 / e2.norm(dim=-1, keepdim=True)
    e3 = torch.cross(e1, e2, dim=-1)
    return p + h_coef[:, 0:1] * e1 + h_coef[:, 1:2] * e2 + h_coef[:, 2:3] * e3


def _gmm_constants(w, cov):
    """Inverse covariances and log normalisers of a mixture (computed once per table)."""
    d = cov.shape[-1]
    return torch.linalg.inv(cov), torch.log(w) - 0.5 * torch.logdet(cov) - 0.5 * d * math.log(2 * math.pi)


class _MixtureBatch:
    """Several mixtures of one dimension ``d`` evaluated in one pass: rows ``[n, d, 4]`` of
    dihedral atom quads, each with its table (components padded to a common K with zero
    weight), so that a residue's energy costs one gather instead of a Python loop over tables.
    ``energy_of(angles(x))`` gives, for every row in the order the groups were given,
    ``-log(sum_k w_k N(wrap(x - mu_k); cov_k) + floor * tail(x))``: densities in deg^-d
    scaled so the largest component peak is 1 (the floor is relative); ``tail`` is the same
    mixture with covariances widened by ``tail_widening``^2 (peak 1), so an outlier stays an
    outlier (energy at least -log(floor)) but still feels a slope towards the allowed
    regions."""

    def __init__(self, groups, floor: float, fold: bool, dtype, device):
        # groups: list of (quads [n_g, d, 4] long tensor, w, mu, cov, period [d], lo [d], tail_widening)
        K = max(len(g[1]) for g in groups)
        d = groups[0][0].shape[1]
        T = len(groups)
        kw = dict(dtype=dtype, device=device)
        mu = torch.zeros(T, K, d, **kw)
        inv = torch.eye(d, **kw).repeat(T, K, 1, 1)
        logc = torch.full((T, K), -math.inf, **kw)
        tinv, tlogc = inv.clone(), logc.clone()
        self.has_tail = groups[0][6] is not None
        period, lo = torch.zeros(T, d, **kw), torch.zeros(T, d, **kw)
        quads, tab = [], []
        for k, (q, w, m, cov, per, low, widen) in enumerate(groups):
            nk = len(w)
            i, c = _gmm_constants(w, cov)
            mu[k, :nk], inv[k, :nk], logc[k, :nk] = m, i, c
            if self.has_tail:
                i, c = _gmm_constants(w, cov * widen**2)
                tinv[k, :nk], tlogc[k, :nk] = i, c
            period[k], lo[k] = per, low
            quads.append(q.reshape(-1, d, 4))
            tab.append(torch.full((len(q),), k, dtype=torch.long, device=device))
        self.quads, self.tab = torch.cat(quads), torch.cat(tab)
        t = self.tab
        # per-row constants gathered once
        self.mu, self.inv, self.logc = mu[t], inv[t], logc[t]
        self.logc_max = logc.max(1).values[t]
        self.tinv, self.tlogc, self.tlogc_max = tinv[t], tlogc[t], tlogc.max(1).values[t]
        self.period, self.lo = period[t], lo[t]
        self.floor, self.fold = floor, fold

    def angles(self, x):
        q = self.quads
        ang = torch.rad2deg(dihedral(x[q[..., 0]], x[q[..., 1]], x[q[..., 2]], x[q[..., 3]]))
        if self.fold:  # symmetric side chains (table range 180°) fold χ into the table's period
            ang = torch.remainder(ang - self.lo, self.period) + self.lo
        return ang

    def energy_of(self, ang):
        diff = _wrap_deg(ang[:, None, :] - self.mu, self.period[:, None, :])  # [n, K, d]
        q = torch.einsum("nki,nkij,nkj->nk", diff, self.inv, diff)
        lp = torch.logsumexp(self.logc - 0.5 * q, dim=1) - self.logc_max
        if not self.has_tail:
            return -torch.logaddexp(lp, torch.full_like(lp, math.log(self.floor)))
        qt = torch.einsum("nki,nkij,nkj->nk", diff, self.tinv, diff)
        lt = torch.logsumexp(self.tlogc - 0.5 * qt, dim=1) - self.tlogc_max
        return -torch.logaddexp(lp, math.log(self.floor) + lt.clamp(max=0.0))


def neighbour_pairs(x: np.ndarray, topo: Topology, cutoff: float = 4.0) -> np.ndarray:
    """Atom pairs ``[P, 2]`` (i < j) closer than ``cutoff`` Å, without 1-2/1-3/1-4 pairs and
    without pairs of two fixed atoms."""
    from scipy.spatial import cKDTree

    pairs = cKDTree(x).query_pairs(cutoff, output_type="ndarray")
    if len(pairs) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.sort(pairs, axis=1).astype(np.int64)
    keep = ~is_excluded(topo, pairs[:, 0], pairs[:, 1])
    keep &= topo.movable[pairs[:, 0]] | topo.movable[pairs[:, 1]]
    return pairs[keep]


def excluded_codes(topo: Topology) -> np.ndarray:
    """The topology's excluded pairs (i < j) as sorted codes ``i * n_atoms + j`` (cached on
    the topology): a vectorised membership test for neighbour lists."""
    codes = getattr(topo, "_excluded_codes", None)
    if codes is None:
        e = np.array(sorted(topo.excluded), dtype=np.int64).reshape(-1, 2)
        codes = np.sort(e[:, 0] * topo.n_atoms + e[:, 1])
        object.__setattr__(topo, "_excluded_codes", codes)
    return codes


def is_excluded(topo: Topology, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Whether each pair ``(i, j)`` (i < j) is one of the topology's excluded pairs: a binary
    search in the sorted codes (``np.isin`` sorts both arrays on every call)."""
    codes = excluded_codes(topo)
    c = np.asarray(i, dtype=np.int64) * topo.n_atoms + np.asarray(j, dtype=np.int64)
    if not len(codes):
        return np.zeros(c.shape, dtype=bool)
    k = np.searchsorted(codes, c).clip(max=len(codes) - 1)
    return codes[k] == c


class Restraints:
    """Torch tensors of a topology's restraints, and the geometry energy.

    ``weights``: per-term multipliers (keys bond, angle, chiral, plane, omega, rama, rotamer,
    clash). ``backbone_library``: ``cdl`` or ``engh-huber`` for the protein backbone's bond and
    angle targets (default: the topology's, ``cdl`` unless built otherwise); the CDL targets are
    set at the topology's coordinates and follow φ/ψ at each :meth:`refresh_targets`."""

    DEFAULT_WEIGHTS = dict(bond=1.0, angle=1.0, chiral=1.0, plane=1.0, omega=1.0, rama=2.0, rotamer=5.0, clash=1.0,
                           pucker=1.0, suite=5.0, napair=1.0)

    def __init__(self, topo: Topology, dtype=torch.float64, device="cpu", weights: dict | None = None,
                 rama_floor: float = 1e-4, clash_start: float = 0.1, heavy_only_stats: bool = True,
                 tail_widening: float | None = 4.0, backbone_library: str | None = None):
        self.topo = topo
        self.dtype, self.device = dtype, device
        self.weights = dict(self.DEFAULT_WEIGHTS, **(weights or {}))
        t = lambda a, dt=torch.long: torch.as_tensor(np.asarray(a), dtype=dt, device=device)  # noqa: E731
        f = lambda a: t(a, dtype)  # noqa: E731
        self.h_index, self.h_frame, self.h_coef = t(topo.h_index), t(topo.h_frame), f(topo.h_coef)
        # restraints on riding H are implied by their frames: only heavy-atom terms are scored
        heavy = ~topo.is_h
        kb = heavy[topo.bonds].all(1) if len(topo.bonds) else np.zeros(0, bool)
        ka = heavy[topo.angles].all(1) if len(topo.angles) else np.zeros(0, bool)
        self.bonds, self.bond_ideal, self.bond_sigma = t(topo.bonds[kb]), f(topo.bond_ideal[kb]), f(topo.bond_sigma[kb])
        self.angles, self.angle_ideal = t(topo.angles[ka]), f(np.radians(topo.angle_ideal[ka]))
        self.angle_sigma = f(np.radians(topo.angle_sigma[ka]))
        lib = backbone_library or getattr(topo, "backbone_library", "engh-huber")
        if lib not in LIBRARIES:
            raise ValueError(f"backbone library {lib!r}: expected one of {', '.join(LIBRARIES)}")
        self.backbone_library = lib
        self._dictionary_targets = (self.bond_ideal.clone(), self.bond_sigma.clone(), self.angle_ideal.clone(),
                                    self.angle_sigma.clone())
        self.cdl = BackboneLibrary(topo, topo.bonds[kb], topo.angles[ka]) if lib == "cdl" and len(topo.rama) else None
        self.chirals, self.chiral_ideal = t(topo.chirals), f(topo.chiral_ideal)
        self.chiral_both, self.chiral_sigma = t(topo.chiral_both, torch.bool), f(topo.chiral_sigma)
        pl = topo.planes
        pmask = (pl >= 0) & heavy[np.maximum(pl, 0)]
        kp = pmask.sum(1) >= 4  # three points are always coplanar
        pl, pmask = pl[kp], pmask[kp]
        self.plane_mask = f(pmask)
        self.planes = t(np.where(pmask, pl, 0))
        self.plane_sigma = f(topo.plane_sigma[kp])
        self.omegas, self.omega_ideal, self.omega_sigma = t(topo.omegas), f(topo.omega_ideal), f(topo.omega_sigma)
        self.rama, self.rama_class = t(topo.rama), topo.rama_class
        pk = topo.puckers[topo.pucker_rna]
        two_p = pucker_geometry(pk, topo.coords)[2] if len(pk) else np.zeros(0, bool)
        self.puckers = t(pk[:, :4])
        self.pucker_ideal = f(np.where(two_p, DELTA_TARGET_DEG["C2'-endo"], DELTA_TARGET_DEG["C3'-endo"]))
        self.suites = SuiteTerm(topo, dtype=dtype, device=device)
        found = getattr(topo, "na_pairs", None)
        self.napairs = PairTerm(found, dtype=dtype, device=device) if found is not None else None
        tabs = reference_tables()
        self.rama_gmm = {}
        for ci, cname in enumerate(RAMA_CLASSES):
            sel = np.nonzero(topo.rama_class == ci)[0]
            if len(sel):
                tb = tabs["rama"][cname]
                self.rama_gmm[cname] = (t(sel), f(tb["w"]), f(tb["mu"]), f(tb["cov"]),
                                        f(tb["hi"] - tb["lo"]))
        self.chi_gmm = {}
        for tname, (quads, res) in topo.chis.items():
            tb = tabs["rotamer"][tname]
            self.chi_gmm[tname] = (t(quads), f(tb["w"]), f(tb["mu"]), f(tb["cov"]), f(tb["hi"] - tb["lo"]),
                                   f(tb["lo"]))
        self.rama_floor, self.clash_start = rama_floor, clash_start
        self.vdw = f(topo.vdw)
        self.polar_h, self.acceptor = t(topo.polar_h, torch.bool), t(topo.acceptor, torch.bool)
        self.pairs = torch.zeros((0, 2), dtype=torch.long, device=device)
        # the same mixtures batched by dimension (one pass per dimension instead of per table)
        widen = tail_widening or None
        self._rama_batch, self._rama_order = None, None
        if self.rama_gmm:
            groups, order = [], []
            for cname, (sel, w, mu, cov, period) in self.rama_gmm.items():
                r = self.rama[sel]
                quads = torch.stack([r[:, 0:4], r[:, 1:5]], 1)  # φ, ψ
                groups.append((quads, w, mu, cov, period, torch.full_like(period, -180.0), widen))
                order.append(sel)
            self._rama_batch = _MixtureBatch(groups, rama_floor, False, dtype, device)
            self._rama_order = torch.cat(order)
        self._rot_batches = []
        offset, by_dim = 0, {}
        for tname, (q, w, mu, cov, period, lo) in self.chi_gmm.items():
            d = q.shape[1]
            by_dim.setdefault(d, []).append(((q, w, mu, cov, period, lo, widen),
                                             torch.arange(offset, offset + len(q), device=device)))
            offset += len(q)
        self._n_rot = offset
        order = []
        for d, items in sorted(by_dim.items()):
            self._rot_batches.append(_MixtureBatch([g for g, _ in items], rama_floor, True, dtype, device))
            order += [o for _, o in items]
        self._rot_order = torch.cat(order) if order else None  # batch rows -> chi_gmm order
        self.refresh_targets(torch.as_tensor(topo.coords, dtype=dtype, device=device))

    def refresh_targets(self, x) -> int:
        """Set the CDL bond and angle targets and sigmas of every residue with φ/ψ to their values
        at coordinates ``x [M, 3]`` (the dictionary's where the CDL has none, e.g. after a cis
        peptide). Returns how many residues took CDL targets (0 with ``engh-huber``)."""
        if self.cdl is None or not len(self.cdl):
            return 0
        with torch.no_grad():
            x = torch.as_tensor(x, dtype=self.dtype, device=self.device)
            pp = self.phi_psi(x).cpu().numpy()
            o = torch.as_tensor(self.cdl.omega_atoms, device=self.device)
            om = torch.rad2deg(dihedral(x[o[:, 0]], x[o[:, 1]], x[o[:, 2]], x[o[:, 3]])).cpu().numpy()
        br, bm, bs, ar, am, as_ = self.cdl.targets(pp, om)
        bi, bsg, ai, asg = (t.clone() for t in self._dictionary_targets)
        idx = lambda a: torch.as_tensor(a, dtype=torch.long, device=self.device)  # noqa: E731
        val = lambda a: torch.as_tensor(a, dtype=self.dtype, device=self.device)  # noqa: E731
        bi[idx(br)], bsg[idx(br)] = val(bm), val(bs)
        ai[idx(ar)], asg[idx(ar)] = val(np.radians(am)), val(np.radians(as_))
        self.bond_ideal, self.bond_sigma, self.angle_ideal, self.angle_sigma = bi, bsg, ai, asg
        return int((np.abs(om) >= CIS_LIMIT_DEG).sum())

    # ----- individual terms (per-restraint values)
    def with_h(self, x):
        return place_hydrogens(x, self.h_index, self.h_frame, self.h_coef)

    def bond_z(self, x):
        b = self.bonds
        d = (x[b[:, 0]] - x[b[:, 1]]).norm(dim=-1)
        return (d - self.bond_ideal) / self.bond_sigma

    def angle_z(self, x):
        a = self.angles
        ang = _angle(x[a[:, 0]], x[a[:, 1]], x[a[:, 2]])
        return (ang - self.angle_ideal) / self.angle_sigma

    def chiral_volume(self, x):
        c = self.chirals
        p0 = x[c[:, 0]]
        return (torch.cross(x[c[:, 2]] - p0, x[c[:, 3]] - p0, dim=-1) * (x[c[:, 1]] - p0)).sum(-1)

    def chiral_z(self, x):
        v = self.chiral_volume(x)
        both = self.chiral_both
        dv = torch.where(both, v.abs() - self.chiral_ideal.abs(), v - self.chiral_ideal)
        return dv / self.chiral_sigma

    def plane_dev(self, x):
        """Distances [np, K] of each plane's atoms to its least-squares plane (0 at padding)."""
        m = self.plane_mask
        p = x[self.planes]  # [np, K, 3]
        c = (p * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        q = (p - c[:, None]) * m[..., None]
        cov = q.transpose(1, 2) @ q
        # tiny isotropic jitter keeps eigh's gradient finite for perfectly planar ideal groups
        cov = cov + torch.eye(3, dtype=x.dtype, device=x.device) * 1e-9
        _, vec = torch.linalg.eigh(cov)
        n = vec[..., 0]
        return (q * n[:, None]).sum(-1) * m

    def omega_z(self, x):
        o = self.omegas
        w = torch.rad2deg(dihedral(x[o[:, 0]], x[o[:, 1]], x[o[:, 2]], x[o[:, 3]]))
        return _wrap_deg(w - self.omega_ideal, 360.0) / self.omega_sigma

    def pucker_z(self, x):
        p = self.puckers
        d = torch.rad2deg(dihedral(x[p[:, 0]], x[p[:, 1]], x[p[:, 2]], x[p[:, 3]]))
        return _wrap_deg(d - self.pucker_ideal, 360.0) / PUCKER_SIGMA_DEG

    def phi_psi(self, x, rows=None):
        """φ/ψ (degrees) of every residue with them (``topo.rama`` order), or of ``rows`` of it."""
        r = self.rama if rows is None else self.rama[torch.as_tensor(rows, dtype=torch.long, device=self.rama.device)]
        phi = dihedral(x[r[:, 0]], x[r[:, 1]], x[r[:, 2]], x[r[:, 3]])
        psi = dihedral(x[r[:, 1]], x[r[:, 2]], x[r[:, 3]], x[r[:, 4]])
        return torch.rad2deg(torch.stack([phi, psi], -1))

    def rama_energy(self, x):
        """-log Ramachandran density per residue with φ/ψ (``topo.rama`` order)."""
        b = self._rama_batch
        if b is None:
            return x.new_zeros(len(self.rama))
        e = b.energy_of(b.angles(x))
        return e.new_zeros(len(self.rama)).index_copy(0, self._rama_order, e)

    def chis_deg(self, x, tname):
        q = self.chi_gmm[tname][0]  # [n, nchi, 4]
        ang = dihedral(x[q[..., 0]], x[q[..., 1]], x[q[..., 2]], x[q[..., 3]])
        return torch.rad2deg(ang)

    def rotamer_energy(self, x):
        """-log rotamer density per side chain (tables in ``chi_gmm`` order)."""
        if not self._rot_batches:
            return x.new_zeros(0)
        vals = torch.cat([b.energy_of(b.angles(x)) for b in self._rot_batches])
        return x.new_zeros(self._n_rot).index_copy(0, self._rot_order, vals)

    def update_pairs(self, x, cutoff: float = 4.0):
        xn = x.detach().cpu().numpy()
        self.pairs = torch.as_tensor(neighbour_pairs(xn, self.topo, cutoff), device=self.device)

    def overlaps(self, x):
        """Contact overlap (Å, positive = interpenetration) for the current neighbour pairs,
        H-bond relief applied."""
        i, j = self.pairs[:, 0], self.pairs[:, 1]
        d = (x[i] - x[j]).norm(dim=-1)
        # relief for a polar H on an acceptor only: the donor's heavy atom keeps its full radius
        # against the acceptor, as in probe (MolProbity flagged N...O pairs at 2.2-2.5 Å, Lys NZ
        # or Arg NH to O, that a heavy-atom relief had let through: clashscore 1.5 vs our 0)
        hb = (self.polar_h[i] & self.acceptor[j]) | (self.polar_h[j] & self.acceptor[i])
        return self.vdw[i] + self.vdw[j] - d - HBOND_RELIEF * hb.to(x.dtype)

    def optimise_rotors(self, x, step_deg: float = 10.0):
        """Turn rotatable polar H (OH, SH, NH3+) about their bond to the best contacts, as
        reduce does before probe: fewest overlaps, most H-bonds. Updates the riding-H
        coefficients in place; ``x`` has H placed. Returns the number of groups turned."""
        from scipy.spatial import cKDTree

        topo = self.topo
        if not topo.rotors or not len(topo.h_index):
            return 0
        xn = x.detach().cpu().numpy()
        coef = self.h_coef.detach().cpu().numpy().copy()
        frame = topo.h_frame
        where = {int(h): k for k, h in enumerate(topo.h_index)}
        tree = cKDTree(xn)
        th = np.radians(np.arange(0.0, 360.0, step_deg))
        cos, sin = np.cos(th), np.sin(th)
        turned = 0
        for parent, _, hs in topo.rotors:
            ks = [where[h] for h in hs if h in where]
            if not ks:
                continue
            p, a, b = xn[frame[ks[0], 0]], xn[frame[ks[0], 1]], xn[frame[ks[0], 2]]
            e1 = (a - p) / np.linalg.norm(a - p)
            v = b - p
            e2 = v - (v @ e1) * e1
            e2 /= np.linalg.norm(e2)
            e3 = np.cross(e1, e2)
            near = [j for j in tree.query_ball_point(p, 4.5) if j not in hs and j != parent]
            if not near:
                continue
            near = np.array(near)
            c = coef[ks]  # [h, 3]
            c1 = c[:, 1, None] * cos - c[:, 2, None] * sin  # [h, A]
            c2 = c[:, 1, None] * sin + c[:, 2, None] * cos
            pos = p + c[:, 0, None, None] * e1 + c1[..., None] * e2 + c2[..., None] * e3  # [h, A, 3]
            d = np.linalg.norm(pos[:, :, None, :] - xn[near][None, None], axis=-1)  # [h, A, n]
            ov = topo.vdw[np.array(hs)][:, None, None] + topo.vdw[near][None, None] - d
            excl = np.array([[(min(h, j), max(h, j)) in topo.excluded for j in near] for h in hs])
            hb = topo.acceptor[near][None, None, :] & ~excl[:, None, :]
            bad = np.where(hb, np.maximum(ov - HBOND_RELIEF - 0.2, 0) ** 2 - 0.3 * np.clip(ov, 0, 0.8),
                           np.maximum(ov, 0) ** 2)
            bad = np.where(excl[:, None, :], 0.0, bad)
            score = bad.sum(axis=(0, 2))
            best = int(np.argmin(score))
            if best != 0:
                turned += 1
                coef[ks, 1], coef[ks, 2] = c1[:, best], c2[:, best]
        self.h_coef = torch.as_tensor(coef, dtype=self.dtype, device=self.device)
        return turned

    # ----- total
    def terms(self, x, only=None):
        """Energy per term (sums), for ``x`` with H already placed; ``only``: a list of term
        names to compute (default all)."""
        def flat(z):
            excess = torch.relu(z.abs() - 4.5)
            return (0.5 * z**2 + 5.0 * excess**2).sum()

        def clash():
            if not len(self.pairs):
                return x.new_zeros(())
            return ((torch.relu(self.overlaps(x) - self.clash_start) / 0.1) ** 2).sum()

        zero = lambda: x.new_zeros(())  # noqa: E731
        fns = {
            "bond": lambda: flat(self.bond_z(x)) if len(self.bonds) else zero(),
            "angle": lambda: flat(self.angle_z(x)) if len(self.angles) else zero(),
            "chiral": lambda: flat(self.chiral_z(x)) if len(self.chirals) else zero(),
            "plane": lambda: (0.5 * ((self.plane_dev(x) / self.plane_sigma[:, None]) ** 2).sum()
                              if len(self.planes) else zero()),
            "omega": lambda: flat(self.omega_z(x)) if len(self.omegas) else zero(),
            "rama": lambda: self.rama_energy(x).sum() if len(self.rama) else zero(),
            "rotamer": lambda: self.rotamer_energy(x).sum(),
            "pucker": lambda: flat(self.pucker_z(x)) if len(self.puckers) else zero(),
            "suite": lambda: self.suites.energy(x).sum() if len(self.suites) else zero(),
            "napair": lambda: self.napairs.energy(x) if self.napairs is not None and len(self.napairs) else zero(),
            "clash": clash,
        }
        return {k: f() for k, f in fns.items() if only is None or k in only}

    @contextlib.contextmanager
    def weights_set(self, **weights):
        """Term weights changed inside the ``with`` block, restored after it."""
        saved = dict(self.weights)
        self.weights.update(weights)
        try:
            yield self
        finally:
            self.weights.clear()
            self.weights.update(saved)

    def energy(self, x, place_h: bool = True):
        """Weighted geometry energy of coordinates ``x [M, 3]`` (riding H rebuilt first)."""
        if place_h:
            x = self.with_h(x)
        e = self.terms(x, only=[k for k, w in self.weights.items() if w != 0])  # a zero weight skips its term
        return sum((self.weights[k] * v for k, v in e.items()), x.new_zeros(()))
