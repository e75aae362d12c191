"""Heterogeneity on frames that carry thermal noise (issue 18, item 1): a targeted OpenMM
simulation between two conformations, particles projected by RELION's ``relion_project``.

Per molecule (``1hvr``: HIV-1 protease dimer from the MDAnalysisTests 2.11.0 sdist, second
state made by turning chain B 20° about the dimer's centre; ``adk``: adenylate kinase 4AKE ->
1AKE superposed on the CORE, from ../shared/data/structures):

1. OpenMM (a benchmark tool only, ``pip install openmm`` into the venv that runs this): amber14,
   vacuum with a 1.0 nm cutoff, hydrogens added, Langevin 300 K, 2 fs. Every Cα is held by a
   harmonic restraint (``--k-restraint`` kcal/mol/Å^2) to a target that moves in ``--windows``
   steps along the straight line from the start's Cα to the end state's Cα; in each window,
   after ``--settle`` steps, ``--snapshots`` frames are saved ``--stride`` steps apart. The
   frames keep their thermal jitter (the restraint holds only the Cα to the path, side chains and
   the Cα within its well move freely). Heavy atoms only are kept; the reference model is the
   first frame.
2. Per frame a noise-free map (all heavy atoms, Gaussians at ``--map-res`` Å, centred on the
   reference's centre of mass, as ``hetero train`` places the reference), then ``relion_project
   --ctf`` of that frame's particles (random uniform poses, shifts sd 2 Å, defocus 1-2.5 µm,
   300 kV); particles are split evenly over the frames (one frame per particle). White Gaussian
   noise at each ``--snr`` (signal variance over the box / SNR).
3. ``hetero train`` with both decoders (``--epochs``, ``--n``), latents at the encoder's mean
   (``posterior_mean``), polished (``polished``) and, when training wrote them, the posterior means
   over k-means candidates (``posterior_over_candidates``: what ``analyze`` reads), decoded
   full-atom models; figures: |Spearman| of latent PC1 vs the
   true frame, median and p90 Cα RMSD decoded vs true frame, decoded vs the reference for the
   particles of the first window (whose restraint target is the reference's), and the bounds:

   - ``thermal_floor``: Cα RMSD of every frame to the mean of its window (the jitter no single
     image at this SNR can resolve: an ideal decoder of the path lands at the window mean);
   - ``decoder_fit``: the trained decoder's best model of each true frame (its latent fitted to
     the frame's Cα coordinates directly, no images): what the decoder can express;
   - ``segments_family_fit`` (segments): free rigid motions of the run's learned segments
     fitted to each frame's Cα, starting from the decoder's own fit.

4. Ceilings (``ceilings``, unless ``--no-ceiling``): the true structures' order along the path,
   and a Bayes path oracle on the particles themselves (true poses, CTF, noise; expected image
   of every path window by ``relion_project``), in the full band and in 6/8 Å loss bands.
5. ``--cryodrgn``: cryoDRGN ``train_vae`` on the same particles (installed in the running venv:
   ``pip install cryodrgn==4.3.1 torch==2.13.0``), |Spearman| of its latent PC1; ``summary_n{N}``
   puts every run of a SNR beside the ceilings and the peer.

Usage (a few minutes of MD per molecule, then ~4 min of training per decoder and SNR on 2 cores):
  python benchmarks/hetero_thermal.py --work /tmp/hetero_thermal --molecules 1hvr adk \
      --snr 0.1 0.01 --n 4000 --epochs 20 --json benchmarks/results/hetero_thermal.json
  # frames, particles and ceilings only; then the peer (5 epochs: ~30 min per SNR on 2 cores)
  python benchmarks/hetero_thermal.py --molecules 1hvr adk --n 2000 --decoders
  python benchmarks/hetero_thermal.py --molecules 1hvr --n 2000 --decoders --no-ceiling \
      --cryodrgn --cryodrgn-epochs 5
  # the 2026-12-03 comparison (one process per molecule and decoder, each with its own --json,
  # merged afterwards): the new defaults, and the earlier fixed 8 Å band without polish
  python benchmarks/hetero_thermal.py --work /tmp/hthermal --molecules 1hvr --snr 0.1 --n 2000 \
      --decoders segments --no-ceiling --threads 1 --label defaults --json /tmp/hthermal/res/a.json
  python benchmarks/hetero_thermal.py --work /tmp/hthermal --molecules 1hvr --snr 0.1 --n 2000 \
      --decoders segments --no-ceiling --threads 1 --label fixed8 \
      --set lowpass_A=8 lowpass_start_A=8 polish_steps=0 --json /tmp/hthermal/res/b.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
MDAT = "mdanalysistests==2.11.0"


# --------------------------------------------------------------------------- structures
def _rotmat(axis, deg):
    a = np.asarray(axis, float)
    a /= np.linalg.norm(a)
    t = np.deg2rad(deg)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def clean_pdb(src: Path, out: Path, chains=None):
    """Protein heavy atoms of the first model (no waters, ligands, altlocs, hydrogens)."""
    import gemmi

    st = gemmi.read_structure(str(src))
    del st[1:]
    st.remove_hydrogens()
    st.remove_alternative_conformations()
    for ch in st[0]:  # S-hydroxycysteine (1hvr) as cysteine, so that the force field has its template
        for res in ch:
            if res.name == "CSO":
                res.name, res.het_flag = "CYS", "A"
                for i in reversed(range(len(res))):
                    if res[i].name == "OD":
                        del res[i]
    st.remove_ligands_and_waters()
    if chains:
        for ch in list(st[0]):
            if ch.name not in chains:
                st[0].remove_chain(ch.name)
    st.remove_empty_chains()
    st.setup_entities()
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # atomic: runs of one molecule may start together
    st.write_pdb(str(tmp))
    os.replace(tmp, out)
    return out


def molecule(name: str, work: Path):
    """(start PDB, end-state Cα target ``[n_ca, 3]`` in the start's frame) of a case."""
    from cryogmm.hetero.truth import ADK_CORE, superpose_file
    from cryogmm.io.structures import read_model

    if name == "1hvr":
        from refine_model_whole import sdist_file

        raw = sdist_file(work, MDAT, "MDAnalysisTests/data/1hvr.pdb", "1hvr_raw.pdb")
        start = clean_pdb(raw, work / "1hvr_start.pdb")
        m = read_model(start)
        ca = m.atom_name == "CA"
        xyz = m.coords[0][ca]
        centre = m.coords[0].mean(0)
        moving = m.chain[ca] == "B"
        end = xyz.copy()
        end[moving] = (xyz[moving] - centre) @ _rotmat((0.3, 1.0, 0.2), 20.0).T + centre
        return start, end
    if name == "adk":
        data = ROOT.parent / "shared" / "data" / "structures"
        if not data.is_dir():
            data = Path("/work/shared/data/structures")
        start = clean_pdb(data / "adk_open.pdb", work / "adk_start.pdb")
        closed = clean_pdb(data / "adk_closed.pdb", work / "adk_closed_clean.pdb")
        sup = work / "adk_closed_on_open.pdb"
        tmp = work / f"adk_closed_on_open.{os.getpid()}.pdb"
        superpose_file(closed, start, tmp, ADK_CORE)
        os.replace(tmp, sup)
        ms, me = read_model(start), read_model(sup)
        key = lambda m, i: (m.chain[i], int(m.seq_id[i]))  # noqa: E731
        ce = {key(me, i): me.coords[0][i] for i in np.flatnonzero(me.atom_name == "CA")}
        cs = np.flatnonzero(ms.atom_name == "CA")
        return start, np.array([ce[key(ms, i)] for i in cs])
    raise SystemExit(f"unknown molecule {name}")


# --------------------------------------------------------------------------- targeted MD
def targeted_md(start: Path, end_ca: np.ndarray, out_dir: Path, windows: int, snapshots: int, settle: int,
                stride: int, k_kcal: float, seed: int):
    """Frames (heavy atoms, Å) ``[windows * snapshots, M, 3]``, written as ``frames.pdb`` (first
    frame also as ``reference.pdb``); returns the record of the run."""
    import openmm
    from openmm import app, unit

    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "md.json").exists():
        return json.loads((out_dir / "md.json").read_text())
    t0 = time.perf_counter()
    pdb = app.PDBFile(str(start))
    ff = app.ForceField("amber14-all.xml")
    mod = app.Modeller(pdb.topology, pdb.positions)
    mod.addHydrogens(ff, pH=7.0)
    system = ff.createSystem(mod.topology, nonbondedMethod=app.CutoffNonPeriodic, nonbondedCutoff=1.0 * unit.nanometer,
                             constraints=app.HBonds)
    atoms = list(mod.topology.atoms())
    ca = [a.index for a in atoms if a.name == "CA"]
    if len(ca) != len(end_ca):
        raise SystemExit(f"{start}: {len(ca)} Cα after hydrogens but {len(end_ca)} in the end state")
    pos0 = np.array(mod.positions.value_in_unit(unit.angstrom))
    start_ca = pos0[ca]
    force = openmm.CustomExternalForce("0.5*k*((x-x0)^2+(y-y0)^2+(z-z0)^2)")
    force.addGlobalParameter("k", k_kcal * 4.184 * 100.0)  # kcal/mol/Å^2 -> kJ/mol/nm^2
    for p in ("x0", "y0", "z0"):
        force.addPerParticleParameter(p)
    for i, a in enumerate(ca):
        force.addParticle(a, (start_ca[i] / 10.0).tolist())
    system.addForce(force)
    integ = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1.0 / unit.picosecond, 0.002 * unit.picoseconds)
    integ.setRandomNumberSeed(seed + 1)
    platform_ = openmm.Platform.getPlatformByName("CPU")
    sim = app.Simulation(mod.topology, system, integ, platform_, {"Threads": "1"})
    sim.context.setPositions(mod.positions)
    sim.minimizeEnergy(maxIterations=100)
    sim.context.setVelocitiesToTemperature(300 * unit.kelvin, seed + 2)
    sim.step(settle)
    heavy = [a.index for a in atoms if a.element is not None and a.element.symbol != "H"]
    frames, window_of = [], []
    for w in range(windows):
        f = w / max(1, windows - 1)
        target = (1 - f) * start_ca + f * end_ca
        for i, a in enumerate(ca):
            force.setParticleParameters(i, a, (target[i] / 10.0).tolist())
        force.updateParametersInContext(sim.context)
        sim.step(settle)
        for _ in range(snapshots):
            sim.step(stride)
            xyz = sim.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.angstrom)
            frames.append(np.asarray(xyz)[heavy])
            window_of.append(w)
    frames = np.array(frames)
    # heavy-atom topology, written with the start's ids
    keep = app.Modeller(mod.topology, mod.positions)
    keep.delete([a for a in keep.topology.atoms() if a.element is not None and a.element.symbol == "H"])
    with open(out_dir / "frames.pdb", "w") as fh:
        app.PDBFile.writeHeader(keep.topology, fh)
        for i, xyz in enumerate(frames):
            app.PDBFile.writeModel(keep.topology, xyz * unit.angstrom, fh, modelIndex=i + 1, keepIds=True)
        app.PDBFile.writeFooter(keep.topology, fh)
    with open(out_dir / "reference.pdb", "w") as fh:
        app.PDBFile.writeFile(keep.topology, frames[0] * unit.angstrom, fh, keepIds=True)
    np.save(out_dir / "window_of_frame.npy", np.array(window_of))
    rec = {"forcefield": "amber14-all, vacuum, CutoffNonPeriodic 1.0 nm, HBonds constraints",
           "integrator": "LangevinMiddle 300 K, 1/ps, 2 fs", "k_restraint_kcal_per_mol_A2": k_kcal,
           "windows": windows, "snapshots_per_window": snapshots, "settle_steps": settle, "stride_steps": stride,
           "n_frames": len(frames), "n_heavy_atoms": len(heavy), "n_ca": len(ca), "seed": seed,
           "seconds": time.perf_counter() - t0, "openmm": openmm.__version__,
           "start_to_end_ca_rmsd_A": float(np.sqrt(((start_ca - end_ca) ** 2).sum(1).mean()))}
    (out_dir / "md.json").write_text(json.dumps(rec, indent=2))
    return rec


