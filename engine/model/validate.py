"""Validation of an atomic model: geometry, Ramachandran, rotamers, clashes, map fit.

Figures (``validate_coords`` returns them as a flat dict):

- ``bond_rmsz``, ``angle_rmsz``, ``bond_outliers``, ``angle_outliers`` (|z| > 4): heavy-atom
  bonds and angles against the CCP4 monomer library (Engh & Huber) targets, the protein
  backbone's against the conformation-dependent library at the model's own φ/ψ unless the
  topology was built with ``backbone_library="engh-huber"`` (``backbone_library`` in the figures);
- ``plane_rms_A``, ``plane_outliers`` (an atom > 4 sigma from its plane), ``chiral_outliers``
  (wrong hand or |z| > 4 on the signed volume), ``omega_cis_nonpro``;
- ``rama_favoured_pct``, ``rama_allowed_pct``, ``rama_outlier_pct`` (Top8000 contours, 2%
  favoured, class-specific allowed levels as MolProbity); ``rotamer_outlier_pct`` (below the
  0.3% contour);
- ``clashscore``: atom pairs overlapping >= 0.4 Å (probe radii, riding H, H-bond relief) per
  1000 atoms including H; ``cbeta_deviations`` (> 0.25 Å from the ideal Cβ);
- with a map: ``map_cc_mask`` (model map at the resolution vs the map, voxels within 3 Å of
  an atom), ``map_model_fsc_0.5_A``, ``qscore_mean`` and per-residue Q-scores (Pintilie et al.
  2020, sigma 0.6 Å reference, 0-2 Å shells); per ligand (``ligand_map``) the mean map value
  at its atoms in map standard deviations and its Q-score;
- per molecule kind (``by_kind``) bond/angle RMSZ; per ligand its RMSZ (``ligands``); for
  nucleic acids ``base_plane_rmsz``, MolProbity's sugar-pucker test (``n_pucker_outliers``)
  and RNA backbone suites (``suites``, ``suite_outliers``, ``mean_suiteness``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryogmm.core.similarity import fsc, resolution_at
from cryogmm.errors import OptionError
from cryogmm.io.maps import MapGrid, read_map_grid
from cryogmm.io.outputs import write_report
from cryogmm.io.plots import rama_plot
from cryogmm.model.density import check_overlap, model_map
from cryogmm.model.restraints import (
    CLASH_OVERLAP,
    RAMA_ALLOWED,
    RAMA_FAVOURED,
    ROTAMER_OUTLIER,
    Restraints,
    grid_value,
    reference_tables,
)
from cryogmm.model.suites import pucker_geometry, suite_summary
from cryogmm.model.topology import RAMA_CLASSES, Topology, build_topology, read_structure
from cryogmm.runtime import pick_device

# the goals for refined models
GOALS = dict(rama_outlier_pct=0.0, rotamer_outlier_pct=1.0, clashscore=2.0, bond_rmsz=1.0, angle_rmsz=1.0)


@dataclass
class ValidateConfig:
    model: Path
    out: Path | None = None
    map: Path | None = None
    resolution_A: float | None = None
    restraints: tuple = ()  # user monomer dictionaries (CIF paths)
    device: str = "cpu"  # where the geometry is computed (auto, cpu, cuda[:N]); the map figures run on the CPU
    backbone_library: str = "engh-huber"  # or "cdl": protein backbone targets (cryogmm.model.cdl)


def rmsz(z):
    return float(np.sqrt(np.mean(z**2))) if len(z) else 0.0


def rama_table(r: Restraints, x: torch.Tensor, rows=None):
    """(phi_psi [n, 2] deg, class names [n], percentile [n], verdict [n] in favoured/allowed/outlier)
    of every residue with φ/ψ (``topo.rama`` order), or of ``rows`` of them only (the same
    figures for those rows: a scan that moves two residues need not measure the whole model)."""
    topo = r.topo
    if not len(topo.rama) or (rows is not None and not len(rows)):
        return np.zeros((0, 2)), [], np.zeros(0), []
    pp = r.phi_psi(x, rows).detach().cpu().numpy()
    cls = topo.rama_class if rows is None else topo.rama_class[np.asarray(rows, dtype=np.int64)]
    tabs = reference_tables()["rama"]
    pct = np.zeros(len(pp))
    names = [RAMA_CLASSES[c] for c in cls]
    verdict = []
    for ci, cname in enumerate(RAMA_CLASSES):
        sel = cls == ci
        if sel.any():
            pct[sel] = grid_value(tabs[cname], pp[sel])
    for p, n in zip(pct, names):
        verdict.append("favoured" if p >= RAMA_FAVOURED else ("allowed" if p >= RAMA_ALLOWED[n] else "outlier"))
    return pp, names, pct, verdict


def rotamer_table(r: Restraints, x: torch.Tensor):
    """Per side chain: (residue index, table, chis, percentile)."""
    tabs = reference_tables()["rotamer"]
    rows = []
    for tname, (quads, res) in r.topo.chis.items():
        tb = tabs[tname]
        chi = r.chis_deg(x, tname).detach().cpu().numpy()
        period = tb["hi"] - tb["lo"]
        chi = np.mod(chi - tb["lo"], period) + tb["lo"]
        pct = grid_value(tb, chi)
        for k in range(len(res)):
            rows.append((int(res[k]), tname, chi[k], float(pct[k])))
    rows.sort()
    return rows


def ideal_cbeta(n, c, ca):
    """Ideal Cβ from backbone N, C, CA ``[..., 3]`` (tetrahedral L-amino-acid geometry)."""
    b = ca - n
    cc = c - ca
    a = np.cross(b, cc)
    return -0.58273431 * a + 0.56802827 * b - 0.54067466 * cc + ca


def clashes(r: Restraints, x: torch.Tensor):
    """Serious clashes [(i, j, overlap)] among the neighbour pairs of ``x`` (H placed)."""
    r.optimise_rotors(x)
    x = r.with_h(x)
    r.update_pairs(x, cutoff=4.0)
    ov = r.overlaps(x).detach().cpu().numpy()
    pairs = r.pairs.cpu().numpy()
    bad = ov >= CLASH_OVERLAP - 1e-9
    return [(int(i), int(j), float(o)) for (i, j), o in zip(pairs[bad], ov[bad])]


def validate_coords(topo: Topology, coords, restraints: Restraints | None = None, details: bool = False) -> dict:
    """Geometry figures of ``coords [M, 3]`` (all atoms of ``topo``; riding H are rebuilt)."""
    r = restraints if restraints is not None else Restraints(topo)
    x = torch.as_tensor(np.asarray(coords), dtype=r.dtype, device=r.device)
    with torch.no_grad():
        x = r.with_h(x)
        n_cdl = r.refresh_targets(x)  # CDL backbone targets at these coordinates' φ/ψ, as Phenix judges
        bz = r.bond_z(x).cpu().numpy()
        az = r.angle_z(x).cpu().numpy()
        cz = r.chiral_z(x).cpu().numpy() if len(topo.chirals) else np.zeros(0)
        vol = r.chiral_volume(x).cpu().numpy() if len(topo.chirals) else np.zeros(0)
        pd = r.plane_dev(x).cpu().numpy() if len(r.planes) else np.zeros((0, 1))
        om = r.omega_z(x).cpu().numpy() * topo.omega_sigma if len(topo.omegas) else np.zeros(0)
    # planarity: heavy atoms only
    if len(r.planes):
        heavy_mask = r.plane_mask.cpu().numpy() > 0
        dev = pd[heavy_mask]
        pz = (pd / r.plane_sigma.cpu().numpy()[:, None])[heavy_mask]
    else:
        dev, pz = np.zeros(0), np.zeros(0)
    wrong_hand = (~topo.chiral_both) & (np.sign(vol) != np.sign(topo.chiral_ideal)) if len(vol) else np.zeros(0, bool)
    pp, names, pct, verdict = rama_table(r, x)
    rot = rotamer_table(r, x)
    cl = clashes(r, x)
    n_all = int(len(topo.element))
    cb_dev = []
    if len(topo.cb):
        xc = x.detach().cpu().numpy()
        ideal = ideal_cbeta(xc[topo.cb[:, 0]], xc[topo.cb[:, 1]], xc[topo.cb[:, 2]])
        cb_dev = np.linalg.norm(ideal - xc[topo.cb[:, 3]], axis=1)
    n_r = max(len(verdict), 1)
    cis_nonpro = 0
    if len(om):
        for k, q in enumerate(topo.omegas):
            if topo.omega_ideal[k] == 0.0 and topo.res_name[q[3]] != "PRO":
                cis_nonpro += 1
    out = {
        "n_atoms": int((~topo.is_h).sum()),
        "n_atoms_with_h": n_all,
        "n_residues": int(sum(1 for d in topo.residues if d["known"])),
        "bond_rmsz": rmsz(bz), "bond_outliers": int((np.abs(bz) > 4).sum()), "n_bonds": int(len(bz)),
        "angle_rmsz": rmsz(az), "angle_outliers": int((np.abs(az) > 4).sum()), "n_angles": int(len(az)),
        "backbone_library": r.backbone_library, "n_cdl_residues": n_cdl,
        "plane_rms_A": float(np.sqrt(np.mean(dev**2))) if len(dev) else 0.0,
        "plane_outliers": int((np.abs(pz) > 4).sum()),
        "chiral_outliers": int(((np.abs(cz) > 4) | wrong_hand).sum()),
        "omega_cis_nonpro": int(cis_nonpro),
        "rama_favoured_pct": 100.0 * sum(v == "favoured" for v in verdict) / n_r,
        "rama_allowed_pct": 100.0 * sum(v == "allowed" for v in verdict) / n_r,
        "rama_outlier_pct": 100.0 * sum(v == "outlier" for v in verdict) / n_r,
        "n_rama": len(verdict),
        "rotamer_outlier_pct": 100.0 * sum(p < ROTAMER_OUTLIER for _, _, _, p in rot) / max(len(rot), 1),
        "n_rotamers": len(rot),
        "clashscore": 1000.0 * len(cl) / max(n_all, 1),
        "n_clashes": len(cl),
        "cbeta_deviations": int((np.asarray(cb_dev) > 0.25).sum()),
        "fixed_residues": list(topo.fixed_residues),
        "restrained_residues": topo.dictionary_counts,
        "self_restrained": topo.self_restrained,
        "missing_atoms": list(topo.missing_atoms),
    }
    out.update(molecule_figures(topo, x.detach().cpu().numpy(), bz, az, pd, r))
    if details:
        out["rama_residues"] = [
            dict(residue=topo.res_label(int(topo.rama_res[k])), cls=names[k], phi=float(pp[k, 0]), psi=float(pp[k, 1]),
                 pct=float(pct[k]), verdict=verdict[k]) for k in range(len(verdict))]
        out["rotamer_outliers"] = [dict(residue=topo.res_label(ri), chis=[float(c) for c in chi], pct=p)
                                   for ri, _, chi, p in rot if p < ROTAMER_OUTLIER]
        out["clashes"] = [dict(a=topo.label(i), b=topo.label(j), overlap=round(o, 3)) for i, j, o in cl]
    return out


def pucker_table(topo: Topology, xn: np.ndarray) -> list:
    """Per RNA nucleotide (the test is RNA's: DNA left out, as MolProbity does): (residue, delta°,
    perpendicular distance Å, pucker the distance implies,
    outlier: delta out of that pucker's range or epsilon out of its range)."""
    rna = topo.pucker_rna
    if not rna.any():
        return []
    delta, perp, two_p, bad = pucker_geometry(topo.puckers[rna], xn)
    return [(topo.res_label(int(r)), float(d), float(pp), "C2'-endo" if t else "C3'-endo", bool(b))
            for r, d, pp, t, b in zip(topo.pucker_res[rna], delta, perp, two_p, bad)]


def molecule_figures(topo: Topology, xn: np.ndarray, bz: np.ndarray, az: np.ndarray, pd: np.ndarray,
                     r: Restraints) -> dict:
    """Bond/angle RMSZ per molecule kind (protein, nucleic acid, ligand, self-restrained, user
    dictionary); per ligand residue; nucleic-acid base planarity (from the plane deviations
    ``pd`` of ``validate_coords``) and sugar puckers."""
    kinds = np.array([d.get("kind", "protein") for d in topo.residues])
    res_of = topo.res_index
    bonds, angles = r.bonds.cpu().numpy().reshape(-1, 2), r.angles.cpu().numpy().reshape(-1, 3)
    bk, ak = kinds[res_of[bonds[:, 0]]], kinds[res_of[angles[:, 1]]]
    by_kind = {}
    for k in sorted(set(kinds) - {"fixed"}):
        by_kind[k] = {"n_residues": int((kinds == k).sum()), "bond_rmsz": rmsz(bz[bk == k]),
                      "angle_rmsz": rmsz(az[ak == k]), "n_bonds": int((bk == k).sum()), "n_angles": int((ak == k).sum())}
    out = {"by_kind": by_kind}
    lig = [ri for ri, d in enumerate(topo.residues) if d.get("kind") in ("ligand", "self-restrained", "user dictionary")]
    if lig:
        rb, ra = res_of[bonds[:, 0]], res_of[angles[:, 1]]
        out["ligands"] = [{"residue": topo.res_label(ri), "bond_rmsz": rmsz(bz[rb == ri]),
                           "angle_rmsz": rmsz(az[ra == ri]), "n_atoms": int((~topo.is_h[topo.residues[ri]["atoms"]]).sum())}
                          for ri in lig]
    if "nucleic acid" in by_kind:
        if len(r.planes):
            pl = r.planes.cpu().numpy()
            mask = r.plane_mask.cpu().numpy() > 0
            na = kinds[res_of[pl[:, 0]]] == "nucleic acid"  # a plane's first atom is always real
            z = (pd / r.plane_sigma.cpu().numpy()[:, None])[na][mask[na]]
            out["base_plane_rmsz"] = rmsz(z)
        rows = pucker_table(topo, xn)
        out["n_puckers"] = len(rows)
        out["n_pucker_outliers"] = int(sum(row[-1] for row in rows))
        out["pucker_outliers"] = [dict(residue=lab, delta=round(dl, 1), perp_A=round(pp, 2), expected=ex)
                                  for lab, dl, pp, ex, bad in rows if bad]
        out.update(suite_summary(topo, xn))
    return out


def residue_means(values: np.ndarray, res_idx: np.ndarray) -> dict:
    """{residue index: mean of ``values`` over its atoms}, each residue's atoms one slice of the
    atoms sorted stably by residue: the same values in the same order, so the same means, as a
    mask per residue (which grows with the square of the model)."""
    order = np.argsort(res_idx, kind="stable")
    uniq, start = np.unique(res_idx[order], return_index=True)
    ends = [*start[1:].tolist(), len(order)]
    v = values[order]
    return {ri: float(v[a:b].mean()) for ri, a, b in zip(uniq.tolist(), start.tolist(), ends)}


def map_figures(topo: Topology, coords, grid, resolution_A: float) -> dict:
    """Map-model CC (mask within 3 Å of heavy atoms), FSC 0.5 crossing, Q-scores, the map at
    each ligand's atoms."""
    from scipy.ndimage import map_coordinates
    from scipy.spatial import cKDTree

    heavy = ~topo.is_h
    xa = np.asarray(coords, dtype=np.float64)[heavy]
    mm = model_map(xa, topo.element[heavy], resolution_A, grid.apix, grid.origin_A, grid.shape).numpy()
    data = grid.data.astype(np.float64)
    nz, ny, nx = data.shape
    zz, yy, xx = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], 1) * grid.apix + grid.origin_A
    dist, _ = cKDTree(xa).query(pts, distance_upper_bound=3.0)
    mask = np.isfinite(dist).reshape(data.shape)
    out = {}
    if mask.sum() > 10:
        a, b = data[mask], mm[mask]
        out["map_cc_mask"] = float(np.corrcoef(a, b)[0, 1])
    else:
        out["map_cc_mask"] = float("nan")
    out["map_cc_box"] = float(np.corrcoef(data.ravel(), mm.ravel())[0, 1])
    if nz == ny == nx:

        curve = fsc(torch.as_tensor(data), torch.as_tensor(mm))
        out["map_model_fsc_0.5_A"] = float(resolution_at(curve, nz, grid.apix, threshold=0.5))
    # Q-score (Pintilie 2020): correlation of map values on shells 0..2 Å with a 0.6 Å Gaussian
    rng = np.random.default_rng(0)
    radii = np.arange(0.0, 2.01, 0.1)
    n_probe = 8
    dirs = rng.normal(size=(len(radii), n_probe, 3))
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    offs = radii[:, None, None] * dirs  # [S, P, 3]
    ref = np.exp(-0.5 * (radii / 0.6) ** 2)
    tree = cKDTree(xa)
    probe = xa[:, None, None, :] + offs[None]  # [N, S, P, 3]
    flatp = probe.reshape(-1, 3)
    dd, nn = tree.query(flatp)
    own = np.repeat(np.arange(len(xa)), len(radii) * n_probe)
    keep = (nn == own) | (dd >= np.linalg.norm(flatp - xa[own], axis=1) - 1e-6)
    u = (flatp - grid.origin_A) / grid.apix
    vals = map_coordinates(data, [u[:, 2], u[:, 1], u[:, 0]], order=1, mode="constant", cval=0.0)
    vals = vals.reshape(len(xa), len(radii), n_probe)
    keep = keep.reshape(len(xa), len(radii), n_probe)
    # Pearson correlation per atom over its kept probes (all atoms at once)
    refb = np.broadcast_to(ref[None, :, None], vals.shape)
    k = keep.astype(np.float64)
    n = k.sum((1, 2))
    nn_ = np.maximum(n, 1.0)
    mu = (k * vals).sum((1, 2)) / nn_
    mv = (k * refb).sum((1, 2)) / nn_
    du, dv = (vals - mu[:, None, None]) * k, (refb - mv[:, None, None]) * k
    su, sv = np.sqrt((du ** 2).sum((1, 2))), np.sqrt((dv ** 2).sum((1, 2)))
    ok = (n > 3) & (su > 1e-12 * np.maximum(np.abs(mu), 1.0) * np.sqrt(nn_)) & (sv > 0)
    q = np.where(ok, (du * dv).sum((1, 2)) / np.where(ok, su * sv, 1.0), 0.0)
    out["qscore_mean"] = float(q.mean())
    res_idx = topo.res_index[heavy]
    q_res = residue_means(q, res_idx)
    out["qscore_per_residue"] = {topo.res_label(ri): round(m, 4) for ri, m in q_res.items()}
    # ligands: the mean map value at their atoms, in standard deviations of the map about its
    # mean (the figure cryo-EM papers quote for a ligand's density), beside their Q-score
    lig = [ri for ri, d in enumerate(topo.residues) if d.get("kind") in ("ligand", "self-restrained", "user dictionary")]
    if lig:
        ua = (xa - grid.origin_A) / grid.apix
        at = map_coordinates(data, [ua[:, 2], ua[:, 1], ua[:, 0]], order=1, mode="constant", cval=0.0)
        sd = (at - data.mean()) / max(float(data.std()), 1e-12)
        sd_res = residue_means(sd, res_idx)
        out["ligand_map"] = [{"residue": topo.res_label(ri), "map_sd_at_atoms": round(sd_res[ri], 3),
                              "qscore": round(q_res[ri], 4)} for ri in lig if ri in q_res]
    return out


