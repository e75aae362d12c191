"""Gaussians from a map: the FRC fit reproduces a map made from a known mixture, beats its
own k-means seeding, picks n and the threshold sensibly, is deterministic; Gaussians PDB
round trips; the fit-gmm job writes what it promises and refuses bad input cleanly."""

import json
import math

import mrcfile
import numpy as np
import pytest
import torch

from cryogmm.cli import main as cli
from cryogmm.demo import example_model
from cryogmm.errors import OptionError
from cryogmm.gmmfit.fit import auto_n, auto_threshold, gaussians_from_map
from cryogmm.io.structures import read_gaussians_pdb, write_gaussians_pdb
from cryogmm.core.gaussians import Gaussians, gaussians_to_map
from cryogmm.io.structures import gaussians_from_model
from cryogmm.io.maps import write_map
from cryogmm.core.similarity import fsc

BOX, APIX, RES = 32, 3.0, 8.0
SHELL_RES = int(BOX * APIX / RES)  # last FRC/FSC shell inside the target resolution (12)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are small: on a busy 2-core machine a second intra-op thread makes each
    step several times slower (measured 53 s -> 14 s for this file), so run on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def adk_map():
    """A map made from a known mixture: one Gaussian per residue of adenylate kinase at 8 Å."""
    g = gaussians_from_model(example_model("open"), "ca", resolution_A=RES)
    return gaussians_to_map(g, BOX, APIX)


@pytest.fixture(scope="module")
def fitted(adk_map):
    return gaussians_from_map(adk_map, APIX, resolution_A=RES, seed=0)


def test_fit_reproduces_the_map(adk_map, fitted):
    """FSC(mixture's map, input map) >= 0.98 over every shell out to the target resolution
    (measured: 0.995 min, 0.999 mean; never below 0.5 up to Nyquist)."""
    g, info = fitted
    curve = fsc(gaussians_to_map(g, BOX, APIX), adk_map)
    assert float(curve[1:SHELL_RES + 1].min()) >= 0.98
    assert info["fsc_min_to_resolution"] == pytest.approx(float(curve[1:SHELL_RES + 1].min()), abs=1e-5)
    assert info["fsc_0.5_A"] <= RES
    assert info["n"] == g.n and g.centers.shape == (g.n, 3)
    assert 0 < info["iterations"] <= 1000 and info["frc_loss"] < 0.01
    # the fit leaves the scale where least squares puts it: the mass is close to the model's
    assert float(g.amplitudes.sum()) == pytest.approx(float(adk_map.sum()) * APIX**3, rel=0.15)


def test_fit_improves_on_kmeans(adk_map, fitted):
    """k-means seeding alone is clearly worse than after the FRC fit (measured: min FSC to
    8 Å 0.78 -> 0.995; FRC loss 0.056 -> 0.002)."""
    _, info = fitted
    g0, info0 = gaussians_from_map(adk_map, APIX, resolution_A=RES, seed=0, iterations=0)
    k_min = float(fsc(gaussians_to_map(g0, BOX, APIX), adk_map)[1:SHELL_RES + 1].min())
    assert k_min == pytest.approx(info["kmeans"]["fsc_min_to_resolution"], abs=1e-5)
    assert k_min < 0.9
    assert info["fsc_min_to_resolution"] > k_min + 0.1
    assert info["frc_loss"] < info["frc_loss_start"] / 5
    assert info0["iterations"] == 0 and info0["frc_loss"] is None


def test_automatic_n_and_threshold(adk_map):
    """n follows one Gaussian per (R/2)^3 of the volume above threshold, grows as the target
    resolution gets finer, and is of the order of the residue count; the volume above the
    automatic threshold is near the protein's (23.6 kDa x 1.21 Å^3/Da = 28,600 Å^3)."""
    ns = {}
    for res in (6.0, 8.0, 12.0):
        _, info = gaussians_from_map(adk_map, APIX, resolution_A=res, iterations=0)
        assert info["n"] == auto_n(info["volume_above_threshold_A3"], res)
        ns[res] = info["n"]
    assert ns[6.0] > ns[8.0] > ns[12.0]
    assert 100 <= ns[12.0] and ns[6.0] <= 2000  # 214 residues
    assert 20_000 <= info["volume_above_threshold_A3"] <= 45_000
    assert auto_n(1.0, 10.0) == 8 and auto_n(1e12, 2.0) == 50_000  # clamped


