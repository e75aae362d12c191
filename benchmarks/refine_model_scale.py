"""Scale of model refinement (issue 17): time per step and peak memory from ~2k to ~100k atoms.

Models are tiled from public deposited structures (copies side by side, each its own chains),
so every size carries the same mix of molecule kinds:
  6msm    cryo-EM model of CFTR (PDB 6MSM: one chain with gaps, an UNK helix, ATP, Mg, lipids,
          cholesterol; 9.7k heavy atoms), from the MDAnalysisTests 2.11.0 sdist on PyPI
  1hvr    HIV-1 protease dimer with its inhibitor XK2 (1.6k atoms) beside the 23-nt RNA hairpin
          of 1K5I (tests/data/rna_1k5i.pdb): protein, ligand and RNA in one unit
The smallest 6msm size is a fragment of it (the first residues of chain A up to ~2k atoms).
Every copy is moved off its place by a random rigid motion (3°, 1 Å) and refined back into a
4 Å map (1.2 Å/px, 10 % noise) of the unmoved tiling, with refine-model's defaults unless
``--steps`` is given. The map is made here, atom by atom in a local window (independent of
the engine's code).

Reported per size: atoms, map box, wall time, peak RSS of the refine-model process
(``wait4``), seconds per Adam step of each stage (from report.json's log: its rows carry the
step and the elapsed seconds), seconds per L-BFGS evaluation of the polish, seconds in the
rotamer stages, Cα RMSD to the unmoved tiling before/after, and the growth exponent of
time per step against atoms (log-log slope between the smallest and largest size; 1 = linear).

The models are mmCIF files (147 chains at 100k atoms of 1hvr: chain names of one, then two
characters). The map box is the least box with no prime factor over 7 that holds the model
(``--box smooth``, as cryo-EM boxes are chosen; ``--box tight``, the least even box, was the
rule before 2026-12-02 19:20 and gave 1hvr boxes 164 = 4 x 41 and 218 = 2 x 109, whose FFTs
cost 2.5x and 5x more per voxel than a smooth box on this CPU).

Two modes:
- ``--mode run`` (default): one refine-model process per size as above.
- ``--mode objective``: the refinement's objective only, robust to a loaded machine. Every
  size's topology, restraints, map terms and Refiner are built in one process as refine-model
  builds them, then ``--rounds`` rounds each time ``--steps`` steps of each kind at every size
  in turn (round-robin, the size order rotated each round): a step is the value and gradient
  of ``Refiner.step_loss`` (the body of every Adam step: restraints + fsc map term) for the
  rigid patches (64, the last rigid level's 3 Å blur map term), the residues (1.5 Å blur) and
  the atoms (the full-atom stage's map term); ``pairs`` is the contact-list rebuild (every
  10th step). Per size: CPU seconds (``process_time``, ``--threads`` torch threads; 1 by
  default, so CPU time is the work done) and wall seconds per step, median, min, max and
  spread over the rounds; load averages per round; the least-squares log-log slope over all
  sizes and between consecutive sizes. ``--profile DIR`` writes a torch-profiler table of one
  step of each kind at each size.

Usage:
  python benchmarks/refine_model_scale.py [--mode run|objective] [--family 6msm 1hvr]
        [--sizes 2000 10000 50000 100000] [--steps N] [--stages rigid residue rotamers full]
        [--rounds 4] [--threads 1] [--profile DIR] [--box smooth|tight] [--rows earlier.log]
        [--work /tmp/bench/scale]
  e.g. nice -n 10 python benchmarks/refine_model_scale.py --mode objective --rounds 4 --steps 2
- ``--mode scans``: CPU seconds of the scans and checks outside the optimiser steps (the
  peptide, base and side-chain scans, the polish's peptide turns, the contact rebuild, the
  validation and map figures) per size, one thread, and their growth between sizes.
``--key default_settings_rows`` with ``--run-threads 1`` and no ``--steps``/``--stages``: the
default-settings rows (refine-model as a user runs it) under their own key.
Adds its results to benchmarks/results/refine_model_scale.json (``rows`` of run mode, each
with ``measured``: date, host, command, load; ``objective_runs``), keeping what is there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gemmi
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from refine_model_whole import MDAT, sdist_file  # noqa: E402

ROOT = HERE.parent
ONE_CHAR = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [chr(c) for c in range(ord("a"), ord("z") + 1)] \
    + [str(d) for d in range(10)]
# the 62 one-character names, then two-character ones (the models are written as mmCIF, which
# holds any chain name; refine-model writes refined.pdb only where the PDB format holds them)
CHAIN_NAMES = ONE_CHAR + [a + b for a in ONE_CHAR[:26] for b in ONE_CHAR]


def _clean(st: gemmi.Structure) -> gemmi.Structure:
    st.setup_entities()
    st.remove_hydrogens()
    st.remove_alternative_conformations()
    st.remove_empty_chains()
    return st


def unit_6msm(work: Path) -> gemmi.Structure:
    import bz2

    p = work / "6msm.pdb"
    if not p.exists():
        p.write_bytes(bz2.decompress(sdist_file(work, MDAT, "MDAnalysisTests/data/6msm.pdb.bz2", "6msm.pdb.bz2").read_bytes()))
    return _clean(gemmi.read_structure(str(p)))


def unit_1hvr(work: Path) -> gemmi.Structure:
    """The protease dimer with XK2 and the RNA hairpin side by side, as one unit."""
    p = work / "1hvr.pdb"
    if not p.exists():
        sdist_file(work, MDAT, "MDAnalysisTests/data/1hvr.pdb", "1hvr.pdb")
    st = _clean(gemmi.read_structure(str(p)))
    rna = _clean(gemmi.read_structure(str(ROOT / "tests" / "data" / "rna_1k5i.pdb")))
    lo = np.array([c.atom.pos.tolist() for c in st[0].all()]).max(0)
    rx = np.array([c.atom.pos.tolist() for c in rna[0].all()])
    shift = lo - rx.min(0) + np.array([6.0, 0.0, 0.0])
    shift[1:] = (np.array([c.atom.pos.tolist() for c in st[0].all()]).mean(0) - rx.mean(0))[1:]
    for ch in rna[0]:
        ch.name = "R"
        for r in ch:
            for a in r:
                a.pos = gemmi.Position(*(np.array(a.pos.tolist()) + shift))
        st[0].add_chain(ch)
    return st


UNITS = {"6msm": unit_6msm, "1hvr": unit_1hvr}


def _n_atoms(st) -> int:
    return sum(1 for _ in st[0].all())


def fragment(st: gemmi.Structure, n_atoms: int) -> gemmi.Structure:
    """The first residues of the first chain up to ``n_atoms`` atoms."""
    out = gemmi.Structure()
    out.cell, out.spacegroup_hm = st.cell, st.spacegroup_hm
    model = gemmi.Model("1")
    ch = gemmi.Chain(st[0][0].name)
    n = 0
    for r in st[0][0]:
        if n + len(r) > n_atoms:
            break
        ch.add_residue(r)
        n += len(r)
    model.add_chain(ch)
    out.add_model(model)
    return _clean(out)


def tile(unit: gemmi.Structure, n_atoms: int, rng, turn_deg=3.0, shift_A=1.0):
    """Copies of ``unit`` on a compact grid until ``n_atoms``: (truth, start) structures; each
    copy's chains renamed; the start's copies each moved by a random rigid motion."""
    per = _n_atoms(unit)
    copies = max(1, int(round(n_atoms / per)))
    if copies * len(unit[0]) > len(CHAIN_NAMES):
        raise SystemExit(f"too many chains for {copies} copies")
    x = np.array([c.atom.pos.tolist() for c in unit[0].all()])
    size = x.max(0) - x.min(0) + 8.0
    # a near-cubic arrangement: the fewest copies along the longest edge
    best = None
    for a in range(1, copies + 1):
        for b in range(1, copies + 1):
            c = math.ceil(copies / (a * b))
            ext = np.array([a, b, c]) * size
            if best is None or ext.max() < best[0]:
                best = (ext.max(), (a, b, c))
    dims = best[1]
    truth, start = gemmi.Structure(), gemmi.Structure()
    for s in (truth, start):
        s.add_model(gemmi.Model("1"))
    names = iter(CHAIN_NAMES)
    k = 0
    for i in range(dims[0]):
        for j in range(dims[1]):
            for m in range(dims[2]):
                if k == copies:
                    break
                k += 1
                off = np.array([i, j, m]) * size - x.min(0)
                ax = rng.normal(size=3)
                ax /= np.linalg.norm(ax)
                t = math.radians(turn_deg)
                kk = np.array([[0, -ax[2], ax[1]], [ax[2], 0, -ax[0]], [-ax[1], ax[0], 0]])
                rot = np.eye(3) + math.sin(t) * kk + (1 - math.cos(t)) * kk @ kk
                d = rng.normal(size=3)
                d *= shift_A / np.linalg.norm(d)
                cen = x.mean(0)
                for ch in unit[0]:
                    name = next(names)
                    for s, moved in ((truth, False), (start, True)):
                        c2 = ch.clone()
                        c2.name = name
                        for r in c2:
                            for a in r:
                                p = np.array(a.pos.tolist())
                                if moved:
                                    p = rot @ (p - cen) + cen + d
                                a.pos = gemmi.Position(*(p + off))
                        s[0].add_chain(c2)
    for s in (truth, start):
        s.setup_entities()
    return truth, start, copies


def smooth_box(n: int) -> int:
    """The least even box >= ``n`` with no prime factor over 7 (cryo-EM boxes are chosen so:
    an FFT of a box with a large prime factor, 218 = 2 x 109, costs 5x per voxel on this CPU)."""
    while True:
        m = n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1 and n % 2 == 0:
            return n
        n += 1


def largest_prime_factor(n: int) -> int:
    p, big = 2, 1
    while p * p <= n:
        while n % p == 0:
            n //= p
            big = p
        p += 1
    return max(big, n)


def local_map(st: gemmi.Structure, out: Path, resolution=4.0, apix=1.2, pad=8.0, noise=0.1, seed=0, box="smooth"):
    """Heavy atoms as Gaussians (sigma 0.225 x resolution, weight = atomic number) summed in a
    +-3.5 sigma window each, white noise added; a cube with its origin, written to ``out``."""
    import mrcfile

    xyz = np.array([c.atom.pos.tolist() for c in st[0].all()])
    z = np.array([c.atom.element.atomic_number for c in st[0].all()], float)
    lo = xyz.min(0) - pad
    n = int(math.ceil((xyz.max(0) - lo + pad).max() / apix))
    n = smooth_box(n) if box == "smooth" else n + n % 2
    sig = 0.225 * resolution
    r = int(math.ceil(3.5 * sig / apix))
    off = np.arange(-r, r + 1)
    m = np.zeros(n ** 3)
    for c0 in range(0, len(xyz), 2048):
        u = (xyz[c0:c0 + 2048] - lo) / apix
        base = np.round(u).astype(int)
        idx = base[:, :, None] + off[None, None, :]  # [B, 3, K]
        g = np.exp(-0.5 * ((idx - u[:, :, None]) * apix / sig) ** 2)
        ok = (idx >= 0) & (idx < n)
        g *= ok
        idx = np.clip(idx, 0, n - 1)
        w = z[c0:c0 + 2048, None, None, None] * g[:, 2, :, None, None] * g[:, 1, None, :, None] * g[:, 0, None, None, :]
        flat = (idx[:, 2, :, None, None] * n + idx[:, 1, None, :, None]) * n + idx[:, 0, None, None, :]
        np.add.at(m, flat.reshape(-1), w.reshape(-1))
    m = m.reshape(n, n, n)
    m += np.random.default_rng(seed).normal(scale=noise * m.std(), size=m.shape)
    with mrcfile.new(out, overwrite=True) as f:
        f.set_data(m.astype(np.float32))
        f.voxel_size = apix
        f.header.origin.x, f.header.origin.y, f.header.origin.z = lo
    return n


def _ca(path):
    st = gemmi.read_structure(str(path))
    return {(c.chain.name, c.residue.seqid.num, c.residue.seqid.icode): np.array(c.atom.pos.tolist())
            for c in st[0].all() if c.atom.name in ("CA", "P")}


def _rmsd(a, b):
    ks = [k for k in a if k in b]
    return float(np.sqrt(np.mean([((a[k] - b[k]) ** 2).sum() for k in ks])))


def step_seconds(log: list) -> dict:
    """Seconds per Adam step of each stage kind (median over its phases) from report.json's log."""
    per = {}
    prev = None
    for row in log:
        if "step" in row and prev is not None and prev.get("phase") == row["phase"] and row["step"] > prev["step"]:
            ph = row["phase"]
            kind = "rigid" if ph.startswith(("rigid", "d_")) else ph.split("_")[0]
            per.setdefault(kind, []).append((row["t_s"] - prev["t_s"]) / (row["step"] - prev["step"]))
        prev = row if "step" in row else None
    return {k: float(np.median(v)) for k, v in per.items()}


