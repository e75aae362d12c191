"""cryogmm validate: figures on the deposited adenylate kinase models pinned against the
independent MolProbity judge (../shared/tools/molprobity, measured on this machine), noisy
models flagged, map figures on a map simulated from the model, CLI and bad input."""

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from cryogmm.errors import MapError, OptionError
from cryogmm.model.topology import build_topology
from cryogmm.model.validate import ValidateConfig, validate, validate_coords

DATA = resources.files("cryogmm.data")
OPEN = Path(str(DATA.joinpath("adk_open.pdb")))
CLOSED = Path(str(DATA.joinpath("adk_closed.pdb")))

# MolProbity (cctbx ramalyze/rotalyze, reduce+probe) on these files, see the benchmark
JUDGE = {"open": dict(rama_favoured_pct=97.17, rama_outlier_pct=0.472, rotamer_outlier_pct=3.429, n_clashes=4),
         "closed": dict(rama_favoured_pct=95.755, rama_outlier_pct=0.0, rotamer_outlier_pct=3.429, n_clashes=3)}


@pytest.mark.parametrize("name,path", [("open", OPEN), ("closed", CLOSED)])
def test_deposited_models_agree_with_molprobity(name, path):
    t = build_topology(path)
    rep = validate_coords(t, t.coords)
    j = JUDGE[name]
    assert rep["rama_favoured_pct"] == pytest.approx(j["rama_favoured_pct"], abs=0.01)
    assert rep["rama_outlier_pct"] == pytest.approx(j["rama_outlier_pct"], abs=0.01)
    assert rep["rotamer_outlier_pct"] == pytest.approx(j["rotamer_outlier_pct"], abs=0.01)
    # clashes: at most 2 of difference (reduce's rotor and methyl choices differ from ours)
    assert abs(rep["n_clashes"] - j["n_clashes"]) <= 2
    assert rep["chiral_outliers"] == 0
    assert 0.9 < rep["bond_rmsz"] < 1.6 and 1.0 < rep["angle_rmsz"] < 1.8


def test_noisy_model_is_flagged(tmp_path):
    t = build_topology(CLOSED)
    rng = np.random.default_rng(0)
    x = t.coords.copy()
    heavy = ~t.is_h
    x[heavy] += rng.normal(scale=0.3, size=(heavy.sum(), 3))
    clean = validate_coords(t, t.coords)
    noisy = validate_coords(t, x)
    # MolProbity on 0.3 Å noise: ~30 % Rama outliers, clashscore in the hundreds
    assert noisy["rama_outlier_pct"] > 10
    assert noisy["clashscore"] > 50 * max(clean["clashscore"], 1)
    assert noisy["bond_rmsz"] > 5 and noisy["angle_rmsz"] > 3


def _map_of(path, tmp_path, res=4.0, apix=1.5, shift=0.0):
    from cryogmm.core.gaussians import ELECTRONS, sigma_from_resolution
    from cryogmm.io.maps import write_map
    from cryogmm.model.density import splat

    t = build_topology(path, add_hydrogens=False)
    x = t.coords[~t.is_h]
    lo = x.min(0) - 8 + shift
    n = 56
    amp = torch.tensor([ELECTRONS.get(e, 6) for e in t.element[~t.is_h]], dtype=torch.float64)
    m = splat(torch.as_tensor(x), amp, sigma_from_resolution(res), (n, n, n), apix, lo - shift).numpy()
    p = tmp_path / "m.mrc"
    write_map(p, m, apix, origin_A=lo)
    return p


def test_cli_with_map(tmp_path):
    from cryogmm.cli import main

    mp = _map_of(CLOSED, tmp_path)
    out = tmp_path / "val"
    assert main(["validate", str(CLOSED), "--map", str(mp), "--resolution", "4", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert (out / "ramachandran.png").stat().st_size > 10000
    assert rep["map_cc_mask"] > 0.95  # the map is the model's own
    assert rep["qscore_mean"] > 0.5
    assert len(rep["qscore_per_residue"]) == 214
    # the open model fits the closed model's map worse
    rep2 = validate(ValidateConfig(model=OPEN, map=mp, resolution_A=4.0))
    assert rep2["map_cc_mask"] < rep["map_cc_mask"] - 0.1


def test_bad_input(tmp_path, capsys):
    from cryogmm.cli import main

    with pytest.raises(OptionError, match="--resolution"):
        validate(ValidateConfig(model=CLOSED, map=tmp_path / "x.mrc"))
    far = _map_of(CLOSED, tmp_path, shift=500.0)
    with pytest.raises(MapError, match="does not overlap"):
        validate(ValidateConfig(model=CLOSED, map=far, resolution_A=4.0))
    assert main(["validate", str(tmp_path / "missing.pdb"), "--out", str(tmp_path / "v")]) == 2
    assert "missing.pdb" in capsys.readouterr().err
