"""The demo: the main jobs on the bundled adenylate kinase example."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch

from cryogmm.bridge.io import read_particles
from cryogmm.core.fourier import lowpass
from cryogmm.core.rotations import rotmat_angle_deg
from cryogmm.core.similarity import real_space_correlation
from cryogmm.hetero.analyze import AnalyzeConfig, analyze_hetero
from cryogmm.hetero.config import HeteroConfig
from cryogmm.hetero.train import train_hetero
from cryogmm.hetero.truth import ADK_CORE, superpose_file
from cryogmm.io import maps as mapio
from cryogmm.io.maps import write_map
from cryogmm.io.outputs import nyquist_limited, write_report
from cryogmm.model.density import model_map
from cryogmm.model.refine.config import RefineModelConfig
from cryogmm.model.refine.job import refine_model
from cryogmm.model.series.config import RefineSeriesConfig
from cryogmm.model.series.job import refine_series
from cryogmm.model.topology import build_topology, write_model
from cryogmm.poses.job import RefineConfig, refine_poses
from cryogmm.recon.job import ReconstructConfig, reconstruct
from cryogmm.runtime import Timer
from cryogmm.simulate.maps import series_example
from cryogmm.simulate.particles import SimulateConfig, simulate


# --------------------------------------------------------------------------- demo
def demo_hetero(out_dir, seed: int = 0, progress=None) -> dict:
    """A short heterogeneity run on the bundled adenylate kinase (< 1 min on a CPU): simulate
    open-to-closed particles (CORE-superposed endpoints, box 48, SNR 0.1), train the
    segments decoder from the open model, analyze against the truth. Returns the figures."""
    from importlib import resources

    out_dir = Path(out_dir)
    data_dir = resources.files("cryogmm.data")
    open_pdb = Path(str(data_dir / "adk_open.pdb"))
    closed_pdb = Path(str(data_dir / "adk_closed.pdb"))
    out_dir.mkdir(parents=True, exist_ok=True)
    aligned = out_dir / "adk_closed_on_open_core.pdb"
    superpose_file(closed_pdb, open_pdb, aligned, ADK_CORE)
    sim = out_dir / "particles"
    simulate(SimulateConfig(out=sim, endpoints=(open_pdb, aligned), frames=10, n=600, box=48, apix=2.5, snr=0.1,
                            seed=seed, device="cpu"))
    run = out_dir / "run"
    tr = train_hetero(HeteroConfig(star=sim / "particles.star", model=open_pdb, out=run, decoder="segments",
                                   segments=6, zdim=2, epochs=10, batch=32, lowpass_A=10.0, map=sim / "truth_map.mrc",
                                   kl_warmup=3, seed=seed, device="cpu"), progress=progress)
    an = analyze_hetero(AnalyzeConfig(run=run, frames=5, pcs=1, clusters=2, backproject=False,
                                      truth=sim / "truth.star", seed=seed, device="cpu"))
    return {"train_seconds": tr["seconds"], "images_per_s": tr["images_per_s"], **an.get("truth", {})}


# ----------------------------------------------------------------------------- demo

def demo_model(out_dir, seed: int = 0, progress=None) -> dict:
    """A short model refinement for ``cryogmm demo`` (well under a minute on a laptop CPU).

    Residues 1-40 of closed adenylate kinase (1AKE) are the truth; their 4 Å map (molmap
    widths, 10 % noise) is the target; the start is the truth shifted by 1.4 Å with 0.25 Å
    coordinate noise. Full-atom refinement brings it back. Returns the validation figures
    before and after (``before``/``after`` dicts), the Cα RMSD to the truth, seconds and the
    output folder (refined.pdb, trajectory.pdb, report.json)."""
    from importlib import resources

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(str(resources.files("cryogmm.data").joinpath("adk_closed.pdb")))
    lines = [ln for ln in src.read_text().splitlines() if ln.startswith("ATOM") and int(ln[22:26]) <= 40]
    truth = out / "truth.pdb"
    truth.write_text("\n".join(lines) + "\nEND\n")
    topo = build_topology(truth, add_hydrogens=False)
    xa = topo.coords
    apix, res, n = 1.0, 4.0, 48
    lo = xa.min(0) - 8.0
    m = model_map(xa, topo.element, res, apix, lo, (n, n, n)).numpy()
    rng = np.random.default_rng(seed)
    m = m + rng.normal(scale=0.1 * m.std(), size=m.shape)
    write_map(out / "target.mrc", m, apix, origin_A=lo)
    start = xa + np.array([1.2, -0.8, 0.6]) + rng.normal(scale=0.25, size=xa.shape)
    write_model(topo, start, out / "start.pdb")
    cfg = RefineModelConfig(model=out / "start.pdb", map=out / "target.mrc", resolution_A=res, out=out / "refined",
                            stages=("rigid", "full"), n_patches=4, steps=25, seed=seed, reference=truth,
                            extra={"rigid_levels": ((1, 3.0),), "polish_iters": 50})
    rep = refine_model(cfg, progress=progress)
    keys = ("ca_rmsd_to_reference_A", "bond_rmsz", "angle_rmsz", "rama_outlier_pct", "rotamer_outlier_pct",
            "clashscore", "map_cc_mask")
    return {"before": {k: rep["before"].get(k) for k in keys}, "after": {k: rep["after"].get(k) for k in keys},
            "seconds": rep["seconds"], "out": str(out / "refined")}


def demo_series(out_dir, seed: int = 0, progress=None) -> dict:
    """A short model series for ``cryogmm demo`` (about 45 s of CPU time on one thread):
    adenylate kinase residues 1-60 from closed to open, 3 maps at 4.5 Å (2 Å/px), 4 frames.
    The configuration of ``tests/test_model_series.py::test_series_recovers_known_motion``.
    Returns per map the Cα RMSD of the start and of the map's frame to the truth, whether
    every frame meets the geometry goals, seconds and the output folder."""
    out = Path(out_dir)
    ex = series_example(out / "data", n_maps=3, residues=(1, 60), apix=2.0, resolution_A=4.5, noise=0.2, seed=seed)
    rep = refine_series(RefineSeriesConfig(model=ex["start"], maps=tuple(ex["maps"]), out=out / "series",
                                           resolution_A=4.5, frames=4, steps=10, capture_steps=30, polish_iters=40,
                                           n_patches=8, references=tuple(ex["truths"]), seed=seed), progress=progress)
    return {"ca_rmsd_start_A": [m["start_ca_rmsd_to_reference_A"] for m in rep["per_map"]],
            "ca_rmsd_frame_A": [m["ca_rmsd_to_reference_A"] for m in rep["per_map"]],
            "all_frames_pass_goals": rep["all_frames_pass_goals"], "seconds": rep["seconds"]["total"],
            "out": str(out / "series")}


def _with_limits(summary: dict, rep: dict) -> dict:
    """``summary`` of a job's report with ``resolution_limited_by`` for its resolutions at the
    Nyquist limit of the job's FSC table."""
    limited = nyquist_limited(summary, rep["fsc"]["resolution_A"]) if "fsc" in rep else {}
    return {**summary, "resolution_limited_by": limited} if limited else summary


