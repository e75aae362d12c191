"""The demo: the main jobs on the bundled adenylate kinase example."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["example_model", "run_demo"]


def example_model(name: str = "open") -> Path:
    """Path of a bundled adenylate kinase model: ``open`` (4AKE) or ``closed`` (1AKE), heavy atoms."""
    return Path(str(resources.files("cryogmm.data") / f"adk_{name}.pdb"))


def run_demo(out, n=2000, seed=0, device=None, progress=None) -> dict:
    import torch

    from cryogmm import mapio
    from cryogmm.jobs import Timer, write_report
    from cryogmm.metrics import lowpass, real_space_correlation
    from cryogmm.reconstruct import ReconstructConfig, reconstruct
    from cryogmm.simulate import SimulateConfig, simulate

    timer = Timer()
    out = Path(out)
    sim = simulate(SimulateConfig(out=out / "simulate", model=example_model("open"), n=n, box=64, apix=2.0,
                                  snr=0.1, seed=seed, device=device), progress=progress)
    rec = reconstruct(ReconstructConfig(star=out / "simulate" / "particles.star", out=out / "reconstruct",
                                        seed=seed, device=device), progress=progress)
    truth, apix = mapio.read_map(out / "simulate" / "truth_map.mrc")
    m, _ = mapio.read_map(out / "reconstruct" / "map.mrc")
    res = max(rec["resolution_A"], 3 * apix)
    cc = float(real_space_correlation(lowpass(torch.as_tensor(m), res, apix), lowpass(torch.as_tensor(truth), res, apix)))
    report = {
        "job": "demo",
        "example": "adenylate kinase 4AKE (open), heavy atoms",
        "simulate": {k: sim[k] for k in ("n_particles", "box", "apix_A", "snr", "seconds")},
        "reconstruct": {k: rec[k] for k in ("resolution_A", "resolution_0.5_A", "resolution_unmasked_A", "seconds")},
        "map_vs_truth_correlation": cc,
        "map_vs_truth_lowpass_A": res,
        "seconds": timer(),
    }
    write_report(out / "report.json", report)
    return report
