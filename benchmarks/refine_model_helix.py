"""Blau & Lindahl's helix test: a straight ideal α-helix refined into the map of a kinked one.

The truth is a poly-Ala α-helix (25 residues by default) built from ideal φ/ψ (-57°, -47°)
and Engh & Huber bond lengths/angles (NeRF), with a kink in the middle from changed φ/ψ
(ψ of residue 13 = -50°, φ of residue 14 = -110°: both still Ramachandran-favoured; the
two halves' axes meet at about 43°). Its map is a molmap-like density (sigma = res / (pi
sqrt 2)) at ``--res`` with white noise low-passed to the resolution. The start is the
straight helix (same sequence), superposed on the kinked one by its Cα atoms ("aligned"),
or that placement moved by a random rigid offset ("unaligned": a rotation of
``--rot-deg`` about a random axis through the centroid and a shift of ``--shift-A`` in a
random direction, one per seed).

For each similarity and start: Cα RMSD to the kinked helix (no superposition) before and
after, the geometry figures of ``cryogmm validate``, map CC, seconds; then per similarity
the fraction of starts that end below 1 Å. ``refine_model`` is used as a black box
(``--extra '{"rigid_levels": ...}'`` passes knobs through).

    python benchmarks/refine_model_helix.py [--similarity relative-entropy ...] [--seeds 0 1 2]
        [--res 4] [--steps 100] [--work /tmp/bench/helix] [--out benchmarks/results/refine_model_helix.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ALPHA = (-57.0, -47.0)  # ideal α-helix φ, ψ (degrees)
KINK = {"psi": (12, -50.0), "phi": (13, -110.0)}  # 0-based residue index, new angle
# Engh & Huber (1991) backbone geometry
B_N_CA, B_CA_C, B_C_N, B_C_O = 1.458, 1.525, 1.329, 1.231
A_N_CA_C, A_CA_C_N, A_C_N_CA, A_CA_C_O = 111.2, 116.2, 121.7, 120.1


def _place(a, b, c, bond, angle, torsion):
    """NeRF: the atom d with |cd| = bond, angle(b, c, d) = angle, dihedral(a, b, c, d) = torsion."""
    bc = c - b
    bc = bc / np.linalg.norm(bc)
    n = np.cross(b - a, bc)
    n = n / np.linalg.norm(n)
    m = np.cross(n, bc)
    th, ph = np.radians(angle), np.radians(torsion)
    return c - bond * np.cos(th) * bc + bond * np.sin(th) * np.cos(ph) * m + bond * np.sin(th) * np.sin(ph) * n


def build_backbone(phi, psi, omega: float = 180.0) -> list[dict]:
    """Poly-Ala atoms (N, CA, C, O, CB) per residue from φ/ψ lists (degrees)."""
    n = len(phi)
    N = np.zeros(3)
    CA = np.array([B_N_CA, 0.0, 0.0])
    t = np.radians(A_N_CA_C)
    C = CA + B_CA_C * np.array([-np.cos(t), np.sin(t), 0.0])
    res = [{"N": N, "CA": CA, "C": C}]
    for i in range(1, n):
        p = res[-1]
        N = _place(p["N"], p["CA"], p["C"], B_C_N, A_CA_C_N, psi[i - 1])
        CA = _place(p["CA"], p["C"], N, B_N_CA, A_C_N_CA, omega)
        C = _place(p["C"], N, CA, B_CA_C, A_N_CA_C, phi[i])
        res.append({"N": N, "CA": CA, "C": C})
    for i, r in enumerate(res):
        if i + 1 < n:  # O trans to the next N
            r["O"] = _place(res[i + 1]["N"], r["CA"], r["C"], B_C_O, A_CA_C_O, 180.0)
        else:
            r["O"] = _place(r["N"], r["CA"], r["C"], B_C_O, A_CA_C_O, psi[i] + 180.0)
        b, cc = r["CA"] - r["N"], r["C"] - r["CA"]
        r["CB"] = -0.58273431 * np.cross(b, cc) + 0.56802827 * b - 0.54067466 * cc + r["CA"]
    return res


def helix_angles(n: int, kinked: bool):
    phi, psi = np.full(n, ALPHA[0]), np.full(n, ALPHA[1])
    if kinked:
        psi[KINK["psi"][0]] = KINK["psi"][1]
        phi[KINK["phi"][0]] = KINK["phi"][1]
    return phi, psi


def kink_angle(ca: np.ndarray, k: int = KINK["psi"][0]) -> float:
    """Angle (degrees) between the axes of the helix before and after the kink: each axis is
    the principal direction of the centroids of 4 consecutive Cα atoms (points on the axis
    of a 3.6-residue-per-turn helix)."""
    def axis(p):
        c = np.array([p[i:i + 4].mean(0) for i in range(len(p) - 3)])
        v = np.linalg.svd(c - c.mean(0))[2][0]
        return v if v @ (c[-1] - c[0]) > 0 else -v
    return float(np.degrees(np.arccos(np.clip(axis(ca[:k + 1]) @ axis(ca[k + 1:]), -1, 1))))


def write_pdb(res: list[dict], path: Path, coords: np.ndarray | None = None) -> Path:
    """Write residues as chain A poly-Ala (``coords`` [5 n, 3] replaces the positions, same order)."""
    import gemmi

    st = gemmi.Structure()
    model = gemmi.Model("1")
    ch = gemmi.Chain("A")
    k = 0
    for i, r in enumerate(res):
        rr = gemmi.Residue()
        rr.name, rr.seqid, rr.entity_type = "ALA", gemmi.SeqId(i + 1, " "), gemmi.EntityType.Polymer
        for name in ("N", "CA", "C", "O", "CB"):
            a = gemmi.Atom()
            a.name, a.element, a.occ, a.b_iso = name, gemmi.Element(name[0]), 1.0, 20.0
            x = r[name] if coords is None else coords[k]
            a.pos = gemmi.Position(*map(float, x))
            rr.add_atom(a)
            k += 1
        ch.add_residue(rr)
    model.add_chain(ch)
    st.add_model(model)
    st.setup_entities()
    path.parent.mkdir(parents=True, exist_ok=True)
    st.write_pdb(str(path))
    return path


def _xyz(res):
    return np.array([r[a] for r in res for a in ("N", "CA", "C", "O", "CB")])


def kabsch(mobile: np.ndarray, target: np.ndarray):
    """Rotation R and shift t with ``mobile @ R.T + t`` best on ``target`` (least squares)."""
    cm, ct = mobile.mean(0), target.mean(0)
    u, _, vt = np.linalg.svd((mobile - cm).T @ (target - ct))
    d = np.sign(np.linalg.det(vt.T @ u.T))
    R = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return R, ct - cm @ R.T


def random_rotation(rng, deg: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    ax = rng.normal(size=3)
    ax /= np.linalg.norm(ax)
    return Rotation.from_rotvec(np.radians(deg) * ax).as_matrix()


def make_case(work: Path, n_res: int = 25, res_A: float = 4.0, noise: float = 0.1, seeds=(0, 1, 2),
              rot_deg: float = 20.0, shift_A: float = 3.0) -> dict:
    """Write kinked.pdb, its map, straight_aligned.pdb and straight_seed{s}.pdb; returns the paths
    and the start figures."""
    sys.path.insert(0, str(Path(__file__).parent))
    from refine_model_vs_gromacs import make_map

    work.mkdir(parents=True, exist_ok=True)
    kinked = build_backbone(*helix_angles(n_res, True))
    straight = build_backbone(*helix_angles(n_res, False))
    xk, xs = _xyz(kinked), _xyz(straight)
    ca = np.arange(1, len(xk), 5)
    R, t = kabsch(xs[ca], xk[ca])
    xa = xs @ R.T + t
    paths = {"kinked": write_pdb(kinked, work / "kinked.pdb"), "aligned": write_pdb(straight, work / "straight_aligned.pdb", xa)}
    paths["map"] = make_map(paths["kinked"], res_A, work / f"kinked_{res_A:g}A.mrc", noise=noise, seed=0, pad_A=10.0)
    starts = {"aligned": paths["aligned"]}
    for s in seeds:
        rng = np.random.default_rng(1000 + s)
        c = xa.mean(0)
        d = rng.normal(size=3)
        d *= shift_A / np.linalg.norm(d)
        xu = (xa - c) @ random_rotation(rng, rot_deg).T + c + d
        starts[f"seed{s}"] = write_pdb(straight, work / f"straight_seed{s}.pdb", xu)
    return {"paths": paths, "starts": starts, "kink_deg": kink_angle(xk[ca]),
            "aligned_ca_rmsd_A": float(np.sqrt(((xa[ca] - xk[ca]) ** 2).sum(1).mean()))}


KEYS = ("ca_rmsd_to_reference_A", "bond_rmsz", "angle_rmsz", "bond_outliers", "angle_outliers", "rama_favoured_pct",
        "rama_outlier_pct", "clashscore", "cbeta_deviations", "chiral_outliers", "plane_outliers", "map_cc_mask")


def run_one(start: Path, case: dict, sim: str, res_A: float, steps: int, out: Path, extra: dict, seed: int = 0) -> dict:
    from cryogmm.model.refine.config import RefineModelConfig
    from cryogmm.model.refine.job import refine_model

    t0 = time.time()
    rep = refine_model(RefineModelConfig(model=start, map=case["paths"]["map"], resolution_A=res_A, out=out,
                                         similarity=sim, steps=steps, reference=case["paths"]["kinked"], seed=seed,
                                         extra=dict(extra)))
    return {"wall_s": time.time() - t0, "before": {k: rep["before"].get(k) for k in KEYS},
            "after": {k: rep["after"].get(k) for k in KEYS}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--similarity", nargs="+",
                    default=["relative-entropy", "cross-correlation", "inner-product", "fsc", "frc"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--no-aligned", action="store_true", help="only the unaligned starts")
    ap.add_argument("--n-res", type=int, default=25)
    ap.add_argument("--res", type=float, default=4.0)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--rot-deg", type=float, default=20.0)
    ap.add_argument("--shift-A", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--extra", type=json.loads, default={}, help="JSON dict for RefineModelConfig.extra")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench/helix"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "refine_model_helix.json")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    case = make_case(a.work, a.n_res, a.res, a.noise, a.seeds, a.rot_deg, a.shift_A)
    print(f"kink {case['kink_deg']:.1f} deg; aligned straight helix Cα RMSD {case['aligned_ca_rmsd_A']:.2f} Å", flush=True)
    starts = {k: v for k, v in case["starts"].items() if not (a.no_aligned and k == "aligned")}
    results = {"setup": {"n_res": a.n_res, "resolution_A": a.res, "noise": a.noise, "rot_deg": a.rot_deg,
                         "shift_A": a.shift_A, "steps": a.steps, "extra": a.extra, "kink_deg": case["kink_deg"],
                         "aligned_start_ca_rmsd_A": case["aligned_ca_rmsd_A"]},
               "runs": [], "summary": {}}
    for sim in a.similarity:
        for name, start in starts.items():
            r = run_one(start, case, sim, a.res, a.steps, a.work / f"out_{sim}_{name}", a.extra)
            r.update(similarity=sim, start=name)
            results["runs"].append(r)
            print(f"{sim:18s} {name:8s} Cα RMSD {r['before']['ca_rmsd_to_reference_A']:.2f} -> "
                  f"{r['after']['ca_rmsd_to_reference_A']:.2f} Å  bond/angle RMSZ {r['after']['bond_rmsz']:.2f}/"
                  f"{r['after']['angle_rmsz']:.2f}  Rama out {r['after']['rama_outlier_pct']:.1f} %  "
                  f"clash {r['after']['clashscore']:.1f}  {r['wall_s']:.0f} s", flush=True)
        rr = [r for r in results["runs"] if r["similarity"] == sim]
        d = np.array([r["after"]["ca_rmsd_to_reference_A"] for r in rr])
        un = np.array([r["after"]["ca_rmsd_to_reference_A"] for r in rr if r["start"] != "aligned"])
        results["summary"][sim] = {"n": int(len(d)), "frac_below_1A": float((d < 1.0).mean()),
                                   "frac_below_1A_unaligned": float((un < 1.0).mean()) if len(un) else None,
                                   "median_ca_rmsd_A": float(np.median(d)), "max_ca_rmsd_A": float(d.max()),
                                   "mean_wall_s": float(np.mean([r["wall_s"] for r in rr]))}
        print(f"== {sim}: {results['summary'][sim]}", flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