def make_case(family: str, n_atoms: int, work: Path, box: str = "smooth") -> tuple[Path, dict]:
    """truth.cif, start.cif (mmCIF: any number of chains) and map.mrc of one size in
    ``work/family_n`` (``box``: "smooth", the least box with prime factors <= 7 that holds the
    model, or "tight", the least even box, as before 2026-12-02 19:20), made once (kept with
    case.json and reused: the same seeds make the same files). Returns the folder and {atoms,
    copies, chains, map_box}."""
    w = work / f"{family}_{n_atoms}" if box == "smooth" else work / f"{family}_{n_atoms}_tight"
    info = w / "case.json"
    if info.exists() and all((w / f).exists() for f in ("truth.cif", "start.cif", "map.mrc")):
        return w, json.loads(info.read_text())
    w.mkdir(parents=True, exist_ok=True)
    unit = UNITS[family](work)
    if n_atoms < 0.6 * _n_atoms(unit):
        unit = fragment(unit, n_atoms)
    truth, start, copies = tile(unit, n_atoms, np.random.default_rng(n_atoms))
    truth.make_mmcif_document().write_file(str(w / "truth.cif"))
    start.make_mmcif_document().write_file(str(w / "start.cif"))
    n = local_map(truth, w / "map.mrc", box=box)
    meta = {"atoms": _n_atoms(truth), "copies": copies, "chains": len(truth[0]), "map_box": n,
            "map_box_rule": box, "map_box_largest_prime_factor": largest_prime_factor(n)}
    info.write_text(json.dumps(meta))
    return w, meta


