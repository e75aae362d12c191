"""Base-pair and stacking restraints (cryogmm.model.napairs, ``--na-pairs``): detection of the RNA
hairpin's stem pairs, gradcheck of the term, and refinement that keeps (restores) the pairs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cryogmm.model import napairs
from cryogmm.model.restraints import Restraints
from cryogmm.model.topology import build_topology

RNA = Path(__file__).parent / "data" / "rna_1k5i.pdb"  # GGACCCGGGCUCAACCUGGGUCC, stem 1-6 / 18-23


@pytest.fixture(scope="module")
def rna():
    return build_topology(RNA, na_pairs=True)


def test_detects_the_stem_pairs(rna):
    s = napairs.summary(rna.na_pairs)
    pairs = {tuple(sorted(p.split()[0].split("-"))) for p in s["pair_list"]}
    # the stem of the hairpin: G1-C23, G2-C22, A3-U21, C4-G20, C5-G19, C6-G18, and G9-C15 in the loop
    want = {("A/C23", "A/G1"), ("A/C22", "A/G2"), ("A/A3", "A/U21"), ("A/C4", "A/G20"), ("A/C5", "A/G19"),
            ("A/C6", "A/G18"), ("A/C15", "A/G9")}
    assert pairs == want
    assert s["by_kind"] == {"Watson-Crick": 7} and s["hbonds"] == 6 * 3 + 2  # six G-C (3 H-bonds), one A-U (2)
    assert s["stacks"] >= 6
    # a nucleotide pairs once; no pair between chain neighbours
    ends = [e for p in pairs for e in p]
    assert len(ends) == len(set(ends))


def test_not_detected_without_the_option():
    t = build_topology(RNA)
    assert t.na_pairs is None and Restraints(t).napairs is None


def test_gradcheck(rna):
    term = napairs.PairTerm(rna.na_pairs)
    used = np.unique(np.concatenate([rna.na_pairs["hbonds"].ravel(), rna.na_pairs["planes"].ravel()]))
    x0 = torch.as_tensor(rna.coords, dtype=torch.float64)
    rng = np.random.default_rng(0)
    x0 = x0 + torch.as_tensor(rng.normal(0, 0.2, x0.shape))
    sel = torch.as_tensor(used[:24])

    def f(sub):
        x = x0.index_copy(0, sel, sub)
        return term.energy(x)

    assert torch.autograd.gradcheck(f, (x0[sel].clone().requires_grad_(True),), eps=1e-6, atol=1e-5)


def test_energy_zero_at_target_and_sign_free():
    # two parallel three-atom "bases" 3.4 Å apart, and an H-bond at its target
    a = np.array([[0, 0, 0], [1.4, 0, 0], [0.7, 1.2, 0]], dtype=float)
    b = a[::-1] + [0, 0, 3.4]  # reversed order: opposite normal, still parallel
    x = torch.as_tensor(np.concatenate([a, b, [[0, 0, 10.0], [napairs.HBOND_TARGET_A, 0, 10.0]]]))
    found = {"hbonds": np.array([[6, 7]]), "planes": np.array([[[0, 1, 2], [3, 4, 5]]])}
    term = napairs.PairTerm(found)
    assert float(term.energy(x)) == pytest.approx(0.0, abs=1e-12)
    # tilt the second base by the sigma: energy 0.5
    th = np.radians(napairs.PARALLEL_SIGMA_DEG)
    R = np.array([[1, 0, 0], [0, np.cos(th), -np.sin(th)], [0, np.sin(th), np.cos(th)]])
    y = x.clone()
    y[3:6] = torch.as_tensor((b - b.mean(0)) @ R.T + b.mean(0))
    assert float(term.energy(y)) == pytest.approx(0.5, rel=1e-6)


@pytest.mark.slow
def test_refinement_restores_stretched_pairs(rna, tmp_path):
    """Geometry-only refinement of the hairpin with its 3' strand (18-23) pulled 0.6 Å away from
    the 5' strand along the G1-C23 pair axis, pairs known from the deposited start: with the
    pair term the H-bonds come back closer to 2.9 Å than without it, and the refined model
    holds the same pairs (found again by the detection on its coordinates)."""
    from dataclasses import replace

    from cryogmm.model.refine.config import RefineModelConfig
    from cryogmm.model.refine.job import checked_config, refine_coords

    hb = rna.na_pairs["hbonds"]
    axis = rna.coords[hb[1, 1]] - rna.coords[hb[1, 0]]  # G1 N1 -> C23 N3
    axis /= np.linalg.norm(axis)
    x = rna.coords.copy()
    x[rna.seq_id >= 18] += 0.6 * axis
    stretched = replace(rna, coords=x)
    d0 = np.linalg.norm(x[hb[:, 0]] - x[hb[:, 1]], axis=1)

    def run(t):
        cfg = checked_config(RefineModelConfig(model=RNA, out=tmp_path, geometry_only=True, steps=50,
                                               stages=("full",), extra={"rama_repair": False}))
        y = refine_coords(t, None, cfg).coords
        return y, np.linalg.norm(y[hb[:, 0]] - y[hb[:, 1]], axis=1)

    y_on, d_on = run(stretched)
    _, d_off = run(replace(stretched, na_pairs=None))
    err = lambda d: np.abs(d - napairs.HBOND_TARGET_A).mean()  # noqa: E731
    assert err(d0) > 0.3
    assert err(d_on) < err(d_off)
    assert d_on.max() < napairs.HBOND_MAX_A
    again = napairs.detect(rna, y_on)
    assert set(again["pairs"]) == set(rna.na_pairs["pairs"])


@pytest.mark.slow
def test_cli_reports_pairs(tmp_path):
    """refine-model --na-pairs lists the pairs and stacks in report.json (geometry only, short)."""
    import subprocess
    import sys

    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "cryogmm", "refine-model", str(RNA), "--geometry-only", "--na-pairs",
                        "--steps", "5", "--stages", "full", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-500:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["na_pairs"]["pairs"] == 7 and rep["na_pairs"]["stacks"] >= 6
    assert rep["backbone_library"] == "engh-huber"  # the default
