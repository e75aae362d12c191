"""RNA backbone suites: the sugar-to-sugar conformers of Richardson et al. (2008) RNA 14:465.

A suite runs from one ribose to the next: δ(i-1), ε(i-1), ζ(i-1), α(i), β(i), γ(i), δ(i). The
two δ (C3'- or C2'-endo) and γ (p, t, m) pick one of 12 bins; inside a bin the closest of its
clusters by a scaled (power 3) distance over ε ζ α β names the suite, the seven-angle
distance to that cluster gives its suiteness ``(cos(π d) + 1) / 2``, and a suite further
than 1 from every cluster (or with an angle in a forbidden range) is an outlier ``!!``. The
cluster means and widths are suitename's (version 070328 half-widths, shipped in
``data/rna_suites.json``); this module is our own implementation of that published rule,
checked against mmtbx's suitename (``tests/test_suites.py``). A dominant cluster and its
satellite are told apart as suitename does, with their special widths.

:func:`suite_torsions` reads the seven angles from a topology's coordinates; :func:`assign`
names each suite; :func:`suite_energy` is a smooth version for refinement (the soft minimum
over the clusters of the suite's bin of the scaled distance), zero inside a cluster's core.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources

import numpy as np
import torch

from cryogmm.core.rotations import dihedral, dihedral_deg
from cryogmm.model.topology import Topology

# MolProbity's sugar-pucker test (Richardson lab; the published thresholds mmtbx uses): the
# perpendicular distance of the 3' phosphate (or, at a 3' end, of O3') to the line of the
# glycosidic bond decides C2'-endo (P < 2.9 Å, O3' < 2.4 Å) or C3'-endo; the delta torsion must
# then lie in that pucker's range, and epsilon in 155-310°. Refinement restrains delta to the
# middle of the range the phosphate implies (``DELTA_TARGET_DEG``).
PPERP_2P_MAX_A = 2.9
O3PERP_2P_MAX_A = 2.4
DELTA_2P_DEG = (129.0, 162.0)
DELTA_3P_DEG = (65.0, 104.0)
DELTA_TARGET_DEG = {"C2'-endo": 146.0, "C3'-endo": 82.0}
EPSILON_DEG = (155.0, 310.0)


def pucker_geometry(q: np.ndarray, xn: np.ndarray):
    """For pucker rows ``q [P, 7]`` (``Topology.puckers``: C5' C4' C3' O3' C1' N9/N1, next P or
    -1): delta (degrees, [0, 360)), the perpendicular distance (Å), whether it implies C2'-endo,
    and whether the nucleotide is a MolProbity pucker outlier."""
    c5, c4, c3, o3, c1, n = (xn[q[:, k]] for k in range(6))
    linked = q[:, 6] >= 0  # no link: a 3' end or a chain break, decided from O3'
    probe = xn[np.where(linked, q[:, 6], q[:, 3])]
    u = (n - c1) / np.linalg.norm(n - c1, axis=1, keepdims=True)
    v = probe - c1
    perp = np.linalg.norm(v - (v * u).sum(1, keepdims=True) * u, axis=1)
    two_p = perp < np.where(linked, PPERP_2P_MAX_A, O3PERP_2P_MAX_A)
    delta = np.mod(dihedral_deg(c5, c4, c3, o3), 360.0)
    lo = np.where(two_p, DELTA_2P_DEG[0], DELTA_3P_DEG[0])
    hi = np.where(two_p, DELTA_2P_DEG[1], DELTA_3P_DEG[1])
    bad = (delta < lo) | (delta > hi)
    if linked.any():
        eps = np.mod(dihedral_deg(c4[linked], c3[linked], o3[linked], probe[linked]), 360.0)
        bad[linked] |= (eps < EPSILON_DEG[0]) | (eps > EPSILON_DEG[1])
    return delta, perp, two_p, bad


@lru_cache(maxsize=1)
def suite_table() -> dict:
    """The cluster table (``data/rna_suites.json``)."""
    return json.loads(resources.files("cryogmm.data").joinpath("rna_suites.json").read_text())


def suite_atoms(topo: Topology) -> tuple[np.ndarray, np.ndarray]:
    """Per complete suite the atom indices of its seven torsions ``[S, 7, 4]`` and the residue
    index of its 3' nucleotide ``[S]`` (the one carrying the suite's phosphate); RNA only (both
    riboses carry O2'). Suites across
    a chain break (O3'-P farther than 2 Å) or with a missing atom are left out (incomplete)."""
    cached = getattr(topo, "_suite_atoms", None)  # validate runs once per polish round: index once
    if cached is not None:
        return cached
    names = {}

    def atoms_of(r):
        if r not in names:
            names[r] = {str(topo.atom_name[i]): int(i) for i in topo.residues[r]["atoms"]}
        return names[r]

    quads, res = [], []
    for r in range(1, len(topo.residues)):
        if topo.residues[r].get("kind") != "nucleic acid" or topo.residues[r - 1].get("kind") != "nucleic acid":
            continue
        if topo.residues[r]["chain"] != topo.residues[r - 1]["chain"]:
            continue
        prev, cur = atoms_of(r - 1), atoms_of(r)
        if "O2'" not in cur or "O2'" not in prev:
            continue  # suites are RNA's (Richardson 2008): DNA backbones are left out
        at = [prev.get(n) for n in ("C5'", "C4'", "C3'", "O3'")] + [cur.get(n) for n in
                                                                    ("P", "O5'", "C5'", "C4'", "C3'", "O3'")]
        if any(a is None for a in at):
            continue
        if np.linalg.norm(topo.coords[at[3]] - topo.coords[at[4]]) > 2.0:
            continue
        # δ-1, ε-1, ζ-1, α, β, γ, δ as sliding quadruples over the backbone walk
        quads.append([at[k:k + 4] for k in range(7)])
        res.append(r)
    out = np.array(quads, dtype=np.int64).reshape(-1, 7, 4), np.array(res, dtype=np.int64)
    object.__setattr__(topo, "_suite_atoms", out)
    return out


def suite_torsions(coords: np.ndarray, quads: np.ndarray) -> np.ndarray:
    """The seven angles of each suite in degrees, in [0, 360) as suitename reads them."""
    if not len(quads):
        return np.zeros((0, 7))
    q = quads.reshape(-1, 4)
    ang = dihedral_deg(coords[q[:, 0]], coords[q[:, 1]], coords[q[:, 2]], coords[q[:, 3]]).reshape(-1, 7)
    return np.mod(ang, 360.0)


def _dist(a: np.ndarray, c: np.ndarray, w: np.ndarray, dims) -> float:
    p = suite_table()["power"]
    d = np.abs(a[dims] - c[dims]) / w[dims]
    return float((d ** p).sum() ** (1.0 / p))


def _in(v, rng) -> bool:
    return rng[0] <= v <= rng[1]


def assign_one(a: np.ndarray) -> tuple[str, float, str]:
    """(cluster name or ``!!``, suiteness, bin or triage reason) of one suite's seven angles."""
    tab = suite_table()
    tri = tab["triage"]
    if not _in(a[1], tri["epsilon"]):
        return "!!", 0.0, "epsilon"
    pk = []
    for v in (a[0], a[6]):
        pk.append("3" if _in(v, tri["delta3"]) else "2" if _in(v, tri["delta2"]) else None)
    if None in pk:
        return "!!", 0.0, "delta"
    gam = next((g for g in ("t", "p", "m") if _in(a[5], tri[f"gamma_{g}"])), None)
    if gam is None:
        return "!!", 0.0, "gamma"
    for name, k in (("alpha", 3), ("beta", 4), ("zeta", 2)):
        if not _in(a[k], tri[name]):
            return "!!", 0.0, name
    key = pk[0] + pk[1] + gam
    clusters = tab["bins"].get(key, [])
    if not clusters:
        return "!!", 0.0, key
    w = np.asarray(tab["widths"], float)
    four, seven = [1, 2, 3, 4], list(range(7))
    ca = [np.asarray(c["angles"], float) for c in clusters]
    dist = np.array([_dist(a, c, w, four) for c in ca])
    best = int(np.argmin(dist))
    inside = dist < 1
    dom = next((j for j, c in enumerate(clusters) if c["dominance"] == "dom"), None)
    pick = best
    if inside.sum() > 1 and dom is not None and inside[dom]:
        others = [j for j in range(len(clusters)) if j != dom]
        near = min(others, key=lambda j: dist[j])
        if clusters[near]["dominance"] == "sat":
            pick = _dom_or_sat(a, ca[dom], ca[near], clusters[near]["name"], w, dist, dom, near)
        else:
            pick = dom if dist[dom] < dist[near] else near
    elif inside.sum() == 0:
        return "!!", 0.0, key
    d7 = _dist(a, ca[pick], w, seven)
    if d7 > 1:
        return "!!", 0.0, key
    return clusters[pick]["name"], max(0.01, (math.cos(math.pi * d7) + 1) / 2), key


def _dom_or_sat(a, dom_c, sat_c, sat_name, w, dist, dom, sat) -> int:
    """Between a dominant cluster and its satellite: the special widths decide (suitename)."""
    sl = slice(1, 5)
    dps = float(np.dot((dom_c - a)[sl], (dom_c - sat_c)[sl]))
    spd = float(np.dot((sat_c - a)[sl], (sat_c - dom_c)[sl]))
    if dps > 0 and spd > 0:
        wd, ws = w.copy(), w.copy()
        info = suite_table()["satellites"].get(sat_name)
        if info is not None:
            for m in range(7):
                if info["sat_widths"][m] > 0:
                    ws[m] = info["sat_widths"][m]
                if info["dom_widths"][m] > 0:
                    wd[m] = info["dom_widths"][m]
        four = [1, 2, 3, 4]
        return dom if _dist(a, dom_c, wd, four) < _dist(a, sat_c, ws, four) else sat
    return dom if dist[dom] < dist[sat] else sat


def assign(topo: Topology, coords: np.ndarray | None = None) -> list[dict]:
    """Every complete suite of a model: residue label, cluster, suiteness, bin."""
    x = topo.coords if coords is None else coords
    quads, res = suite_atoms(topo)
    out = []
    for r, a in zip(res, suite_torsions(x, quads)):
        name, s, why = assign_one(a)
        out.append({"residue": topo.res_label(int(r)), "suite": name, "suiteness": round(s, 3), "bin": why})
    return out


def suite_summary(topo: Topology, coords: np.ndarray | None = None) -> dict:
    """Suites, outliers (``!!``) and the mean suiteness, as MolProbity reports them."""
    rows = assign(topo, coords)
    out = [r["residue"] for r in rows if r["suite"] == "!!"]
    return {"suites": len(rows), "suite_outliers": len(out), "suite_outlier_residues": out,
            "mean_suiteness": round(float(np.mean([r["suiteness"] for r in rows])), 3) if rows else None}


class SuiteTerm:
    """A smooth suite energy for refinement: per suite the soft minimum over all clusters of
    ``relu(d - core)^2`` where ``d`` is the seven-angle scaled distance (periodic differences),
    so a suite inside any cluster's core costs nothing and an outlier is pulled towards the
    nearest conformer. Built once per topology."""

    def __init__(self, topo: Topology, dtype=torch.float64, device="cpu", core: float = 0.5, softness: float = 0.1):
        quads, res = suite_atoms(topo)
        tab = suite_table()
        self.quads = torch.as_tensor(quads, device=device)
        cent = [c["angles"] for rows in tab["bins"].values() for c in rows if c["status"] == "certain"]
        self.centres = torch.as_tensor(np.radians(np.asarray(cent, float)), dtype=dtype, device=device)
        self.widths = torch.as_tensor(np.radians(np.asarray(tab["widths"], float)), dtype=dtype, device=device)
        self.core, self.soft = core, softness
        self.res = res

    def __len__(self):
        return len(self.quads)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        if not len(self.quads):
            return x.new_zeros(())
        q = self.quads.reshape(-1, 4)
        ang = dihedral(x[q[:, 0]], x[q[:, 1]], x[q[:, 2]], x[q[:, 3]]).reshape(-1, 1, 7)  # radians
        d = torch.remainder(ang - self.centres[None] + math.pi, 2 * math.pi) - math.pi
        dist = ((d.abs() / self.widths) ** 3).sum(-1).clamp_min(1e-12) ** (1.0 / 3.0)  # [S, C]
        e = torch.relu(dist - self.core) ** 2
        return (-self.soft * torch.logsumexp(-e / self.soft, dim=1)).clamp_min(0.0)
