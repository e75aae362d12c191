"""RNA backbone suites and sugar puckers (issue 17, nucleic-acid terms): our suite assignment
against MolProbity's suitename, the smooth suite term, the pucker restraint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cryogmm.model.restraints import Restraints
from cryogmm.model.suites import SuiteTerm, assign, assign_one, pucker_geometry, suite_table
from cryogmm.model.topology import build_topology

RNA = Path(__file__).parent / "data" / "rna_1k5i.pdb"

# mmtbx suitename (cctbx 2025, `python -m mmtbx.command_line.suitename rna_1k5i.pdb`, the
# MolProbity judge of ../shared/tools/molprobity) on the deposited hairpin: residue, suite,
# suiteness. Residue 1 is incomplete (no suite).
SUITENAME_1K5I = {
    2: ("1a", 0.714), 3: ("1a", 0.349), 4: ("1a", 0.297), 5: ("1a", 0.317), 6: ("1a", 0.698), 7: ("1a", 0.922),
    8: ("1a", 0.811), 9: ("7a", 0.018), 10: ("!!", 0.0), 11: ("1b", 0.536), 12: ("!!", 0.0), 13: ("1a", 0.098),
    14: ("1a", 0.742), 15: ("1a", 0.678), 16: ("!!", 0.0), 17: ("1a", 0.582), 18: ("&a", 0.543), 19: ("1a", 0.594),
    20: ("1a", 0.890), 21: ("1a", 0.279), 22: ("1a", 0.131), 23: ("1b", 0.373),
}


def test_assignment_equals_suitename_on_a_deposited_hairpin():
    rows = assign(build_topology(RNA))
    got = {int(r["residue"].split("/")[1][1:]): (r["suite"], r["suiteness"]) for r in rows}
    assert set(got) == set(SUITENAME_1K5I)
    for k, (name, s) in SUITENAME_1K5I.items():
        assert got[k][0] == name, (k, got[k], name)
        assert got[k][1] == pytest.approx(s, abs=1.5e-3), (k, got[k], s)


def test_cluster_centres_are_their_own_suites_and_triage_works():
    for key, rows in suite_table()["bins"].items():
        for c in rows:
            name, s, where = assign_one(np.asarray(c["angles"], float))
            assert (name, where) == (c["name"], key) and s == pytest.approx(1.0)
    a = np.asarray(suite_table()["bins"]["33p"][0]["angles"], float)
    bad = a.copy()
    bad[1] = 100.0  # epsilon out of 155-310
    assert assign_one(bad)[0] == "!!" and assign_one(bad)[2] == "epsilon"
    bad = a.copy()
    bad[5] = 120.0  # gamma between p and t
    assert assign_one(bad)[2] == "gamma"


def test_suite_term_is_zero_in_a_cluster_and_pulls_an_outlier_back():
    t = build_topology(RNA)
    term = SuiteTerm(t)
    assert len(term) == 22
    x = torch.tensor(t.coords, dtype=torch.float64, requires_grad=True)
    e = term.energy(x)
    ev = e.detach()
    # the well-fitting 1a suites (suiteness > 0.6) sit in a cluster's core: no cost
    rows = assign(t)
    good = [i for i, r in enumerate(rows) if r["suiteness"] > 0.6]
    assert good and float(ev[good].max()) < 1e-6
    # the outliers cost, and the gradient moves their atoms
    bad = [i for i, r in enumerate(rows) if r["suite"] == "!!"]
    assert float(ev[bad].min()) > 0.05
    e.sum().backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0


def test_suite_term_gradient_is_exact():
    t = build_topology(RNA)
    term = SuiteTerm(t)
    sel = torch.as_tensor(np.unique(term.quads.reshape(-1).numpy()))
    base = torch.as_tensor(t.coords, dtype=torch.float64)

    def f(xs):
        return term.energy(base.index_copy(0, sel, xs)).sum()

    xs = base[sel].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (xs,), eps=1e-6, atol=1e-5)


def test_pucker_restraint_targets_the_pucker_the_phosphate_implies():
    t = build_topology(RNA)
    r = Restraints(t)
    _, _, two_p, bad = pucker_geometry(t.puckers, t.coords)
    ideal = r.pucker_ideal.numpy()
    assert np.all(ideal[two_p] == 146.0) and np.all(ideal[~two_p] == 82.0)
    z = r.pucker_z(torch.as_tensor(t.coords)).numpy()
    # deposited sugars sit near their targets; the MolProbity pucker outlier (U21) is far off
    assert np.median(np.abs(z)) < 1.5
    assert np.abs(z[bad]).min() > 2.0