def run_size(family: str, n_atoms: int, work: Path, steps: int | None, stages=None, box: str = "smooth",
             threads: int | None = None) -> dict:
    w, meta = make_case(family, n_atoms, work, box)
    copies, box = meta["copies"], meta["map_box"]
    cmd = [sys.executable, "-m", "cryogmm.cli", "refine-model", str(w / "start.cif"), "--map", str(w / "map.mrc"),
           "--resolution", "4", "--out", str(w / "run")]
    if steps:
        cmd += ["--steps", str(steps)]
    if stages:
        cmd += ["--stages", *stages]
    if threads:
        cmd += ["--threads", str(threads)]
    load0 = [round(v, 2) for v in os.getloadavg()]
    shutil.rmtree(w / "run", ignore_errors=True)
    t0 = time.time()
    with open(w / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    if status != 0:
        raise SystemExit(f"{family} {n_atoms}: refine-model failed: {(w / 'stderr.txt').read_text()[-2000:]}")
    rep = json.loads((w / "run" / "report.json").read_text())
    ca_t, ca_s, ca_r = _ca(w / "truth.cif"), _ca(w / "start.cif"), _ca(w / "run" / "refined.cif")
    if len(ca_r) != len(ca_s):
        raise SystemExit(f"{family} {n_atoms}: refined.cif lost chains or residues ({len(ca_r)} of {len(ca_s)} CA/P)")
    lb = [r for r in rep["log"] if "evaluations" in r]
    row = {
        "family": family, "atoms": meta["atoms"], "copies": copies, "chains": meta["chains"], "map_box": box, "steps_per_phase": rep["steps_per_phase"],
        "wall_s": round(wall, 1), "cpu_s": round(ru.ru_utime + ru.ru_stime, 1), "peak_rss_GB": round(ru.ru_maxrss / 2**20, 3),
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2), "load_avg_at_start": load0,
        "load_avg_at_end": [round(v, 2) for v in os.getloadavg()], "torch_threads": threads or "refine-model's default",
        "s_per_step": step_seconds(rep["log"]), "stage_seconds": rep["stage_seconds"],
        "lbfgs_evaluations": sum(r["evaluations"] for r in lb),
        "ca_p_rmsd_start_A": round(_rmsd(ca_t, ca_s), 3), "ca_p_rmsd_refined_A": round(_rmsd(ca_t, ca_r), 3),
        "after": {k: rep["after"].get(k) for k in ("bond_rmsz", "angle_rmsz", "rama_outlier_pct", "rotamer_outlier_pct",
                                                   "clashscore", "map_cc_mask")},
    }
    row["stages"] = stages or "default"
    row["torch_version"] = torch.__version__
    import platform

    row["measured"] = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t0)), "host": platform.node(),
                       "refine_model_command": " ".join(["python", *cmd[1:]]), "cpu_count": os.cpu_count()}
    print(json.dumps(row), flush=True)
    return row


