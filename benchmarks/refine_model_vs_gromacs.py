"""Adenylate kinase: the closed model (1AKE) refined into maps simulated from the open model (4AKE),
by cryogmm and by GROMACS density-guided simulation.

Ours: for each resolution (4 Å, 3 Å; Gaussian noise added, band-limited to the
resolution) and each map similarity, ``refine_model`` (rigid patches -> residues -> full
atom) and its report: Cα RMSD to the open model, our validation figures, map CC, the same
figures for the open model itself, wall time.

The peer (``gmx`` from apt ``gromacs``, 2022): the same closed model and the same map, by
density-guided MD (Blau & Lindahl / Igaev et al.) with the charmm27 force field in vacuum
(reaction field, eps_rf = inf, 1.2 nm cut-offs, h-bond constraints, 2 fs, v-rescale 300 K),
relative-entropy similarity on the heavy atoms (mass-weighted Gaussians of width
res / (2 sqrt(ln 4)), range 4 widths), normalised densities, adaptive force scaling
(time constant 4 ps), density forces every ``--gmx-nst`` steps; pdb2gmx (-ignh),
steepest-descent minimisation, then ``--gmx-ps`` ps of MD. The final frame is mapped back
to the deposited atom names and scored exactly like ours. Wall time covers pdb2gmx to the
end of mdrun.

Both sides are judged by ``cryogmm validate`` and, when the MolProbity judge is set up
(``MOLP=/path/to/molp``, ../shared/tools/molprobity/setup.sh), by MolProbity.

``--peer-only`` runs GROMACS and stores its section; ``--ours-only`` runs cryogmm and keeps
the stored GROMACS section, so the slow, engine-independent peer is measured once. The
merged JSON (``--out``) holds both and the printed ratios (wall time GROMACS / ours, Cα
RMSD, geometry side by side).

    MOLP=/tmp/model/molp python benchmarks/refine_model_vs_gromacs.py [--peer-only | --ours-only]
        [--res 4] [--similarity fsc ...] [--steps 100 | --quick] [--gmx-ps 40 --gmx-k 1e7 [--gmx-tag 200ps]]
        [--work /tmp/bench/adk] [--out benchmarks/results/refine_model_gromacs.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch


def make_map(model_path: Path, resolution_A: float, out: Path, apix: float = 1.0, noise: float = 0.3, seed: int = 0,
             pad_A: float = 12.0):
    """Molmap-like map of a model (sigma = res / (pi sqrt 2), electrons) on a cubic grid with
    white Gaussian noise (sd = ``noise`` x the noise-free map's sd over the box) low-passed to
    the resolution. Returns the path."""
    from cryogmm.core.gaussians import ELECTRONS, sigma_from_resolution
    from cryogmm.io.maps import write_map
    from cryogmm.core.fourier import lowpass
    from cryogmm.model.density import splat
    from cryogmm.model.topology import build_topology

    topo = build_topology(model_path, add_hydrogens=False)
    x = topo.coords[~topo.is_h]
    lo = x.min(0) - pad_A
    n = int(math.ceil((x.max(0) - lo).max() / apix + pad_A / apix))
    n += n % 2
    amp = torch.tensor([ELECTRONS.get(e, 6) for e in topo.element[~topo.is_h]], dtype=torch.float64)
    m = splat(torch.as_tensor(x), amp, sigma_from_resolution(resolution_A), (n, n, n), apix, lo)
    rng = np.random.default_rng(seed)
    noisy = m + torch.as_tensor(rng.normal(scale=noise * float(m.std()), size=m.shape))
    noisy = lowpass(noisy, resolution_A, apix)
    write_map(out, noisy.numpy(), apix, origin_A=lo)
    return out


def judge(model: Path, molp: str | None):
    if not molp:
        return None
    exe = Path(molp) / "validate.sh"
    if not exe.exists():
        return None
    r = subprocess.run([str(exe), str(model)], capture_output=True, text=True)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception:
        return {"error": r.stderr[-300:]}


KEYS = ("ca_rmsd_to_reference_A", "bond_rmsz", "angle_rmsz", "bond_outliers", "angle_outliers", "rama_favoured_pct",
        "rama_outlier_pct", "rotamer_outlier_pct", "clashscore", "cbeta_deviations", "plane_outliers",
        "chiral_outliers", "map_cc_mask", "qscore_mean")
JUDGE_KEYS = ("bond_rmsz", "angle_rmsz", "rama_favored_pct", "rama_outlier_pct", "rotamer_outlier_pct", "clashscore")

# GROMACS charmm27 atom names that differ from the deposited (PDB) names
CHARMM_TO_PDB = {("ILE", "CD"): "CD1", ("*", "OT1"): "O", ("*", "OT2"): "OXT", ("*", "OC1"): "O", ("*", "OC2"): "OXT"}
GMX_RESNAMES = {"HSD": "HIS", "HSE": "HIS", "HSP": "HIS", "HISD": "HIS", "HISE": "HIS", "HISH": "HIS"}


def _gmx(args, cwd, stdin=None):
    r = subprocess.run(["gmx", "-quiet"] + args, cwd=cwd, input=stdin, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"gmx {args[0]} failed:\n{r.stderr[-2000:]}")
    return r


def _shift_inputs(model: Path, map_path: Path, work: Path, margin_A: float = 10.0):
    """Protein atoms of ``model`` and the map, translated so the map box starts at ``margin_A``
    (GROMACS puts atoms into its periodic box; the map's MRC origin is honoured). Returns the
    shift (Å) and the box edge (nm)."""
    import gemmi
    import mrcfile

    with mrcfile.open(map_path, permissive=True) as m:
        data = np.asarray(m.data, dtype=np.float32).copy()
        vs = np.array([float(m.voxel_size.x), float(m.voxel_size.y), float(m.voxel_size.z)])
        origin = np.array([float(m.header.origin.x), float(m.header.origin.y), float(m.header.origin.z)])
    shift = margin_A - origin
    with mrcfile.new(work / "map_shift.mrc", overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = tuple(vs)
        m.header.origin = tuple(origin + shift)
    st = gemmi.read_structure(str(model))
    st.remove_ligands_and_waters()
    st.remove_hydrogens()
    st.remove_empty_chains()
    while len(st) > 1:  # first model only
        del st[len(st) - 1]
    st[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(*map(float, shift))))
    st.write_pdb(str(work / "start_shift.pdb"))
    box_nm = float((np.array(data.shape[::-1]) * vs).max() + 2 * margin_A) / 10.0
    return shift, box_nm


def _mdp_common():
    return ("cutoff-scheme = Verlet\npbc = xyz\ncoulombtype = reaction-field\nrcoulomb = 1.2\nepsilon-rf = 0\n"
            "rvdw = 1.2\nvdw-modifier = potential-shift\nnstlist = 20\n")


def _mdp_density(res_A: float, k: float, nst: int, ps: float, seed: int):
    width_nm = res_A / (2 * math.sqrt(math.log(4))) / 10.0
    return _mdp_common() + f"""integrator = md
dt = 0.002
nsteps = {int(round(ps / 0.002))}
nstxout-compressed = 500
compressed-x-grps = Protein-H
nstenergy = 500
nstlog = 5000
constraints = h-bonds
tcoupl = v-rescale
tc-grps = System
tau-t = 0.1
ref-t = 300
gen-vel = yes
gen-temp = 300
gen-seed = {seed}
comm-mode = linear
density-guided-simulation-active = yes
density-guided-simulation-group = Protein-H
density-guided-simulation-similarity-measure = relative-entropy
density-guided-simulation-atom-spreading-weight = mass
density-guided-simulation-force-constant = {k:g}
density-guided-simulation-gaussian-transform-spreading-width = {width_nm:.4f}
density-guided-simulation-gaussian-transform-spreading-range-in-multiples-of-width = 4
density-guided-simulation-reference-density-filename = map_shift.mrc
density-guided-simulation-nst = {nst}
density-guided-simulation-normalize-densities = yes
density-guided-simulation-adaptive-force-scaling = yes
density-guided-simulation-adaptive-force-scaling-time-constant = 4
"""


def gmx_to_pdb(gro_pdb: Path, template: Path, shift, out: Path) -> dict:
    """The GROMACS heavy atoms (charmm27 names, shifted frame) written onto the deposited
    model's protein atoms (their names, original frame). Returns counts of matched and
    unmatched atoms: nothing is dropped silently."""
    import gemmi

    g = gemmi.read_structure(str(gro_pdb))
    pos = {}
    for ch in g[0]:
        for r in ch:
            rn = GMX_RESNAMES.get(r.name, r.name)
            for a in r:
                if a.element.name == "H":
                    continue
                name = CHARMM_TO_PDB.get((rn, a.name), CHARMM_TO_PDB.get(("*", a.name), a.name))
                pos[(r.seqid.num, name)] = np.array(a.pos.tolist()) - shift
    st = gemmi.read_structure(str(template))
    st.remove_ligands_and_waters()
    st.remove_hydrogens()
    st.remove_empty_chains()
    missing = []
    n = 0
    for ch in st[0]:
        for r in ch:
            for a in r:
                p = pos.pop((r.seqid.num, a.name), None)
                if p is None:
                    missing.append(f"{ch.name}/{r.name}{r.seqid.num}/{a.name}")
                    continue
                a.pos = gemmi.Position(*map(float, p))
                n += 1
    if missing:
        raise RuntimeError(f"GROMACS output lacks {len(missing)} deposited atoms: {missing[:10]}")
    st.write_pdb(str(out))
    return {"matched_atoms": n, "extra_gromacs_atoms": sorted(f"{k[0]}/{k[1]}" for k in pos)}


def _log_wall(log: Path) -> float:
    """mdrun's own wall time (s) from its log."""
    lines = log.read_text().splitlines()
    for i, line in enumerate(lines):
        if "Core t (s)" in line and "Wall t (s)" in line:
            return float(lines[i + 1].split()[2])
    import datetime

    stamps = [datetime.datetime.strptime(ln.split(" rank 0 ")[1].strip(), "%a %b %d %H:%M:%S %Y")
              for ln in lines if ln.startswith(("Started mdrun on rank 0", "Finished mdrun on rank 0"))]
    if len(stamps) == 2:
        return (stamps[1] - stamps[0]).total_seconds()
    gro, tpr = log.with_suffix(".gro"), log.with_suffix(".tpr")
    if gro.exists() and tpr.exists():  # minimisation logs carry no timing: its input and output file times
        return gro.stat().st_mtime - tpr.stat().st_mtime
    raise RuntimeError(f"{log}: no timing (mdrun did not finish)")


def run_gromacs(model: Path, map_path: Path, res_A: float, work: Path, ps: float, k: float, nst: int,
                threads: int, seed: int = 1, reuse: bool = False) -> dict:
    """Closed model into the map by GROMACS density-guided MD; returns paths, timings and the
    Cα trajectory file. ``work`` is emptied first, unless ``reuse`` and a finished run (dg.gro)
    with the same settings is there: then only the analysis is redone and the wall time is
    mdrun's own (minimisation + density-guided MD, from their logs)."""
    mdp = _mdp_density(res_A, k, nst, ps, seed)
    reused = reuse and (work / "dg.gro").exists() and (work / "dg.mdp").read_text() == mdp
    if not reused:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
    shift, box_nm = _shift_inputs(model, map_path, work)
    nt = ["-nt", str(threads), "-ntmpi", "1", "-pin", "off"]
    t0 = time.time()
    if not reused:
        _gmx(["pdb2gmx", "-f", "start_shift.pdb", "-o", "conf.gro", "-p", "topol.top", "-i", "posre.itp",
              "-ff", "charmm27", "-water", "none", "-ignh"], work)
        _gmx(["editconf", "-f", "conf.gro", "-o", "box.gro", "-box", f"{box_nm:.3f}", "-noc"], work)
        (work / "em.mdp").write_text(_mdp_common() + "integrator = steep\nnsteps = 500\nemtol = 500\n")
        _gmx(["grompp", "-f", "em.mdp", "-c", "box.gro", "-p", "topol.top", "-o", "em.tpr", "-maxwarn", "1"], work)
        _gmx(["mdrun", "-deffnm", "em"] + nt, work)
        (work / "dg.mdp").write_text(mdp)
        _gmx(["grompp", "-f", "dg.mdp", "-c", "em.gro", "-p", "topol.top", "-o", "dg.tpr", "-maxwarn", "1"], work)
        _gmx(["mdrun", "-deffnm", "dg"] + nt, work)
    wall = time.time() - t0
    mdrun_s = _log_wall(work / "dg.log")
    if reused:
        wall = _log_wall(work / "em.log") + mdrun_s
    _gmx(["trjconv", "-f", "dg.gro", "-s", "dg.tpr", "-o", "final_charmm.pdb"], work, stdin="Protein-H\n")
    mapping = gmx_to_pdb(work / "final_charmm.pdb", model, shift, work / "final.pdb")
    # the trajectory holds the density group (Protein-H) only: its own reference structure
    _gmx(["trjconv", "-f", "dg.xtc", "-s", "final_charmm.pdb", "-o", "traj.pdb"], work, stdin="0\n")
    perf = None
    for line in (work / "dg.log").read_text().splitlines():
        if line.startswith("Performance:"):
            perf = float(line.split()[1])
    return {"final": work / "final.pdb", "traj": work / "traj.pdb", "shift": shift, "wall_s": wall,
            "mdrun_s": mdrun_s, "ns_per_day": perf, "mapping": mapping,
            "wall_source": "mdrun logs (em + density-guided MD), analysis redone" if reused else "pdb2gmx to end of mdrun"}


def _traj_ca_rmsd(traj: Path, shift, open_pdb: Path, every_ps: float):
    """Cα RMSD to the open model of each saved GROMACS frame (ps, Å)."""
    import gemmi

    ref = {}
    for r in gemmi.read_structure(str(open_pdb))[0][0]:
        a = r.find_atom("CA", "*")
        if a is not None:
            ref[r.seqid.num] = np.array(a.pos.tolist())
    out = []
    for i, m in enumerate(gemmi.read_structure(str(traj))):
        d = [((np.array(r["CA"][0].pos.tolist()) - shift - ref[r.seqid.num]) ** 2).sum()
             for ch in m for r in ch if r.find_atom("CA", "*") is not None and r.seqid.num in ref]
        out.append([round(i * every_ps, 3), round(float(np.sqrt(np.mean(d))), 3)])
    return out


def score_model(path: Path, grid, res_A: float, open_pdb: Path, molp) -> dict:
    """Our figures (validate + map) and the judge's for a model file."""
    from cryogmm.model.validate import ca_rmsd
    from cryogmm.model.topology import build_topology
    from cryogmm.model.validate import map_figures, validate_coords

    t = build_topology(path)
    f = validate_coords(t, t.coords)
    f.update({k: v for k, v in map_figures(t, t.coords, grid, res_A).items() if k != "qscore_per_residue"})
    f["ca_rmsd_to_reference_A"] = ca_rmsd(t, t.coords, open_pdb)
    out = {"cryogmm_validate": {k: f.get(k) for k in KEYS}}
    j = judge(path, molp)
    if j is not None:
        out["molprobity"] = {k: j.get(k) for k in JUDGE_KEYS}
    return out


def goals_met(af: dict, open_cc: float) -> bool:
    return bool(af["ca_rmsd_to_reference_A"] <= 1.0 and af["rama_outlier_pct"] == 0.0
                and af["rotamer_outlier_pct"] <= 1.0 and af["clashscore"] <= 2.0
                and af["bond_rmsz"] <= 1.0 and af["angle_rmsz"] <= 1.0 and af["map_cc_mask"] >= open_cc - 0.02)


def compare(results: dict) -> list[str]:
    """Ratio lines: GROMACS vs each of our cases at the same resolution."""
    lines = []
    for key, g in results.get("gromacs", {}).items():
        if not isinstance(g, dict) or "figures" not in g:
            continue
        gf = g["figures"]["cryogmm_validate"]
        gm = g["figures"].get("molprobity", {})
        for c in results.get("cases", []):
            if f"{c['resolution_A']:g}A" != key.split("_")[0]:
                continue
            of = c["after"]
            om = c.get("molprobity_after", {})
            row = {"resolution_A": c["resolution_A"], "similarity": c["similarity"],
                   "preset": c.get("preset", "default"), "gromacs_run": key,
                   "gromacs_ps": g.get("settings", {}).get("ps"),
                   "wall_gromacs_over_ours": g["wall_s"] / c["wall_s"],
                   "ca_rmsd_ours_A": of["ca_rmsd_to_reference_A"], "ca_rmsd_gromacs_A": gf["ca_rmsd_to_reference_A"],
                   "map_cc_ours": of["map_cc_mask"], "map_cc_gromacs": gf["map_cc_mask"]}
            for k in ("bond_rmsz", "angle_rmsz", "rama_outlier_pct", "rotamer_outlier_pct", "clashscore"):
                row[f"{k}_ours"] = of.get(k)
                row[f"{k}_gromacs"] = gf.get(k)
                if om or gm:
                    row[f"{k}_ours_molprobity"] = om.get(k)
                    row[f"{k}_gromacs_molprobity"] = gm.get(k)
            results.setdefault("comparison", []).append(row)
            judged = bool(om and gm)
            sfx = "_molprobity" if judged else ""
            geo = "; ".join(f"{k} {row[k + '_ours' + sfx]:.2f} vs {row[k + '_gromacs' + sfx]:.2f}"
                            for k in ("bond_rmsz", "angle_rmsz", "rama_outlier_pct", "rotamer_outlier_pct", "clashscore"))
            lines.append(f"{c['resolution_A']:g} Å {c['similarity']} ({row['preset']}) vs GROMACS {row['gromacs_ps']:g} ps: "
                         f"wall GROMACS/ours = {row['wall_gromacs_over_ours']:.1f}x; "
                         f"Cα RMSD ours {row['ca_rmsd_ours_A']:.2f} vs GROMACS {row['ca_rmsd_gromacs_A']:.2f} Å; "
                         f"map CC {row['map_cc_ours']:.3f} vs {row['map_cc_gromacs']:.3f}; "
                         f"{geo} ({'MolProbity' if judged else 'cryogmm validate'}; ours vs GROMACS)")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=float, nargs="+", default=[4.0])
    ap.add_argument("--similarity", nargs="+", default=["relative-entropy"],
                    help="ours: any of relative-entropy cross-correlation inner-product fsc frc")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--peer-only", action="store_true", help="run GROMACS only (stored in --out, ours kept)")
    mode.add_argument("--ours-only", action="store_true", help="run cryogmm only (stored GROMACS section kept)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--quick", action="store_true",
                    help="ours with refine-model --quick (50 steps per phase, one rotamer + full-atom round, no Adam "
                         "phase before the polish)")
    ap.add_argument("--gmx-tag", default="",
                    help="store the GROMACS run as '<res>A_<tag>' beside the main one (e.g. a longer run)")
    ap.add_argument("--extra", type=json.loads, default={}, help="JSON dict for RefineModelConfig.extra")
    ap.add_argument("--gmx-ps", type=float, default=40.0, help="density-guided MD length (ps)")
    ap.add_argument("--gmx-k", type=float, default=1e7, help="initial density force constant (kJ/mol)")
    ap.add_argument("--gmx-nst", type=int, default=10, help="density forces every N MD steps")
    ap.add_argument("--gmx-reuse", action="store_true",
                    help="reuse a finished GROMACS run in --work with the same settings (analysis only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="run ours N times; the median wall time counts")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench/adk"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "refine_model_gromacs.json")
    ap.add_argument("--molp", default=os.environ.get("MOLP"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from cryogmm.io.maps import read_map_grid
    from cryogmm.model.refine.config import (
        DEFAULT_STAGES,
        QUICK_EXTRA,
        QUICK_STAGES,
        QUICK_STEPS,
        RefineModelConfig,
    )
    from cryogmm.model.refine.job import refine_model
    from cryogmm.model.topology import build_topology
    from cryogmm.model.validate import map_figures, validate_coords

    data = resources.files("cryogmm.data")
    open_pdb, closed_pdb = Path(str(data.joinpath("adk_open.pdb"))), Path(str(data.joinpath("adk_closed.pdb")))
    a.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(a.out.read_text()) if a.out.exists() else {}
    results["machine"] = {"cpu_threads": a.threads, "gpu": None, "cpu_count": os.cpu_count()}
    results.pop("comparison", None)
    topo_open = build_topology(open_pdb)

    def save():
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_name(a.out.name + ".part")
        tmp.write_text(json.dumps(results, indent=2, default=float) + "\n")
        tmp.replace(a.out)

    for res in a.res:
        mp = make_map(open_pdb, res, a.work / f"open_{res:g}A.mrc")
        grid = read_map_grid(mp)
        ref_fig = validate_coords(topo_open, topo_open.coords)
        ref_fig.update({k: v for k, v in map_figures(topo_open, topo_open.coords, grid, res).items()
                        if k != "qscore_per_residue"})
        results.setdefault("open_model", {})[f"{res:g}A"] = {k: ref_fig.get(k) for k in KEYS if k in ref_fig}
        if not a.ours_only:
            if shutil.which("gmx") is None:
                results.setdefault("gromacs", {})[f"{res:g}A"] = "not run: gmx not on PATH (apt-get install gromacs)"
            else:
                g = run_gromacs(closed_pdb, mp, res, a.work / f"gromacs_{res:g}A", a.gmx_ps, a.gmx_k, a.gmx_nst,
                                a.threads, reuse=a.gmx_reuse)
                rec = {"wall_s": g["wall_s"], "mdrun_s": g["mdrun_s"], "ns_per_day": g["ns_per_day"],
                       "wall_source": g["wall_source"],
                       "settings": {"force_field": "charmm27", "solvent": "vacuum, reaction field eps_rf=inf",
                                    "similarity": "relative-entropy", "adaptive_force_scaling": True,
                                    "tau_ps": 4, "ps": a.gmx_ps, "k0": a.gmx_k, "nst": a.gmx_nst,
                                    "threads": a.threads, "gromacs": subprocess.run(
                                        ["gmx", "-quiet", "--version"], capture_output=True, text=True).stdout.split(
                                        "GROMACS version:")[1].split("\n")[0].strip()},
                       "mapping": g["mapping"], "figures": score_model(g["final"], grid, res, open_pdb, a.molp),
                       "ca_rmsd_trajectory_ps_A": _traj_ca_rmsd(g["traj"], g["shift"], open_pdb, 1.0)}
                rec["figures"]["goals_met"] = goals_met(rec["figures"]["cryogmm_validate"], ref_fig["map_cc_mask"])
                results.setdefault("gromacs", {})[f"{res:g}A" + (f"_{a.gmx_tag}" if a.gmx_tag else "")] = rec
                print("GROMACS", f"{res:g} Å", json.dumps({k: v for k, v in rec.items() if k != "ca_rmsd_trajectory_ps_A"},
                                                          default=float), flush=True)
            save()
        if a.peer_only:
            continue
        preset = "quick" if a.quick else "default"
        results["cases"] = [c for c in results.get("cases", []) if c["resolution_A"] != res
                            or c["similarity"] not in a.similarity or c.get("preset", "default") != preset]
        for sim in a.similarity:
            out = a.work / f"refined_{res:g}A_{sim}{'_quick' if a.quick else ''}"
            steps, stages = (QUICK_STEPS, QUICK_STAGES) if a.quick else (a.steps, DEFAULT_STAGES)
            extra = {**(QUICK_EXTRA if a.quick else {}), **a.extra}
            walls = []
            for _ in range(max(1, a.repeat)):  # wall times vary by ~30 % on a shared machine: the median counts
                t0 = time.time()
                rep = refine_model(RefineModelConfig(model=closed_pdb, map=mp, resolution_A=res, out=out,
                                                     similarity=sim, steps=steps, stages=stages, reference=open_pdb,
                                                     threads=a.threads, extra=extra))
                walls.append(time.time() - t0)
            wall = float(np.median(walls))
            case = {"resolution_A": res, "similarity": sim, "preset": preset, "wall_s": wall, "walls_s": walls, "steps": steps,
                    "stages": list(stages), "extra": a.extra, "stage_seconds": rep["stage_seconds"],
                    "before": {k: rep["before"].get(k) for k in KEYS}, "after": {k: rep["after"].get(k) for k in KEYS}}
            j = judge(out / "refined.pdb", a.molp)
            if j is not None:
                case["molprobity_after"] = {k: j.get(k) for k in JUDGE_KEYS}
            case["goals_met"] = goals_met(case["after"], ref_fig["map_cc_mask"])
            results["cases"].append(case)
            print(json.dumps(case, default=float), flush=True)
            save()
    for line in compare(results):
        print(line)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