# --------------------------------------------------------------------------- particles
def make_particles(md_dir: Path, out: Path, n: int, box: int, apix: float, snrs, map_res: float, seed: int, log):
    """``particles_snr{snr}.star`` + stacks in ``out``; truth (frame per particle) in ``truth.npy``."""
    import pandas as pd

    from cryogmm.bridge.io import read_particles, write_particles
    from cryogmm.bridge.table import ParticleTable
    from cryogmm.core.gaussians import gaussians_to_map
    from cryogmm.io import maps as mapio
    from cryogmm.io.structures import gaussians_from_coords, read_model

    out.mkdir(parents=True, exist_ok=True)
    if all((out / f"particles_snr{s:g}.star").exists() for s in snrs):
        return
    rng = np.random.default_rng(seed)
    frames = read_model(md_dir / "frames.pdb")
    ref = read_model(md_dir / "reference.pdb")
    center = ref.center_of_mass()
    F = len(frames.coords)
    frame = np.repeat(np.arange(F), int(np.ceil(n / F)))[:n]
    rng.shuffle(frame)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnAmplitudeContrast": [0.1], "rlnSphericalAberration": [2.7], "rlnVoltage": [300.0],
                           "rlnImagePixelSize": [apix], "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    du = rng.uniform(10000, 25000, n)
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@clean.mrcs" for i in range(n)],
        "rlnMicrographName": [f"mic{i // 100:05d}.mrc" for i in range(n)],
        "rlnDefocusU": du, "rlnDefocusV": du + rng.uniform(0, 300, n), "rlnDefocusAngle": rng.uniform(0, 180, n),
        "rlnPhaseShift": np.zeros(n), "rlnCtfBfactor": np.zeros(n), "rlnCtfScalefactor": np.ones(n),
        "rlnAngleRot": rng.uniform(-180, 180, n), "rlnAngleTilt": np.degrees(np.arccos(rng.uniform(-1, 1, n))),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": rng.normal(0, 2.0, n), "rlnOriginYAngst": rng.normal(0, 2.0, n),
        "rlnOpticsGroup": np.ones(n, dtype=int), "rlnRandomSubset": 1 + (np.arange(n) % 2),
    })
    clean = np.zeros((n, box, box), np.float32)
    tmp = out / "proj"
    tmp.mkdir(exist_ok=True)
    for f in range(F):
        sel = np.flatnonzero(frame == f)
        if not len(sel):
            continue
        g = gaussians_from_coords(frames, frames.coords[f], "atoms", resolution_A=map_res, center_A=center)
        mapio.write_map(tmp / "frame.mrc", gaussians_to_map(g, box, apix).numpy(), apix)
        write_particles(ParticleTable(parts.iloc[sel].reset_index(drop=True), optics.copy()), tmp / "frame.star")
        subprocess.run(["relion_project", "--i", "frame.mrc", "--o", "proj", "--ang", "frame.star", "--ctf",
                        "--angpix", str(apix)], cwd=tmp, check=True, stdout=log, stderr=subprocess.STDOUT)
        t = read_particles(tmp / "proj.star")
        from cryogmm.bridge.images import ImageSource

        src = ImageSource.from_table(t)
        clean[sel] = src.images(np.arange(len(sel)))
        src.close()
    signal_var = float(clean.var(axis=(1, 2)).mean())
    with mapio.write_stack(out / "clean.mrcs", n, box, apix) as st:  # noise-free images (for the ceiling)
        st[0:n] = clean
    (out / "particles.json").write_text(json.dumps({"signal_var": signal_var, "noise_sd": {
        f"{s:g}": float(np.sqrt(signal_var / s)) for s in snrs}}, indent=2))
    for s in snrs:
        noise = np.random.default_rng(seed + 100 + int(round(1000 * s))).normal(0, np.sqrt(signal_var / s), clean.shape)
        name = f"particles_snr{s:g}"
        with mapio.write_stack(out / f"{name}.mrcs", n, box, apix) as st:
            st[0:n] = (clean + noise).astype(np.float32)
        p = parts.copy()
        p["rlnImageName"] = [f"{i + 1:06d}@{name}.mrcs" for i in range(n)]
        write_particles(ParticleTable(p, optics.copy()), out / f"{name}.star")
    np.save(out / "frame_of_particle.npy", frame)
    shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- ceilings
