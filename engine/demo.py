"""The demo: the main jobs on the bundled adenylate kinase example."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["example_model", "run_demo"]


def example_model(name: str = "open") -> Path:
    """Path of a bundled adenylate kinase model: ``open`` (4AKE) or ``closed`` (1AKE), heavy atoms."""
    return Path(str(resources.files("cryogmm.data") / f"adk_{name}.pdb"))


def run_demo(out, n=1500, seed=0, device=None, refine=True, hetero=True, model=True, progress=None) -> dict:
    """Simulate particles with perturbed poses, reconstruct them, refine their poses against
    Gaussian mixtures, and measure each step against the known truth; then a short
    heterogeneity run (open-to-closed motion, segments decoder) and a short model refinement
    with its validation table."""
    import numpy as np
    import torch

    from cryogmm import mapio
    from cryogmm.bridge.io import read_particles
    from cryogmm.jobs import Timer, write_report
    from cryogmm.metrics import lowpass, real_space_correlation
    from cryogmm.reconstruct import ReconstructConfig, reconstruct
    from cryogmm.refine import RefineConfig, refine_poses
    from cryogmm.rotations import rotmat_angle_deg
    from cryogmm.simulate import SimulateConfig, simulate

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
        "reconstruct": {k: rec[k] for k in ("resolution_A", "resolution_0.5_A", "resolution_unmasked_A", "seconds")},
        "start": vs_truth(out / "reconstruct" / "map.mrc", read_particles(out / "simulate" / "particles.star")),
    }
    report["map_vs_truth_correlation"] = report["start"]["map_vs_truth_correlation"]
    if refine:
        ref = refine_poses(RefineConfig(star=out / "simulate" / "particles.star", out=out / "refine", iterations=1,
                                        max_gaussians=600, fit_iterations=100, steps=30, seed=seed, device=device),
                           progress=progress)
        report["refine"] = {"resolution_A": ref["resolution_A"], "seconds": ref["seconds"],
                            "particles_per_s": ref["iterations"][-1]["particles_per_s"],
                            **vs_truth(out / "refine" / "map.mrc", read_particles(out / "refine" / "refined.star"))}
        report["map_vs_truth_correlation"] = report["refine"]["map_vs_truth_correlation"]
    if hetero:
        from cryogmm.hetero import demo_hetero

        t = Timer()
        report["hetero"] = {**demo_hetero(out / "hetero", seed=seed, progress=progress), "seconds": t()}
    if model:
        from cryogmm.model_refine import demo_model

        t = Timer()
        report["model"] = {**demo_model(out / "model", seed=seed, progress=progress), "seconds": t()}
    report["seconds"] = timer()
    write_report(out / "report.json", report)
    return report