def _slopes(lo: dict, hi: dict) -> dict:
    """Log-log slopes of seconds per step (each stage) and peak RSS between two sizes (1 = linear);
    with whole runs also of the wall and CPU seconds and each stage's seconds, and the ratio of
    the seconds per atom (``per_atom_ratio``: 1 = time grows as the atoms)."""
    n = math.log(hi["atoms"] / lo["atoms"])
    out = {k: round(math.log(hi["s_per_step"][k] / lo["s_per_step"][k]) / n, 3) for k in lo["s_per_step"]
           if k in hi["s_per_step"]}
    out["peak_rss"] = round(math.log(hi["peak_rss_GB"] / lo["peak_rss_GB"]) / n, 3)
    for k in ("wall_s", "cpu_s"):
        out[k] = round(math.log(hi[k] / lo[k]) / n, 3)
    out["stage_seconds"] = {k: round(math.log(hi["stage_seconds"][k] / lo["stage_seconds"][k]) / n, 3)
                            for k in lo["stage_seconds"] if k in hi["stage_seconds"] and lo["stage_seconds"][k] > 0}
    out["per_atom_ratio"] = {k: round((hi[k] / hi["atoms"]) / (lo[k] / lo["atoms"]), 3) for k in ("wall_s", "cpu_s")}
    return out