def path_progress(frames_ca, window_of_frame) -> np.ndarray:
    """Each frame's position along the path: its Cα coordinates projected on the direction from
    the first window's mean to the last window's mean (Å along that direction / sqrt(n_ca), so
    that the end-to-end distance equals the Cα RMSD between the two window means)."""
    w = np.unique(window_of_frame)
    a = frames_ca[window_of_frame == w[0]].mean(0).ravel()
    b = frames_ca[window_of_frame == w[-1]].mean(0).ravel()
    u = (b - a) / np.linalg.norm(b - a)
    return (frames_ca.reshape(len(frames_ca), -1) - a) @ u / np.sqrt(frames_ca.shape[1])


def ceilings(md_dir: Path, pdir: Path, frames_ca, window_of_frame, frame_of_particle, snrs, box: int, apix: float,
             map_res: float, log) -> dict:
    """What |Spearman| against the true frame any method could reach on these particles.

    - ``structure``: the TRUE structure of each particle's frame, placed on the path by
      :func:`path_progress` (no images): how far thermal jitter alone scrambles the frame order;
    - ``path_oracle``: the Bayes posterior over the path given the image, knowing everything a
      method must learn or infer: the true pose, shift and CTF, the noise level, and the expected
      image of every window (``relion_project`` of the mean of the window's frame maps, the same
      maps and projector the particles were made with). Score ``-|y - P_i(W_w)|^2 / 2 sigma^2``
      per window (uniform prior); the particle's estimate is the posterior mean of the window
      index. ``noise_free`` uses the clean images (nearest window). A method that has to learn
      the path and find the poses does no better than this in expectation; the per-frame thermal
      jitter (each frame is seen by only ``n / frames`` particles) is not part of the model, as
      no method can learn it.
    ``loss_band_abs_spearman_vs_frame``: the same oracle when it sees only the Fourier band a
    loss low-passed at 6 or 8 Å sees (``hetero train --lowpass-A``; default 8 Å).
    Also ``d_prime``: per particle, the distance between the projections of adjacent windows (and
    first-to-last) over the noise sd, medians over particles (below 1: adjacent windows are not
    separable in one image), and ``jitter_over_noise``: |clean image - its window's projection| /
    noise sd (the thermal jitter's image signal that no path model explains).
    """
    import scipy.fft

    from cryogmm.bridge.images import ImageSource
    from cryogmm.bridge.io import read_particles, write_particles
    from cryogmm.core.gaussians import gaussians_to_map
    from cryogmm.hetero.truth import spearman
    from cryogmm.io import maps as mapio
    from cryogmm.io.structures import gaussians_from_coords, read_model

    frame = frame_of_particle
    win = window_of_frame[frame]
    prog = path_progress(frames_ca, window_of_frame)
    res = {"structure": {
        "abs_spearman_true_progress_vs_frame": abs(spearman(prog[frame], frame)),
        "abs_spearman_true_progress_vs_window": abs(spearman(prog[frame], win)),
        "path_length_A": float(prog[window_of_frame == window_of_frame.max()].mean() - prog[window_of_frame == 0].mean()),
        "sd_progress_within_window_A": float(np.median([prog[window_of_frame == w].std()
                                                         for w in np.unique(window_of_frame)])),
        "progress_step_between_windows_A": float(np.median(np.diff([prog[window_of_frame == w].mean()
                                                                    for w in np.unique(window_of_frame)]))),
    }}
    cache = pdir / "window_projections.npy"
    windows = np.unique(window_of_frame)
    if not cache.exists():
        frames = read_model(md_dir / "frames.pdb")
        center = read_model(md_dir / "reference.pdb").center_of_mass()
        tmp = pdir / "proj_windows"
        tmp.mkdir(exist_ok=True)
        t = read_particles(pdir / f"particles_snr{snrs[0]:g}.star")
        parts = t.particles.copy()
        parts["rlnImageName"] = [f"{i + 1:06d}@none.mrcs" for i in range(len(parts))]
        write_particles(type(t)(parts, t.optics.copy()), tmp / "all.star")
        proj = np.zeros((len(windows), len(parts), box, box), np.float32)
        for k, w in enumerate(windows):
            m = np.mean([gaussians_to_map(gaussians_from_coords(frames, frames.coords[f], "atoms", resolution_A=map_res,
                                                                center_A=center), box, apix).numpy()
                         for f in np.flatnonzero(window_of_frame == w)], axis=0)
            mapio.write_map(tmp / "window.mrc", m, apix)
            subprocess.run(["relion_project", "--i", "window.mrc", "--o", "proj", "--ang", "all.star", "--ctf",
                            "--angpix", str(apix)], cwd=tmp, check=True, stdout=log, stderr=subprocess.STDOUT)
            src = ImageSource.from_table(read_particles(tmp / "proj.star"))
            proj[k] = src.images(np.arange(len(parts)))
            src.close()
        np.save(cache, proj)
        shutil.rmtree(tmp, ignore_errors=True)
    proj = np.load(cache).reshape(len(windows), len(frame), -1)
    clean = mapio.read_mrc(pdir / "clean.mrcs")[0].reshape(len(frame), -1)
    noise_sd = json.loads((pdir / "particles.json").read_text())["noise_sd"]
    own = proj[np.searchsorted(windows, win), np.arange(len(frame))]

    def figures(est):
        return {"abs_spearman_vs_frame": abs(spearman(est, frame)), "abs_spearman_vs_window": abs(spearman(est, win))}

    d_clean = ((clean[None] - proj) ** 2).sum(-1)
    nf = figures(windows[d_clean.argmin(0)].astype(float))
    nf["fraction_nearest_window_is_true"] = float((windows[d_clean.argmin(0)] == win).mean())
    res["path_oracle"] = {"noise_free": nf}
    step = np.sqrt(((proj[1:] - proj[:-1]) ** 2).sum(-1))  # [W-1, n]
    span = np.sqrt(((proj[-1] - proj[0]) ** 2).sum(-1))
    jit = np.sqrt(((clean - own) ** 2).sum(-1))
    P = scipy.fft.rfft2(proj.reshape(len(windows), -1, box, box))  # float32 in, complex64 out
    for snr in snrs:
        sd = noise_sd[f"{snr:g}"]
        src = ImageSource.from_table(read_particles(pdir / f"particles_snr{snr:g}.star"))
        y = src.images(np.arange(len(frame))).reshape(len(frame), -1)
        src.close()
        ll = -((y[None] - proj) ** 2).sum(-1).astype(np.float64) / (2 * sd ** 2)  # [W, n]
        post = np.exp(ll - ll.max(0))
        post /= post.sum(0)
        pm = windows @ post
        f = figures(pm)
        f.update({
            "abs_spearman_map_window_vs_frame": abs(spearman(windows[ll.argmax(0)], frame)),
            "median_abs_error_windows": float(np.median(np.abs(pm - win))),
            "d_prime_adjacent_windows_median": float(np.median(step / sd)),
            "d_prime_first_to_last_window_median": float(np.median(span / sd)),
            "jitter_over_noise_median": float(np.median(jit / sd)),
        })
        # the same oracle seeing only the band a loss low-passed at lp Å sees (white noise: the
        # Fourier terms of the distance over the band, Parseval-scaled)
        Y = scipy.fft.rfft2(y.reshape(-1, box, box))
        k = np.sqrt(np.fft.fftfreq(box)[:, None] ** 2 + np.fft.rfftfreq(box)[None] ** 2) / apix
        pairs = np.ones(k.shape)
        pairs[:, 1:(box + 1) // 2] = 2  # rfft columns whose Hermitian mates are not stored
        f["loss_band_abs_spearman_vs_frame"] = {}
        for lp in (6.0, 8.0):
            m = (k <= 1 / lp) * pairs
            llb = -np.stack([(np.abs(Y - P[w]) ** 2 * m).sum((-1, -2)) for w in range(len(windows))]) / (
                2 * sd ** 2 * box * box)
            pb = np.exp(llb - llb.max(0))
            pb /= pb.sum(0)
            f["loss_band_abs_spearman_vs_frame"][f"{lp:g}A"] = abs(spearman(windows @ pb, frame))
        res["path_oracle"][f"snr{snr:g}"] = f
    return res


# --------------------------------------------------------------------------- training and figures
def _ca_index(model):
    return np.flatnonzero(model.atom_name == "CA")


def decoded_ca(run, z, ca, batch: int = 256) -> np.ndarray:
    """Cα of the decoded model of every latent row: ``[n, C, 3]`` (file frame, Å)."""
    import torch

    base = run.ref.gaussians
    pts = run.ref.atoms_box()[ca]
    owner = torch.as_tensor(run.ref.owner[ca])
    out = []
    with torch.no_grad():
        for b0 in range(0, len(z), batch):
            zz = torch.as_tensor(z[b0:b0 + batch], dtype=torch.float32)
            out.append(run.vae.deformer.move_points(base, zz, pts, owner).double().numpy() + run.ref.center_A)
    return np.concatenate(out)


def fit_bounds(run, truth_ca, ca, z0, steps: int = 200) -> dict:
    """Best Cα RMSD per true frame that the trained decoder (latent fitted to the frame's
    coordinates) and, for segments, free rigid motions of its segments reach."""
    import torch

    from cryogmm.hetero.deform import SegmentDeformer, blend_rigid

    base = run.ref.gaussians
    pts = run.ref.atoms_box()[ca]
    owner = torch.as_tensor(run.ref.owner[ca])
    target = torch.as_tensor(truth_ca - run.ref.center_A, dtype=torch.float32)
    dfm = run.vae.deformer
    for p in dfm.parameters():
        p.requires_grad_(False)
    z = torch.tensor(z0, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(steps):
        r = ((dfm.move_points(base, z, pts, owner) - target) ** 2).sum(-1).mean(-1)
        opt.zero_grad()
        r.sum().backward()
        opt.step()
    with torch.no_grad():
        dec_fit = ((dfm.move_points(base, z, pts, owner) - target) ** 2).sum(-1).mean(-1).sqrt().numpy()
    out = {"decoder_fit_rmsd_per_frame": dec_fit}
    if isinstance(dfm, SegmentDeformer):
        with torch.no_grad():
            m = dfm.membership()
            piv = dfm.pivots(base, m)
            rv0, tr0 = dfm.motions(z.detach())  # from the decoder's own best fit: this bound is never worse
        rv = rv0.clone().requires_grad_(True)
        tr = tr0.clone().requires_grad_(True)
        opt = torch.optim.Adam([rv, tr], lr=0.02)
        for _ in range(steps):
            r = ((blend_rigid(pts, m[owner], rv, tr, piv) - target) ** 2).sum(-1).mean(-1)
            opt.zero_grad()
            r.sum().backward()
            opt.step()
        with torch.no_grad():
            out["segments_family_fit_rmsd_per_frame"] = (
                ((blend_rigid(pts, m[owner], rv, tr, piv) - target) ** 2).sum(-1).mean(-1).sqrt().numpy())
    return out


def rmsd(a, b):
    return np.sqrt(((a - b) ** 2).sum(-1).mean(-1))


def train_and_score(star: Path, ref_pdb: Path, out: Path, decoder: str, epochs: int, frames_ca, window_of_frame,
                    frame_of_particle, overrides: dict) -> dict:
    from cryogmm.hetero import config as hcfg
    from cryogmm.hetero import run as hrun
    from cryogmm.hetero import train as htrain
    from cryogmm.hetero.truth import spearman
    from cryogmm.io.structures import read_model

    if not (out / "report.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        cfg = hcfg.HeteroConfig(star=star, model=ref_pdb, out=out, decoder=decoder, epochs=epochs, device="cpu",
                                **overrides)
        htrain.train_hetero(cfg)
    rep = json.loads((out / "report.json").read_text())
    run = hrun.Run(out)
    t0 = time.perf_counter()
    z_mean = run.encode_all(polished=False)  # the encoder's means; the polished latents are scored apart
    sec_encode = time.perf_counter() - t0
    ca = _ca_index(run.ref.model)
    ref_ca = read_model(ref_pdb).coords[0][ca]
    frame = frame_of_particle[: len(z_mean)]
    win = window_of_frame[frame]
    at_ref = win == 0

    def score(z):
        dec = decoded_ca(run, z, ca)
        zc = z - z.mean(0)
        _, _, vt = np.linalg.svd(zc, full_matrices=False)
        pc1 = zc @ vt[0]
        r = rmsd(dec, frames_ca[frame])
        r_ref = rmsd(dec[at_ref], ref_ca[None])
        return {
            "abs_spearman_pc1_vs_frame": abs(spearman(pc1, frame)),
            # the path position (window): frames of one window differ by thermal jitter only
            "abs_spearman_pc1_vs_window": abs(spearman(pc1, win)),
            "median_ca_rmsd_decoded_vs_true_A": float(np.median(r)),
            "p90_ca_rmsd_decoded_vs_true_A": float(np.percentile(r, 90)),
            "reference_window": {
                "n_particles": int(at_ref.sum()),
                "median_ca_rmsd_decoded_vs_reference_A": float(np.median(r_ref)),
                "p90_ca_rmsd_decoded_vs_reference_A": float(np.percentile(r_ref, 90)),
                "median_ca_rmsd_decoded_vs_true_A": float(np.median(r[at_ref])),
            },
            "median_ca_rmsd_decoded_vs_true_per_window_A": [float(np.median(r[win == w])) for w in np.unique(win)],
        }

    res = {
        "decoder": decoder, "overrides": {k: str(v) for k, v in overrides.items()}, "epochs": rep["epochs"],
        "images_per_s": rep["images_per_s"], "seconds_training": rep["seconds_training"],
        "seconds_latents": sec_encode, "crop": rep["crop"], "latent_polish": rep.get("latent_polish"),
        "median_ca_rmsd_reference_vs_true_A": float(np.median(rmsd(ref_ca[None], frames_ca[frame]))),
        "reference_window_median_ca_rmsd_reference_vs_true_A": float(
            np.median(rmsd(ref_ca[None], frames_ca[frame[at_ref]]))),
        "posterior_mean": score(z_mean),
    }
    z = z_mean
    pol = out / "latents_polished.npy"
    if pol.exists():
        z = np.load(pol)
        res["polished"] = score(z)
    post = out / "latents_posterior.npy"  # what analyze reads when training wrote it
    if post.exists():
        z = np.load(post)
        res["posterior_over_candidates"] = score(z)
        res["latent_posterior"] = rep.get("latent_posterior")
    # bounds: what the decoder can express, fitted to the true frames' coordinates
    # (every 4th frame: 50 of 200, to keep the fit short on a shared CPU)
    fs = np.arange(0, len(frames_ca), 4)
    z0 = np.stack([np.median(z[frame == f], 0) if (frame == f).any() else np.zeros(z.shape[1]) for f in fs])
    b = fit_bounds(run, frames_ca[fs], ca, z0)
    for k, v in b.items():
        res[k.replace("_per_frame", "") + "_median_over_frames_A"] = float(np.median(v))
    return res


def thermal_floor(frames_ca, window_of_frame, frame_of_particle) -> dict:
    means = np.stack([frames_ca[window_of_frame == w].mean(0) for w in np.unique(window_of_frame)])
    r = rmsd(frames_ca, means[window_of_frame])
    f = frame_of_particle
    step = rmsd(frames_ca[1:], frames_ca[:-1])[np.diff(window_of_frame) == 0]
    return {"median_ca_rmsd_frame_to_window_mean_A": float(np.median(r[f])),
            "p90_ca_rmsd_frame_to_window_mean_A": float(np.percentile(r[f], 90)),
            "median_ca_rmsd_between_consecutive_frames_A": float(np.median(step)),
            "median_ca_rmsd_reference_to_first_window_frames_A": float(np.median(
                rmsd(frames_ca[0][None], frames_ca[window_of_frame == 0][1:])))}


def run_peer_cryodrgn(star: Path, out: Path, epochs: int, zdim: int, box: int, apix: float, threads: int, dim: int,
                      window_of_frame, frame_of_particle, log) -> dict:
    """cryoDRGN ``train_vae`` (true poses and CTF from the STAR, as ours gets them) on the same
    particles: |Spearman| of its latent PC1 vs the true frame and window."""
    from hetero_vs_cryodrgn import cryodrgn_train

    from cryogmm.hetero.truth import spearman

    z, secs, _ = cryodrgn_train(star, star.parent, out, epochs, zdim, box, apix, threads, log, dim)
    frame = frame_of_particle[: len(z)]
    win = window_of_frame[frame]
    zc = z - z.mean(0)
    pc1 = zc @ np.linalg.svd(zc, full_matrices=False)[2][0]
    import cryodrgn

    return {"program": f"cryodrgn {cryodrgn.__version__} train_vae", "epochs": epochs, "zdim": zdim,
            "enc_dec_dim": dim, "threads": threads, "seconds_training": secs, "images_per_s": len(z) * epochs / secs,
            "abs_spearman_pc1_vs_frame": abs(spearman(pc1, frame)), "abs_spearman_pc1_vs_window": abs(spearman(pc1, win)),
            "best_abs_spearman_any_latent_dim_vs_frame": max(abs(spearman(z[:, d], frame)) for d in range(z.shape[1]))}


def summary(mrec: dict, n: int) -> dict:
    """Per SNR, every run on these ``n`` particles (ours: each label, posterior mean and polished;
    cryoDRGN) beside the ceilings: |Spearman| of PC1 vs frame, its fraction of the path oracle,
    ours over cryoDRGN, and median/p90 decoded Cα RMSD."""
    ceil = mrec.get(f"ceiling_n{n}", {})
    out = {}
    snrs = sorted({v["snr"] for v in mrec.values() if isinstance(v, dict) and "snr" in v and v.get("n_particles") == n},
                  reverse=True)
    for snr in snrs:
        po = ceil.get("path_oracle", {}).get(f"snr{snr:g}", {})
        rows = {k: v for k, v in mrec.items() if isinstance(v, dict) and v.get("snr") == snr and v.get("n_particles") == n}
        peer = next((v for k, v in rows.items() if "_cryodrgn_" in k), None)
        t = {"path_oracle_abs_spearman_vs_frame": po.get("abs_spearman_vs_frame"),
             "path_oracle_in_8A_loss_band": po.get("loss_band_abs_spearman_vs_frame", {}).get("8A"),
             "structure_ceiling_abs_spearman_vs_frame": ceil.get("structure", {}).get("abs_spearman_true_progress_vs_frame"),
             "runs": {}}
        for k, v in rows.items():
            if "_cryodrgn_" in k:
                e = {"abs_spearman_pc1_vs_frame": v["abs_spearman_pc1_vs_frame"], "images_per_s": v["images_per_s"],
                     "epochs": v["epochs"]}
            else:
                e = {"epochs": v["epochs"], "images_per_s": v["images_per_s"]}
                for part in ("posterior_mean", "polished", "posterior_over_candidates"):
                    if part in v:
                        e[part] = {x: v[part][x] for x in ("abs_spearman_pc1_vs_frame", "median_ca_rmsd_decoded_vs_true_A",
                                                           "p90_ca_rmsd_decoded_vs_true_A")}
                        e[part]["reference_window_median_ca_rmsd_decoded_vs_reference_A"] = (
                            v[part]["reference_window"]["median_ca_rmsd_decoded_vs_reference_A"])
                        if peer:
                            e[part]["ratio_abs_spearman_to_cryodrgn"] = (
                                v[part]["abs_spearman_pc1_vs_frame"] / peer["abs_spearman_pc1_vs_frame"])
                if peer:
                    e["ratio_images_per_s_to_cryodrgn"] = v["images_per_s"] / peer["images_per_s"]
            best = max([e.get(p, e).get("abs_spearman_pc1_vs_frame", 0)
                        for p in ("posterior_mean", "polished", "posterior_over_candidates", "x")])
            if po.get("abs_spearman_vs_frame"):
                e["best_abs_spearman_fraction_of_path_oracle"] = best / po["abs_spearman_vs_frame"]
            t["runs"][k] = e
        out[f"snr{snr:g}"] = t
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/hetero_thermal"))
    p.add_argument("--molecules", nargs="+", default=["1hvr", "adk"], choices=["1hvr", "adk"])
    p.add_argument("--snr", type=float, nargs="+", default=[0.1, 0.01])
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--apix", type=float, default=2.0)
    p.add_argument("--map-res", type=float, default=4.0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--decoders", nargs="*", default=["segments", "displacement"],
                   help="none: only the frames, particles and ceilings")
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--snapshots", type=int, default=10)
    p.add_argument("--settle", type=int, default=200)
    p.add_argument("--stride", type=int, default=50)
    p.add_argument("--k-restraint", type=float, default=10.0, help="Cα restraint, kcal/mol/Å^2")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="HeteroConfig overrides for the training runs (e.g. lowpass_A=6)")
    p.add_argument("--label", default="defaults", help="name of this set of training settings in the JSON")
    p.add_argument("--no-ceiling", action="store_true", help="skip the ceilings (structure and path oracle)")
    p.add_argument("--cryodrgn", action="store_true",
                   help="also run cryoDRGN train_vae (installed in this venv: pip install cryodrgn==4.3.1)")
    p.add_argument("--cryodrgn-epochs", type=int, help="cryoDRGN epochs (default: --epochs)")
    p.add_argument("--cryodrgn-dim", type=int, default=256,
                   help="cryoDRGN encoder/decoder width (its default 1024 runs ~1 image/s on a 2-core CPU)")
    p.add_argument("--zdim", type=int, default=8, help="cryoDRGN latent width (hetero train's default is 8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "hetero_thermal.json")
    a = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    from cryogmm.hetero.config import HeteroConfig
    from cryogmm.runtime import keep_freed_memory

    keep_freed_memory()  # as the command line does (its images/s are the command's)
    from cryogmm.io.structures import read_model

    fields = HeteroConfig.__dataclass_fields__
    overrides = {}
    for kv in a.set:
        k, v = kv.split("=", 1)
        if k not in fields:
            raise SystemExit(f"--set: {k} is not a HeteroConfig field")
        t = fields[k].type
        overrides[k] = (v.lower() in ("1", "true", "yes")) if "bool" in str(t) else (
            int(v) if str(t).startswith("int") else float(v) if "float" in str(t) else v)
    a.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(a.json.read_text()) if a.json.exists() else {"benchmark": "hetero_thermal", "runs": {}}
    results.update({"benchmark": "hetero_thermal", "box": a.box, "apix_A": a.apix, "map_resolution_A": a.map_res})
    for mol in a.molecules:
        mw = a.work / mol
        mw.mkdir(exist_ok=True)
        log = open(mw / "log.txt", "a")
        start, end_ca = molecule(mol, mw)
        md = targeted_md(start, end_ca, mw / "md", a.windows, a.snapshots, a.settle, a.stride, a.k_restraint, a.seed)
        frames = read_model(mw / "md" / "frames.pdb")
        ca = _ca_index(frames)
        frames_ca = frames.coords[:, ca]
        window_of_frame = np.load(mw / "md" / "window_of_frame.npy")
        pdir = mw / f"particles_n{a.n}"
        t0 = time.perf_counter()
        make_particles(mw / "md", pdir, a.n, a.box, a.apix, a.snr, a.map_res, a.seed, log)
        frame_of_particle = np.load(pdir / "frame_of_particle.npy")
        mrec = results["runs"].setdefault(mol, {})
        mrec["md"] = md
        mrec["thermal_floor"] = thermal_floor(frames_ca, window_of_frame, frame_of_particle)
        if not a.no_ceiling:
            t1 = time.perf_counter()
            c = ceilings(mw / "md", pdir, frames_ca, window_of_frame, frame_of_particle, a.snr, a.box, a.apix,
                         a.map_res, log)
            c.update({"n_particles": a.n, "seconds": time.perf_counter() - t1, "loadavg": list(os.getloadavg()),
                      "date": datetime.now(timezone.utc).isoformat(),
                      "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:])})
            mrec[f"ceiling_n{a.n}"] = c
            print(mol, "ceiling", json.dumps(c), flush=True)
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(results, indent=2) + "\n")
        mrec.setdefault("seconds_particles", time.perf_counter() - t0)
        for snr in a.snr:
            for dec in a.decoders:
                key = f"snr{snr:g}_n{a.n}_e{a.epochs}_{dec}_{a.label}"
                out = mw / f"train_{key}"
                t1 = time.perf_counter()
                r = train_and_score(pdir / f"particles_snr{snr:g}.star", mw / "md" / "reference.pdb", out, dec,
                                    a.epochs, frames_ca, window_of_frame, frame_of_particle, overrides)
                r.update({"snr": snr, "n_particles": a.n, "label": a.label, "seconds_wall": time.perf_counter() - t1,
                          "loadavg": list(os.getloadavg()), "date": datetime.now(timezone.utc).isoformat(),
                          "host": platform.node(), "threads": a.threads,
                          "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:])})
                mrec[key] = r
                brief = {k: v for k, v in r.items() if not isinstance(v, (list, dict))}
                for part in ("posterior_mean", "polished", "posterior_over_candidates"):
                    if part in r:
                        brief[part] = {k: v for k, v in r[part].items() if not isinstance(v, list)}
                print(mol, key, json.dumps(brief), flush=True)
                a.json.parent.mkdir(parents=True, exist_ok=True)
                a.json.write_text(json.dumps(results, indent=2) + "\n")
            if a.cryodrgn:
                ce = a.cryodrgn_epochs or a.epochs
                key = f"snr{snr:g}_n{a.n}_cryodrgn_e{ce}_dim{a.cryodrgn_dim}"
                t1 = time.perf_counter()
                r = run_peer_cryodrgn(pdir / f"particles_snr{snr:g}.star", mw / f"cryodrgn_snr{snr:g}", ce, a.zdim,
                                      a.box, a.apix, a.threads, a.cryodrgn_dim, window_of_frame, frame_of_particle,
                                      mw / "cryodrgn.log")
                r.update({"snr": snr, "n_particles": a.n, "seconds_wall": time.perf_counter() - t1,
                          "loadavg": list(os.getloadavg()), "date": datetime.now(timezone.utc).isoformat(),
                          "host": platform.node(),
                          "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:])})
                ceil = mrec.get(f"ceiling_n{a.n}", {}).get("path_oracle", {}).get(f"snr{snr:g}")
                if ceil:
                    r["fraction_of_path_oracle"] = r["abs_spearman_pc1_vs_frame"] / ceil["abs_spearman_vs_frame"]
                mrec[key] = r
                print(mol, key, json.dumps(r), flush=True)
                a.json.write_text(json.dumps(results, indent=2) + "\n")
        mrec[f"summary_n{a.n}"] = summary(mrec, a.n)
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
