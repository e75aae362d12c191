"""``cryogmm gmm`` (a map's Gaussian mixture as markers) and ``cryogmm simulate`` (a quick
simulated map of a model, optionally a particle set), both through the engine."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from chimerax.core.errors import UserError

from . import bridge


def map_gmm(session, volume, resolution=None, n=None, iterations=200, threshold=None, seed=0):
    """Fit Gaussians to the full grid of ``volume`` (``cryogmm.fitmap.gaussians_from_map``) and show
    them as a marker set (radius = Gaussian sigma) in the map's frame. Returns (markers, info)."""
    bridge.engine()
    import torch
    from cryogmm.errors import CryoGMMError
    from cryogmm.gmmfit.fit import gaussians_from_map

    m, apix, origin = bridge.volume_grid(volume)
    if resolution is None:
        resolution = 3.0 * apix
    if resolution < 2 * apix - 1e-6:
        raise UserError(f"cryogmm gmm: resolution {resolution:g} Å is finer than the Nyquist limit of {volume} "
                        f"({2 * apix:g} Å)")
    if iterations < 0:
        raise UserError(f"cryogmm gmm: iterations must be >= 0, got {iterations}")
    # the engine fits cubic boxes: pad to N^3 (zeros) keeping voxel (0,0,0) at the grid origin
    nbox = max(m.shape)
    nbox += nbox % 2
    cube = np.zeros((nbox,) * 3, dtype=np.float32)
    cube[:m.shape[0], :m.shape[1], :m.shape[2]] = m
    torch.set_num_threads(2)
    try:
        g, info = gaussians_from_map(cube, apix, resolution_A=float(resolution), n=n, threshold=threshold,
                                     iterations=int(iterations), seed=int(seed), device=torch.device("cpu"))
    except CryoGMMError as e:
        raise bridge.engine_error(e) from None
    centre = origin + (nbox // 2) * apix
    xyz = g.centers.detach().cpu().double().numpy() + centre
    sig = g.sigmas.detach().cpu().double().numpy()
    amp = g.amplitudes.detach().cpu().double().numpy()
    from chimerax.markers import MarkerSet

    ms = MarkerSet(session, name=f"{volume.name} GMM ({len(xyz)})")
    a = amp / max(float(np.abs(amp).max()), 1e-12)
    for p, s, w in zip(xyz, sig, a):
        c = (int(255 * (0.3 + 0.7 * max(w, 0))), 90, int(255 * (1 - 0.7 * max(w, 0))), 255)
        ms.create_marker(p, c, float(s))
    session.models.add([ms])
    ms.scene_position = volume.scene_position
    info = {k: v for k, v in info.items() if isinstance(v, (int, float, str))}
    session.logger.info(f"cryogmm gmm: {len(xyz)} Gaussians fitted to {volume} at {resolution:g} Å as markers "
                        f"{ms.id_string}" + "".join(f"; {k} {v:.4g}" if isinstance(v, float) else f"; {k} {v}"
                                                    for k, v in info.items()))
    return ms, info


def simulate_map(session, structure, resolution=4.0, spacing=None, noise=0.1, seed=0, particles=None, out=None,
                 snr=0.1):
    """A map of ``structure`` (the engine's ``cryogmm.simulate.maps.simulate_map``: heavy atoms as
    Gaussians of molmap width, amplitudes = electrons, on a cubic grid around it, plus Gaussian
    noise of ``noise`` x the map's standard deviation); opened as a volume in the model's frame. With ``particles N`` the engine's
    ``simulate`` job also writes a particle set with known truth into ``out``."""
    bridge.engine()
    from cryogmm.errors import CryoGMMError
    from cryogmm.simulate.maps import simulate_map as engine_simulate_map

    atoms = structure.atoms
    heavy = atoms[atoms.element_names != "H"]
    if len(heavy) == 0:
        raise UserError(f"cryogmm simulate: {structure} has no heavy atoms")
    try:
        g = engine_simulate_map(heavy.coords, heavy.element_names, float(resolution), apix=spacing, noise=float(noise),
                                seed=int(seed))
    except CryoGMMError as e:
        raise UserError(f"cryogmm simulate: {e}") from None
    m, apix, lo, nbox = g.data, g.apix, g.origin_A, g.data.shape[0]
    from chimerax.map import volume_from_grid_data
    from chimerax.map_data import ArrayGridData

    grid = ArrayGridData(m.astype(np.float32), origin=tuple(lo), step=(apix,) * 3,
                         name=f"{structure.name} simulated {resolution:g} Å")
    v = volume_from_grid_data(grid, session)
    v.scene_position = structure.scene_position
    session.logger.info(f"cryogmm simulate: map {v.id_string} of {structure} at {resolution:g} Å, {nbox}^3 voxels of "
                        f"{apix:g} Å, noise {noise:g} x SD (seed {seed})")
    if particles:
        if out is None:
            raise UserError("cryogmm simulate: give `out DIR` for the particle set")
        tmp = Path(tempfile.mkdtemp(prefix="cryogmm_sim_"))
        bridge.write_structure_pdb(structure, tmp / "model.pdb")
        if bridge.star_in_process():
            from cryogmm.simulate.particles import SimulateConfig, simulate

            try:
                rep = simulate(SimulateConfig(out=Path(out), model=tmp / "model.pdb", n=int(particles), snr=float(snr),
                                              seed=int(seed), resolution_A=float(resolution)))
            except CryoGMMError as e:
                raise bridge.engine_error(e) from None
        else:
            import json

            bridge.run_engine_cli(["simulate", "--model", tmp / "model.pdb", "--out", out, "--n-particles", int(particles),
                                   "--snr", float(snr), "--seed", int(seed), "--resolution", float(resolution)],
                                  "cryogmm simulate")
            rep = json.loads((Path(out) / "report.json").read_text())
        session.logger.info(f"cryogmm simulate: {particles} particles (SNR {snr:g}) in {out}: particles.star, "
                            f"truth.star, truth_map.mrc, report.json")
        return v, rep
    return v, None
