"""Test data made with the ENGINE's Python (run as `python engine_data.py KIND OUT`; the
Scipion tests call it through the plugin's activation command, Scipion's Python never
imports cryogmm).

hetero OUT: adenylate kinase open (4AKE) -> closed (1AKE superposed on the open CORE),
  10 frames, 300 particles, box 40 at 2.5 Å, SNR 1, seed 3 (`cryogmm simulate --endpoints`,
  truth.star holds rlnCryogmmTrueFrame), and OUT/lid_mask.mrc: a soft sphere (12 Å, 5 Å
  edge) on the open model's LID domain (residues 122-159) in the frame of truth_map.mrc.
model OUT: residues 1-25 of 1AKE (truth.pdb), a displaced noisy copy (start.pdb: shifted by
  (1.2, -0.8, 0.6) Å plus 0.25 Å noise per atom) and the truth's 4 Å map with 10 % noise
  (map.mrc, 48^3 at 1 Å, origin on the model).
rna OUT / ligand OUT: the same for a model beyond proteins, from the repository's tests/data:
  the 23-nt RNA hairpin of 1K5I, or HIV protease with its inhibitor XK2 (no shipped
  dictionary), truth.pdb, start.pdb (shifted by (1.2, -0.8, 0.6) Å plus 0.1 Å noise per atom)
  and the truth's 4 Å map with 10 % noise (1 Å voxels, origin on the model).
series OUT: `cryogmm.model_series.series_example`: residues 1-40 of adenylate kinase, 3 maps
  at 5 Å (1.5 Å/px) along open -> closed (truth_01..03.pdb), starting model start.pdb.
"""

import sys
from importlib import resources
from pathlib import Path

import numpy as np

DATA = Path(str(resources.files("cryogmm.data")))


def hetero(out):
    from cryogmm.hetero.truth import ADK_CORE, superpose_file
    from cryogmm.io.maps import read_mrc, write_map
    from cryogmm.simulate.particles import SimulateConfig, simulate
    from cryogmm.model.topology import build_topology

    out.mkdir(parents=True, exist_ok=True)
    closed = out / "closed_on_open.pdb"
    superpose_file(DATA / "adk_closed.pdb", DATA / "adk_open.pdb", closed, ADK_CORE)
    simulate(SimulateConfig(out=out / "sim", endpoints=(DATA / "adk_open.pdb", closed), frames=10,
                            n=300, box=40, apix=2.5, snr=1.0, seed=3, device="cpu"))
    _, apix, header = read_mrc(out / "sim" / "truth_map.mrc")
    origin = np.array([float(header.origin.x), float(header.origin.y), float(header.origin.z)])
    t = build_topology(DATA / "adk_open.pdb", add_hydrogens=False)
    lid = (t.seq_id >= 122) & (t.seq_id <= 159) & ~t.is_h
    centre = t.coords[lid].mean(0)
    n = 40
    grid = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1)[..., ::-1]  # [z,y,x] -> (x,y,z)
    r = np.linalg.norm(origin + grid * apix - centre, axis=-1)
    mask = np.clip((12.0 + 5.0 - r) / 5.0, 0.0, 1.0)
    mask = 0.5 - 0.5 * np.cos(np.pi * mask)
    write_map(out / "lid_mask.mrc", mask.astype(np.float32), apix, origin_A=origin)


def model(out):
    import torch

    from cryogmm.core.gaussians import ELECTRONS, sigma_from_resolution
    from cryogmm.io.maps import write_map
    from cryogmm.model.density import splat
    from cryogmm.model.topology import build_topology, write_model

    out.mkdir(parents=True, exist_ok=True)
    lines = [line for line in (DATA / "adk_closed.pdb").read_text().splitlines()
             if line.startswith("ATOM") and int(line[22:26]) <= 25]
    truth = out / "truth.pdb"
    truth.write_text("\n".join(lines) + "\nEND\n")
    t = build_topology(truth, add_hydrogens=False)
    x = t.coords[~t.is_h]
    lo = x.min(0) - 8.0
    amp = torch.tensor([ELECTRONS.get(e, 6) for e in t.element[~t.is_h]], dtype=torch.float64)
    m = splat(torch.as_tensor(x), amp, sigma_from_resolution(4.0), (48, 48, 48), 1.0, lo).numpy()
    rng = np.random.default_rng(0)
    m = m + rng.normal(scale=0.1 * m.std(), size=m.shape)
    write_map(out / "map.mrc", m, 1.0, origin_A=lo)
    start = t.coords.copy() + np.array([1.2, -0.8, 0.6])
    start += rng.normal(scale=0.25, size=start.shape)
    write_model(t, start, out / "start.pdb")


def _beyond_protein(source, out):
    import shutil

    import torch

    from cryogmm.core.gaussians import ELECTRONS, sigma_from_resolution
    from cryogmm.io.maps import write_map
    from cryogmm.model.density import splat
    from cryogmm.model.topology import build_topology, write_model

    out.mkdir(parents=True, exist_ok=True)
    truth = out / "truth.pdb"
    shutil.copyfile(source, truth)
    t = build_topology(truth, add_hydrogens=False)
    x = t.coords[~t.is_h]
    lo = x.min(0) - 8.0
    n = int(np.ceil((x.max(0) - lo + 8.0).max()))
    n += n % 2
    amp = torch.tensor([ELECTRONS.get(e, 6) for e in t.element[~t.is_h]], dtype=torch.float64)
    m = splat(torch.as_tensor(x), amp, sigma_from_resolution(4.0), (n, n, n), 1.0, lo).numpy()
    rng = np.random.default_rng(0)
    m = m + rng.normal(scale=0.1 * m.std(), size=m.shape)
    write_map(out / "map.mrc", m, 1.0, origin_A=lo)
    start = t.coords.copy() + np.array([1.2, -0.8, 0.6])
    start += rng.normal(scale=0.1, size=start.shape)
    write_model(t, start, out / "start.pdb")


REPO_DATA = Path(__file__).resolve().parents[2] / "tests" / "data"


def rna(out):
    _beyond_protein(REPO_DATA / "rna_1k5i.pdb", out)


def ligand(out):
    _beyond_protein(REPO_DATA / "hivp_1hvr_xk2.pdb", out)


def series(out):
    from cryogmm.simulate.maps import series_example

    series_example(out, n_maps=3, resolution_A=5.0, apix=1.5, residues=(1, 40), seed=0)


if __name__ == "__main__":
    {"hetero": hetero, "model": model, "series": series, "rna": rna, "ligand": ligand}[sys.argv[1]](Path(sys.argv[2]))