def example_model(name: str = "open") -> Path:
    """Path of a bundled adenylate kinase model: ``open`` (4AKE) or ``closed`` (1AKE), heavy atoms."""
    return Path(str(resources.files("cryogmm.data") / f"adk_{name}.pdb"))


def run_demo(out, n=1500, seed=0, device=None, refine=True, hetero=True, model=True, progress=None) -> dict:
    """Simulate particles with perturbed poses, reconstruct them, refine their poses against
    Gaussian mixtures, and measure each step against the known truth; then a short
    heterogeneity run (open-to-closed motion, segments decoder) and a short model refinement
    with its validation table."""
    import numpy as np

    timer = Timer()
    out = Path(out)
    sim = simulate(SimulateConfig(out=out / "simulate", model=example_model("open"), n=n, box=64, apix=2.0,
                                  snr=0.3, pose_noise_deg=3.0, shift_noise_A=1.0, seed=seed, device=device),
                   progress=progress)
    rec = reconstruct(ReconstructConfig(star=out / "simulate" / "particles.star", out=out / "reconstruct",
                                        seed=seed, device=device), progress=progress)
    truth_map, apix = mapio.read_map(out / "simulate" / "truth_map.mrc")
    truth = read_particles(out / "simulate" / "truth.star")

    def vs_truth(map_path, table):
        m, _ = mapio.read_map(map_path)
        lp = 3 * apix
        cc = float(real_space_correlation(lowpass(torch.as_tensor(m), lp, apix),
                                          lowpass(torch.as_tensor(truth_map), lp, apix)))
        err = rotmat_angle_deg(torch.as_tensor(table.rotmat), torch.as_tensor(truth.rotmat)).numpy()
        sh = np.linalg.norm(table.shift_A - truth.shift_A, axis=1)
        return {"map_vs_truth_correlation": cc, "map_vs_truth_lowpass_A": lp,
                "angle_error_deg": {"median": float(np.median(err)), "p90": float(np.percentile(err, 90))},
                "shift_error_A": {"median": float(np.median(sh)), "p90": float(np.percentile(sh, 90))}}

    report = {
        "job": "demo",
        "example": "adenylate kinase 4AKE (open), heavy atoms",
        "simulate": {k: sim[k] for k in ("n_particles", "box", "apix_A", "snr", "pose_noise_deg", "shift_noise_A",
                                          "seconds")},
        "reconstruct": _with_limits({k: rec[k] for k in ("resolution_A", "resolution_0.5_A", "resolution_unmasked_A",
                                                        "seconds")}, rec),
        "start": vs_truth(out / "reconstruct" / "map.mrc", read_particles(out / "simulate" / "particles.star")),
    }
    report["map_vs_truth_correlation"] = report["start"]["map_vs_truth_correlation"]
    if refine:
        ref = refine_poses(RefineConfig(star=out / "simulate" / "particles.star", out=out / "refine", iterations=1,
                                        max_gaussians=600, fit_iterations=100, steps=30, seed=seed, device=device),
                           progress=progress)
        report["refine"] = _with_limits({"resolution_A": ref["resolution_A"], "seconds": ref["seconds"],
                                         "particles_per_s": ref["iterations"][-1]["particles_per_s"],
                                         **vs_truth(out / "refine" / "map.mrc",
                                                    read_particles(out / "refine" / "refined.star"))}, ref)
        report["map_vs_truth_correlation"] = report["refine"]["map_vs_truth_correlation"]
    if hetero:

        t = Timer()
        report["hetero"] = {**demo_hetero(out / "hetero", seed=seed, progress=progress), "seconds": t()}
    if model:

        t = Timer()
        report["model"] = {**demo_model(out / "model", seed=seed, progress=progress), "seconds": t()}
    report["seconds"] = timer()
    write_report(out / "report.json", report)
    return report
