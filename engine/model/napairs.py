"""Base-pair and base-stacking restraints for nucleic acids, detected on the start model
(``refine-model``/``refine-series`` ``--na-pairs``).

At 3.5-4 Å a stem's bases are not resolved; what holds a duplex together in refinement is its
pairing and stacking. :func:`detect` finds, in the start coordinates:

- **base pairs**: Watson-Crick G-C and A-U/A-T and G-U wobble pairs between nucleotides that are
  not chain neighbours, when the central hydrogen bond of the pair's pattern (``PATTERNS``: G O6-C N4,
  G N1-C N3, G N2-C O2; A N6-U O4, A N1-U N3; wobble G O6-U N3, G N1-U O2; the second of each) is
  shorter than ``HBOND_MAX_A``, the others than ``HBOND_LOOSE_A`` (a start model's stem may hold
  a stretched outer H-bond), and the two bases are within ``PARALLEL_MAX_DEG`` of coplanar; a nucleotide
  takes part in at most one pair (the one with the shortest mean H-bond);
- **stacks**: chain-neighbour nucleotides whose base planes are within ``PARALLEL_MAX_DEG`` of
  parallel with their ring centres 3.0-4.5 Å apart along the mean normal and at most 2.5 Å
  apart across it.

:class:`PairTerm` restrains each pair's H-bond donor-acceptor distances (including the purine N1
- pyrimidine N3 distance of a Watson-Crick pair) to ``HBOND_TARGET_A`` (sigma ``HBOND_SIGMA_A``),
and the two base planes of every pair and stack to be parallel: ``0.5 (sin θ / sin σ)^2`` with θ
the angle between the normals of the two bases (each from three of its ring atoms), σ
``PARALLEL_SIGMA_DEG``, smooth and indifferent to the normals' signs. Targets after the
hydrogen-bond and parallelity restraints Phenix builds for nucleic acids (Headd et al. 2012 Acta
Cryst D68:381; typical N...O/N distances of Watson-Crick pairs 2.8-3.0 Å, Saenger 1984).
"""

from __future__ import annotations

import numpy as np
import torch

HBOND_MAX_A = 3.4
HBOND_LOOSE_A = 3.8
HBOND_TARGET_A = 2.9
HBOND_SIGMA_A = 0.1
PARALLEL_MAX_DEG = 30.0
PARALLEL_SIGMA_DEG = 8.0
STACK_RISE_A = (3.0, 4.5)
STACK_SHIFT_MAX_A = 2.5

BASE = {"A": "A", "G": "G", "C": "C", "U": "U", "DA": "A", "DG": "G", "DC": "C", "DT": "U"}
# (purine, pyrimidine) -> [(purine atom, pyrimidine atom)] (T as U: same donor/acceptor names)
PATTERNS = {
    ("G", "C"): ("Watson-Crick", [("O6", "N4"), ("N1", "N3"), ("N2", "O2")]),
    ("A", "U"): ("Watson-Crick", [("N6", "O4"), ("N1", "N3")]),
    ("G", "U"): ("G-U wobble", [("O6", "N3"), ("N1", "O2")]),
}
RING = {"A": ("N1", "N3", "C5"), "G": ("N1", "N3", "C5"), "C": ("N1", "N3", "C5"), "U": ("N1", "N3", "C5")}
RING_ALL = {"A": ("N1", "C2", "N3", "C4", "C5", "C6"), "G": ("N1", "C2", "N3", "C4", "C5", "C6"),
            "C": ("N1", "C2", "N3", "C4", "C5", "C6"), "U": ("N1", "C2", "N3", "C4", "C5", "C6")}


def _normal(p):
    n = np.cross(p[1] - p[0], p[2] - p[0])
    return n / np.linalg.norm(n)


def _angle_deg(n1, n2):
    return float(np.degrees(np.arccos(min(1.0, abs(float(n1 @ n2))))))