def _check_resolution(with_map: bool, resolution_A):
    if with_map and resolution_A is None:
        raise OptionError("--resolution", "is needed with --map (the model map's resolution in Å)")
    if resolution_A is not None and not resolution_A > 0:
        raise OptionError("--resolution", f"must be positive, got {resolution_A}")


def validate_model(topo: Topology, grid: MapGrid | None = None, resolution_A: float | None = None, *,
                   name: str = "", device="cpu") -> tuple[dict, Restraints]:
    """Every validation figure of ``topo``'s coordinates (and its fit to ``grid`` at
    ``resolution_A``), in memory: the report and the restraints used (the engine API the
    ChimeraX door calls on its open model)."""
    _check_resolution(grid is not None, resolution_A)
    r = Restraints(topo, device=device)
    rep = {"model": name}
    rep.update(validate_coords(topo, topo.coords, r, details=True))
    rep["warnings"] = list(topo.warnings)
    if grid is not None:
        rep["map"] = str(grid.path)
        rep["resolution_A"] = resolution_A
        rep.update(map_figures(topo, topo.coords, grid, resolution_A))
    return rep, r


def write_validation(out: Path, topo: Topology, rep: dict, restraints: Restraints, title: str = "") -> None:
    """``report.json`` and ``ramachandran.png`` of a validation into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x = restraints.with_h(torch.as_tensor(topo.coords, device=restraints.device))
    pp, classes, _, verdict = rama_table(restraints, x)
    tabs = reference_tables()["rama"]
    rama_plot(out / "ramachandran.png", pp, classes, verdict,
              {c: (tabs[c]["grid"], RAMA_ALLOWED[c], RAMA_FAVOURED) for c in RAMA_CLASSES}, title=title)
    write_report(out / "report.json", rep)


def validate(cfg: ValidateConfig, progress=None) -> dict:
    """The ``validate`` job: validate a model file (with its map); writes ``report.json`` and
    ``ramachandran.png`` into ``cfg.out`` when given. Returns the report."""
    _check_resolution(cfg.map is not None, cfg.resolution_A)  # before any file is read
    topo = build_topology(cfg.model, dictionaries=cfg.restraints, backbone_library=cfg.backbone_library)
    grid = None
    if cfg.map is not None:
        grid = read_map_grid(cfg.map)
        check_overlap(topo, grid, cfg.map)
    rep, r = validate_model(topo, grid, cfg.resolution_A, name=str(cfg.model), device=pick_device(cfg.device))
    if grid is not None:
        rep["map"] = str(cfg.map)
    if cfg.out is not None:
        write_validation(Path(cfg.out), topo, rep, r, title=Path(cfg.model).name)
    return rep


def summary_table(rep: dict) -> str:
    """A few lines of the main figures, as the CLI and the demo print them."""
    rows = [("bond RMSZ", "bond_rmsz", "{:.2f}"), ("angle RMSZ", "angle_rmsz", "{:.2f}"),
            ("Rama favoured %", "rama_favoured_pct", "{:.1f}"), ("Rama outliers %", "rama_outlier_pct", "{:.2f}"),
            ("rotamer outliers %", "rotamer_outlier_pct", "{:.2f}"), ("clashscore", "clashscore", "{:.2f}"),
            ("Cβ deviations", "cbeta_deviations", "{}"), ("chirality outliers", "chiral_outliers", "{}"),
            ("base plane RMSZ", "base_plane_rmsz", "{:.2f}"), ("pucker outliers", "n_pucker_outliers", "{}"),
            ("suite outliers", "suite_outliers", "{}"),
            ("map CC (mask)", "map_cc_mask", "{:.3f}"), ("Q-score", "qscore_mean", "{:.3f}")]
    # Ramachandran and rotamer figures of a model without amino acids say nothing: left out
    empty = {"rama_favoured_pct": rep.get("n_rama", 1) == 0, "rama_outlier_pct": rep.get("n_rama", 1) == 0,
             "rotamer_outlier_pct": rep.get("n_rotamers", 1) == 0, "cbeta_deviations": rep.get("n_rama", 1) == 0}
    lines = []
    for label, k, fmt in rows:
        if k in rep and not empty.get(k):
            lines.append(f"  {label:<20s} {fmt.format(rep[k])}")
    return "\n".join(lines)


def ca_rmsd(topo: Topology, coords: np.ndarray, ref_path) -> float:
    """Cα RMSD (Å, no superposition) to the matching Cα atoms (chain, number, name) of a model."""

    st = read_structure(ref_path)
    ref = {}
    for ch in st[0]:
        for res in ch:
            a = res.find_atom("CA", "*")
            if a is not None:
                ref[(ch.name, res.seqid.num)] = np.array([a.pos.x, a.pos.y, a.pos.z])
    d = []
    for i in np.nonzero(topo.atom_name == "CA")[0]:
        if topo.movable[i]:
            k = (str(topo.chain[i]), int(topo.seq_id[i]))
            if k in ref:
                d.append(((coords[i] - ref[k]) ** 2).sum())
    if not d:
        raise OptionError("--reference", f"{ref_path} shares no Cα atoms with the model")
    return float(np.sqrt(np.mean(d)))