def test_threshold_ignores_noise(adk_map):
    """On a noisy map the automatic threshold stays above the noise (median + 3 SD)."""
    sd = 0.05 * float(adk_map.max())
    noisy = adk_map + sd * torch.randn(adk_map.shape, generator=torch.Generator().manual_seed(1))
    t, details = auto_threshold(noisy)
    assert details["noise_sd"] == pytest.approx(sd, rel=0.1)
    assert t >= details["background"] + 3 * details["noise_sd"]
    t0, _ = auto_threshold(adk_map)
    assert t0 < t


def test_mask_limits_seeding(adk_map):
    """Only voxels inside the mask are seeded; arrays work as well as tensors."""
    mask = np.zeros((BOX,) * 3, dtype=np.float32)
    mask[:, :, BOX // 2:] = 1.0  # x >= 0
    g, info = gaussians_from_map(adk_map.numpy(), APIX, resolution_A=RES, mask=mask, n=40, iterations=0)
    assert g.n == 40 and info["n_rule"] == "given"
    assert float(g.centers[:, 0].min()) >= 0.0


def test_seeds_make_it_deterministic(adk_map):
    kw = dict(resolution_A=RES, seed=3, iterations=40)
    a, ia = gaussians_from_map(adk_map, APIX, **kw)
    b, ib = gaussians_from_map(adk_map, APIX, **kw)
    for x, y in zip((a.centers, a.amplitudes, a.sigmas), (b.centers, b.amplitudes, b.sigmas)):
        assert torch.equal(x, y)
    assert ia["frc_loss_history"] == ib["frc_loss_history"]
    c, _ = gaussians_from_map(adk_map, APIX, **{**kw, "seed": 4})
    assert not torch.equal(a.centers, c.centers)


def test_bad_arguments(adk_map):
    with pytest.raises(OptionError, match="--resolution"):
        gaussians_from_map(adk_map, APIX, resolution_A=5.0)
    with pytest.raises(OptionError, match="--threshold.*selects no voxel"):
        gaussians_from_map(adk_map, APIX, resolution_A=RES, threshold=1e6)
    with pytest.raises(OptionError, match="--n"):
        gaussians_from_map(adk_map, APIX, resolution_A=RES, n=0)


# --------------------------------------------------------------------------- PDB


def _random_mixture(n, seed=0):
    rng = np.random.default_rng(seed)
    return Gaussians(torch.tensor(rng.uniform(-60, 60, (n, 3)), dtype=torch.float32),
                     torch.tensor(rng.lognormal(2.0, 1.5, n), dtype=torch.float32),  # over decades
                     torch.tensor(rng.uniform(0.5, 12.0, n), dtype=torch.float32))  # B up to 11,000 Å^2


def test_pdb_round_trip(tmp_path):
    import gemmi

    g = _random_mixture(10_050)  # more than one chain of 9999 residues
    origin = np.array([100.0, -20.5, 33.25])
    path = tmp_path / "g.pdb"
    write_gaussians_pdb(path, g, origin_A=origin)
    back = read_gaussians_pdb(path)
    torch.testing.assert_close(back.amplitudes, g.amplitudes, rtol=1e-4, atol=0)
    torch.testing.assert_close(back.sigmas, g.sigmas, rtol=1e-4, atol=0)
    torch.testing.assert_close(back.centers, g.centers, rtol=0, atol=1e-3)
    # what viewers read: pseudo-atoms at centre + origin, occupancy a / max a, B = 8 pi^2 sigma^2
    st = gemmi.read_structure(str(path))
    atoms = [cra for cra in st[0].all()]
    assert len(atoms) == g.n and len(st[0]) == 2
    first = atoms[0]
    assert (first.residue.name, first.atom.element.name, first.residue.het_flag) == ("GMM", "C", "H")
    pos = np.array([[c.atom.pos.x, c.atom.pos.y, c.atom.pos.z] for c in atoms])
    np.testing.assert_allclose(pos, g.centers.numpy() + origin, atol=1e-3)
    occ = np.array([c.atom.occ for c in atoms])
    np.testing.assert_allclose(occ, (g.amplitudes / g.amplitudes.max()).numpy(), atol=0.006)
    b = np.array([c.atom.b_iso for c in atoms])
    np.testing.assert_allclose(b, 8 * math.pi**2 * g.sigmas.numpy().astype(np.float64) ** 2, rtol=1e-3, atol=0.006)
    # a file that lost the per-Gaussian remarks (edited elsewhere) still reads from its columns
    lines = [x for x in path.read_text().splitlines() if " CRYOGMM G " not in x]
    (tmp_path / "cols.pdb").write_text("\n".join(lines) + "\n")
    cols = read_gaussians_pdb(tmp_path / "cols.pdb")
    torch.testing.assert_close(cols.amplitudes, g.amplitudes, rtol=0, atol=0.006 * float(g.amplitudes.max()))
    torch.testing.assert_close(cols.sigmas, g.sigmas, rtol=2e-3, atol=0)
    # and origin_A overrides the remarked origin
    shifted = read_gaussians_pdb(path, origin_A=np.zeros(3))
    torch.testing.assert_close(shifted.centers, g.centers + torch.tensor(origin, dtype=torch.float32), rtol=0,
                               atol=1e-3)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def map_file(adk_map, tmp_path_factory):
    path = tmp_path_factory.mktemp("fitmap") / "adk.mrc"
    write_map(path, adk_map.numpy(), APIX, origin_A=(10.0, 20.0, 30.0))
    return path


def test_cli_writes_outputs(map_file, adk_map, tmp_path):
    out = tmp_path / "gmm"
    assert cli(["fit-gmm", str(map_file), "--resolution", str(RES), "--iterations", "60", "--seed", "1",
                "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["gaussians.pdb", "gmm_map.mrc", "report.json"]
    rep = json.loads((out / "report.json").read_text())
    for key in ("n", "n_rule", "threshold", "threshold_rule", "iterations", "frc_loss", "fsc", "fsc_0.5_A",
                "fsc_min_to_resolution", "kmeans", "seconds"):
        assert key in rep
    assert rep["iterations"] <= 60 and rep["map_origin_A"] == [10.0, 20.0, 30.0]
    with mrcfile.open(out / "gmm_map.mrc") as m:
        assert m.data.shape == (BOX,) * 3 and float(m.voxel_size.x) == pytest.approx(APIX)
        assert (float(m.header.origin.x), float(m.header.origin.y), float(m.header.origin.z)) == (10.0, 20.0, 30.0)
        gmm_map = m.data.copy()
    assert float(fsc(gmm_map, adk_map)[1:SHELL_RES + 1].min()) == pytest.approx(rep["fsc_min_to_resolution"], abs=1e-4)
    g = read_gaussians_pdb(out / "gaussians.pdb")  # the remarked origin (box centre) is taken off again
    assert g.n == rep["n"]
    torch.testing.assert_close(gaussians_to_map(g, BOX, APIX), torch.as_tensor(gmm_map), rtol=0,
                               atol=1e-3 * float(gmm_map.max()))


def _nan_map(path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile warns that the data holds NaN: that is the point
        write_map(path, np.full((8, 8, 8), np.nan, dtype=np.float32), APIX)


def _flat_map(path):
    write_map(path, np.zeros((8, 8, 10), dtype=np.float32), APIX)


@pytest.mark.parametrize("case, extra, expect", [
    ("missing", [], "no such file"),
    ("nan", [], "NaN"),
    ("non-cubic", [], "not cubic"),
    ("resolution", ["--resolution", "5"], "--resolution: 5 Å is finer than Nyquist"),
    ("threshold", ["--threshold", "1e6"], "--threshold: 1e+06 selects no voxel"),
])
def test_cli_bad_input(case, extra, expect, map_file, tmp_path, capsys):
    path = {"missing": tmp_path / "absent.mrc", "nan": tmp_path / "nan.mrc", "non-cubic": tmp_path / "flat.mrc"}.get(
        case, map_file)
    if case == "nan":
        _nan_map(path)
    elif case == "non-cubic":
        _flat_map(path)
    out = tmp_path / "out"
    args = ["fit-gmm", str(path), "--out", str(out)] + (extra if "--resolution" in extra else ["--resolution", "8"] + extra)
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert not out.exists()