# ----------------------------------------------------------------------------- objective mode

KINDS = ("rigid", "residue", "full")
# the map term each kind's stage scores with: the last rigid level's 3 Å blur, the residue
# stage's 1.5 Å, the full-atom stage's none
BLUR = {"rigid": 3.0, "residue": 1.5, "full": 0.0}


def _rss_GB() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class Objective:
    """One size's refinement objective, built as refine-model builds it (topology, restraints,
    map terms, the Refiner) and evaluated through ``Refiner.step_loss`` (the body of every Adam
    step of the rigid, residue and full-atom stages): value and gradient of ``w x geometry -
    map score`` for the rigid-patch (``n_patches``), per-residue and per-atom parameterisations."""

    def __init__(self, folder: Path, resolution: float = 4.0):
        from cryogmm.model.refine.config import RefineModelConfig
        from cryogmm.model.refine.job import checked_config, read_inputs
        from cryogmm.model.refine.mapterm import MapTerm
        from cryogmm.model.refine.refiner import Refiner

        cfg = checked_config(RefineModelConfig(model=folder / "start.cif", map=folder / "map.mrc",
                                               resolution_A=resolution, out=folder / "objective"))
        topo, grid = read_inputs(cfg)
        self.rf = rf = Refiner(topo, cfg, grid)
        self.maps = {k: MapTerm(grid, resolution, cfg.similarity, rf.amp, blur_A=b, dtype=rf.dt, device=rf.dev)
                     for k, b in BLUR.items()}
        self.par = {"rigid": rf.rigid_parameters(rf.patch_labels(cfg.n_patches)),
                    "residue": rf.rigid_parameters(rf.residue_labels())}
        x0 = rf.x_all[rf.move_t].detach().clone()
        self.par["full"] = ([torch.zeros_like(x0, requires_grad=True)], lambda ps: x0 + ps[0], {})
        self.n_atoms = int((~topo.is_h).sum())

    def step(self, kind: str):
        """One step's work: the objective and its gradient."""
        params, fn, skip = self.par[kind]
        for q in params:
            q.grad = None
        with self.rf.rs.weights_set(**skip):
            loss = self.rf.step_loss(params, fn, self.maps[kind], 1.0)[0]
            loss.backward()
        return loss

    def pairs(self):
        """The contact list's rebuild (every 10th step of a phase)."""
        with torch.no_grad():
            params, fn, _ = self.par["full"]
            self.rf.rs.update_pairs(self.rf.assemble(fn(params)))