def detect(topo, coords=None) -> dict:
    """Pairs and stacks of ``topo``'s nucleotides at ``coords`` (default the topology's):
    ``{"hbonds": [n, 2] atom indices, "planes": [k, 2, 3] atom triples (parallel pairs), "pairs":
    [(label, label, kind)], "stacks": [(label, label)]}``."""
    x = topo.coords if coords is None else np.asarray(coords)
    nts = []
    for r, rd in enumerate(topo.residues):
        b = BASE.get(rd["name"])
        if b is None or not rd["known"]:
            continue
        names = {str(topo.atom_name[j]): int(j) for j in rd["atoms"]}
        if not all(a in names for a in RING_ALL[b]):
            continue
        tri = [names[a] for a in RING[b]]
        nts.append(dict(r=r, base=b, atoms=names, tri=tri, normal=_normal(x[tri]),
                        centre=x[[names[a] for a in RING_ALL[b]]].mean(0)))
    cands = []
    for i in range(len(nts)):
        for j in range(len(nts)):
            a, b = nts[i], nts[j]
            if i == j or (a["base"], b["base"]) not in PATTERNS:
                continue
            ra, rb = topo.residues[a["r"]], topo.residues[b["r"]]
            if ra["chain"] == rb["chain"] and abs(a["r"] - b["r"]) < 2:
                continue
            kind, hb = PATTERNS[(a["base"], b["base"])]
            if not all(p in a["atoms"] and q in b["atoms"] for p, q in hb):
                continue
            d = [float(np.linalg.norm(x[a["atoms"][p]] - x[b["atoms"][q]])) for p, q in hb]
            if d[1] > HBOND_MAX_A or max(d) > HBOND_LOOSE_A or _angle_deg(a["normal"], b["normal"]) > PARALLEL_MAX_DEG:
                continue
            cands.append((float(np.mean(d)), i, j, kind, [(a["atoms"][p], b["atoms"][q]) for p, q in hb]))
    used, hbonds, planes, pairs = set(), [], [], []
    for _, i, j, kind, hb in sorted(cands):
        if i in used or j in used:
            continue
        used |= {i, j}
        hbonds += hb
        planes.append([nts[i]["tri"], nts[j]["tri"]])
        pairs.append((topo.res_label(nts[i]["r"]), topo.res_label(nts[j]["r"]), kind))
    stacks = []
    for i in range(len(nts) - 1):
        a, b = nts[i], nts[i + 1]
        ra, rb = topo.residues[a["r"]], topo.residues[b["r"]]
        if ra["chain"] != rb["chain"] or b["r"] != a["r"] + 1:
            continue
        if _angle_deg(a["normal"], b["normal"]) > PARALLEL_MAX_DEG:
            continue
        n = a["normal"] + np.sign(float(a["normal"] @ b["normal"])) * b["normal"]
        n /= np.linalg.norm(n)
        v = b["centre"] - a["centre"]
        rise = abs(float(v @ n))
        shift = float(np.linalg.norm(v - (v @ n) * n))
        if STACK_RISE_A[0] <= rise <= STACK_RISE_A[1] and shift <= STACK_SHIFT_MAX_A:
            planes.append([a["tri"], b["tri"]])
            stacks.append((topo.res_label(a["r"]), topo.res_label(b["r"])))
    return {"hbonds": np.array(hbonds, dtype=np.int64).reshape(-1, 2),
            "planes": np.array(planes, dtype=np.int64).reshape(-1, 2, 3), "pairs": pairs, "stacks": stacks}


def summary(found: dict) -> dict:
    """The report.json entry: how many pairs (by kind) and stacks, and which."""
    kinds = {}
    for _, _, k in found["pairs"]:
        kinds[k] = kinds.get(k, 0) + 1
    return {"pairs": len(found["pairs"]), "by_kind": kinds, "stacks": len(found["stacks"]),
            "hbonds": int(len(found["hbonds"])), "pair_list": [f"{a}-{b} {k}" for a, b, k in found["pairs"]],
            "stack_list": [f"{a}/{b}" for a, b in found["stacks"]]}


class PairTerm:
    """The energy of detected pairs and stacks (see the module doc), differentiable in ``x``."""

    def __init__(self, found: dict, dtype=torch.float64, device="cpu"):
        self.hbonds = torch.as_tensor(found["hbonds"], dtype=torch.long, device=device)
        self.planes = torch.as_tensor(found["planes"], dtype=torch.long, device=device)
        self.sin_sigma = float(np.sin(np.radians(PARALLEL_SIGMA_DEG)))

    def __len__(self):
        return len(self.hbonds) + len(self.planes)

    def hbond_z(self, x):
        h = self.hbonds
        d = (x[h[:, 0]] - x[h[:, 1]]).norm(dim=-1)
        return (d - HBOND_TARGET_A) / HBOND_SIGMA_A

    def plane_sin2(self, x):
        """sin^2 of the angle between the two base normals of each pair/stack ``[k]`` (smooth;
        the same for either sign of either normal)."""
        p = x[self.planes]  # [k, 2, 3, 3]
        n = torch.cross(p[:, :, 1] - p[:, :, 0], p[:, :, 2] - p[:, :, 0], dim=-1)
        n = n / n.norm(dim=-1, keepdim=True)
        c = torch.cross(n[:, 0], n[:, 1], dim=-1)
        return (c * c).sum(-1)

    def energy(self, x):
        e = x.new_zeros(())
        if len(self.hbonds):
            e = e + 0.5 * (self.hbond_z(x) ** 2).sum()
        if len(self.planes):
            e = e + 0.5 * (self.plane_sin2(x) / self.sin_sigma**2).sum()
        return e