def _stats(v):
    v = np.asarray(v, float)
    med = float(np.median(v))
    return {"median": round(med, 5), "min": round(float(v.min()), 5), "max": round(float(v.max()), 5),
            "spread_pct": round(100.0 * float(v.max() - v.min()) / med, 1) if med > 0 else None, "n": len(v)}


def _fit_slope(atoms, secs):
    """Least-squares slope of log(seconds) on log(atoms) (1 = linear)."""
    return round(float(np.polyfit(np.log(atoms), np.log(secs), 1)[0]), 3)


def objective_mode(family: str, sizes, work: Path, rounds: int, steps: int, threads: int,
                   profile: Path | None = None, box: str = "smooth") -> dict:
    """Every size's objective built in this process, then ``rounds`` rounds, each timing
    ``steps`` steps of every kind at every size in turn (round-robin, the size order rotated
    each round), so that a change of the machine's load falls on all sizes alike. Per size and
    kind: CPU seconds (``process_time``, all threads) and wall seconds per step, median and
    spread over the rounds."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    objs, rows = {}, {}
    for n in sizes:
        folder, meta = make_case(family, n, work, box)
        r0, c0, t0 = _rss_GB(), time.process_time(), time.time()
        objs[n] = Objective(folder)
        objs[n].step("full")  # warm-up (first calls allocate)
        rows[n] = {"family": family, "mode": "objective", **meta, "heavy_atoms_in_topology": objs[n].n_atoms,
                   "map_term_box": {k: int(m.ref.shape[0]) for k, m in objs[n].maps.items()},
                   "contact_pairs": int(len(objs[n].rf.rs.pairs)),
                   "build_cpu_s": round(time.process_time() - c0, 1), "build_wall_s": round(time.time() - t0, 1),
                   "rss_added_by_build_GB": round(_rss_GB() - r0, 3)}
        print(json.dumps(rows[n]), flush=True)
    cpu = {n: {k: [] for k in (*KINDS, "pairs")} for n in sizes}
    wall = {n: {k: [] for k in (*KINDS, "pairs")} for n in sizes}
    loads = []
    for r in range(rounds):
        order = list(sizes[r % len(sizes):]) + list(sizes[:r % len(sizes)])
        loads.append([round(v, 2) for v in os.getloadavg()])
        for n in order:
            ob = objs[n]
            for k in KINDS:
                c0, t0 = time.process_time(), time.time()
                for _ in range(steps):
                    ob.step(k)
                cpu[n][k].append((time.process_time() - c0) / steps)
                wall[n][k].append((time.time() - t0) / steps)
            c0, t0 = time.process_time(), time.time()
            ob.pairs()
            cpu[n]["pairs"].append(time.process_time() - c0)
            wall[n]["pairs"].append(time.time() - t0)
        print(f"round {r + 1}/{rounds} load {loads[-1]}: " + ", ".join(
            f"{n}: full {cpu[n]['full'][-1]:.3f} s" for n in sizes), flush=True)
    loads.append([round(v, 2) for v in os.getloadavg()])
    out = []
    for n in sizes:
        row = rows[n]
        row["cpu_s_per_step"] = {k: _stats(v) for k, v in cpu[n].items()}
        row["wall_s_per_step"] = {k: _stats(v) for k, v in wall[n].items()}
        # an Adam step as refine-model runs it: the objective, and a tenth of a contact rebuild
        row["cpu_s_per_adam_step"] = {k: round(row["cpu_s_per_step"][k]["median"]
                                               + row["cpu_s_per_step"]["pairs"]["median"] / 10, 5) for k in KINDS}
        out.append(row)
    atoms = [r["atoms"] for r in out]
    growth = {}
    if len(out) >= 2:
        for k in (*KINDS, "pairs"):
            med = [r["cpu_s_per_step"][k]["median"] for r in out]
            wmed = [r["wall_s_per_step"][k]["median"] for r in out]
            growth[k] = {"cpu_fit": _fit_slope(atoms, med), "wall_fit": _fit_slope(atoms, wmed),
                         "cpu_consecutive": {f"{a}->{b}": round(math.log(mb / ma) / math.log(b / a), 3)
                                             for a, b, ma, mb in zip(atoms, atoms[1:], med, med[1:])}}
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        for n in sizes:
            for k in KINDS:
                from torch.profiler import ProfilerActivity, profile as tprof

                with tprof(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                    objs[n].step(k)
                (profile / f"{family}_{n}_{k}.txt").write_text(
                    prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    return {"family": family, "rows": out, "growth_exponent": growth, "load_avg_per_round": loads,
            "rounds": rounds, "steps_per_round": steps, "threads": threads,
            "peak_rss_of_this_process_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def scans_mode(family: str, sizes, work: Path, box: str = "smooth") -> list:
    """CPU seconds (``process_time``, one torch thread) of the model scans and checks each size's
    refinement runs outside its Adam and L-BFGS steps, on the start model as refine-model reads it:
    the peptide-flip, base-flip and side-chain scans of the rotamer stage (the peptide scan runs
    at 3.5 Å or better; timed here at the 4 Å map all the same), the peptide turns of the polish
    (``flip_for_rama`` on the start's Ramachandran outliers), the contact-list rebuild, and the
    validation and map figures of report.json. Each scan starts from the same model."""
    from cryogmm.model import rotamers as R
    from cryogmm.model.validate import map_figures, rama_table, validate_coords

    torch.set_num_threads(1)
    out = []
    for n in sizes:
        folder, meta = make_case(family, n, work, box)
        c0 = time.process_time()
        from cryogmm.model.refine.config import RefineModelConfig
        from cryogmm.model.refine.job import checked_config, read_inputs
        from cryogmm.model.refine.refiner import Refiner

        cfg = checked_config(RefineModelConfig(model=folder / "start.cif", map=folder / "map.mrc", resolution_A=4.0,
                                               out=folder / "scans"))
        topo, grid = read_inputs(cfg)
        rf = Refiner(topo, cfg, grid)
        row = {"family": family, "mode": "scans", **meta, "build_cpu_s": round(time.process_time() - c0, 3)}
        x0 = rf.x_all.clone()

        def timed(name, f):
            c = time.process_time()
            r = f()
            row[name] = round(time.process_time() - c, 3)
            rf.x_all = x0.clone()
            return r

        timed("fit_peptides_cpu_s", lambda: R.fit_peptides(rf, grid))
        timed("fit_bases_cpu_s", lambda: R.fit_bases(rf, grid))
        timed("fit_side_chains_cpu_s", lambda: R.fit_side_chains(rf, grid))
        xh = rf.rs.with_h(x0)
        verdict = rama_table(rf.rs, xh)[3]
        out_res = [int(topo.rama_res[k]) for k, v in enumerate(verdict) if v == "outlier"]
        row["rama_outliers_at_start"] = len(out_res)
        timed("flip_for_rama_cpu_s", lambda: R.flip_for_rama(rf.rs, xh, out_res))
        timed("contact_pairs_cpu_s", lambda: rf.rs.update_pairs(xh))
        xn = xh.detach().cpu().numpy()
        timed("validate_coords_cpu_s", lambda: validate_coords(topo, xn, rf.rs))
        timed("map_figures_cpu_s", lambda: map_figures(topo, xn, grid, 4.0))
        row["rss_GB"] = round(_rss_GB(), 3)
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def _label(argv) -> dict:
    import platform

    return {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "host": platform.node(),
            "command": "python benchmarks/refine_model_scale.py " + " ".join(argv),
            "load_avg_at_start": [round(v, 2) for v in os.getloadavg()], "cpu_count": os.cpu_count()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("run", "objective", "scans"), default="run",
                    help="run: refine-model per size (wall, peak RSS, s/step from its log); objective: the "
                         "stages' objective timed in one process, sizes interleaved (CPU s/step)")
    ap.add_argument("--family", nargs="+", default=list(UNITS), choices=list(UNITS))
    ap.add_argument("--sizes", nargs="*", type=int, default=[2000, 10000, 50000, 100000])
    ap.add_argument("--steps", type=int, default=None,
                    help="run: Adam steps per phase (default: refine-model's); objective: steps per size per round (5)")
    ap.add_argument("--stages", nargs="+", default=None, help="refine-model stages (default: its own)")
    ap.add_argument("--rounds", type=int, default=5, help="objective: round-robin rounds over the sizes")
    ap.add_argument("--threads", type=int, default=1, help="objective: torch threads (1: CPU time = work)")
    ap.add_argument("--run-threads", type=int, default=None,
                    help="run: refine-model's --threads (default: its own, 2)")
    ap.add_argument("--key", default="rows",
                    help="run: the results key the rows go to (default rows; e.g. default_settings_rows for "
                         "runs with refine-model's default stages and steps)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="objective: write torch-profiler tables of one step per kind and size into this folder")
    ap.add_argument("--box", choices=("smooth", "tight"), default="smooth",
                    help="map box: smooth (prime factors <= 7, as cryo-EM boxes are) or tight (least even box)")
    ap.add_argument("--rows", type=Path, nargs="*", default=[],
                    help="rows measured earlier (JSON lines this script printed) to include in the table")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench/scale"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "refine_model_scale.json")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    label = _label(argv)
    res = json.loads(a.out.read_text()) if a.out.exists() else {"resolution_A": 4.0, "apix_A": 1.2, "rows": []}
    if a.mode == "scans":
        for f in a.family:
            rows = scans_mode(f, sorted(a.sizes), a.work, a.box)
            keys = [k for k in rows[0] if k.endswith("_cpu_s") and k != "build_cpu_s"]
            growth = {k: {f"{lo['atoms']}->{hi['atoms']}": round(math.log(hi[k] / lo[k]) / math.log(hi["atoms"] / lo["atoms"]), 3)
                          for lo, hi in zip(rows, rows[1:]) if lo[k] > 0 and hi[k] > 0} for k in keys}
            r = {"family": f, "rows": rows, "growth_exponent": growth, **label,
                 "load_avg_at_end": [round(v, 2) for v in os.getloadavg()], "torch_version": torch.__version__}
            print(json.dumps(growth), flush=True)
            res.setdefault("scan_runs", []).append(r)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(res, indent=1) + "\n")
        return
    if a.mode == "objective":
        for f in a.family:
            r = objective_mode(f, sorted(a.sizes), a.work, a.rounds, a.steps or 5, a.threads, a.profile, a.box)
            r.update(label)
            r["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()]
            print(json.dumps(r["growth_exponent"]), flush=True)
            res.setdefault("objective_runs", []).append(r)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(res, indent=1) + "\n")
        return
    new = [json.loads(line) for p in a.rows for line in p.read_text().splitlines() if line.startswith("{\"family")]
    new += [run_size(f, n, a.work, a.steps, a.stages, a.box, a.run_threads) for f in a.family for n in a.sizes]
    for r in new:
        r.setdefault("measured", label)
    rows = res.get(a.key, []) + new
    rows.sort(key=lambda r: (r["family"], r["atoms"], r.get("measured", {}).get("date_utc", "")))
    gkey = "growth_exponent" if a.key == "rows" else f"{a.key}_growth_exponent"
    growth = res.get(gkey, {})
    for f in a.family:
        rs = [r for r in new if r["family"] == f]
        rs.sort(key=lambda r: r["atoms"])
        if len(rs) >= 2:
            growth[f"{f} ({label['date_utc']})"] = {
                "smallest_to_largest": _slopes(rs[0], rs[-1]),
                "consecutive": {f"{lo['atoms']}->{hi['atoms']}": _slopes(lo, hi) for lo, hi in zip(rs, rs[1:])}}
    res.update({a.key: rows, gkey: growth})
    print(json.dumps(growth))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
