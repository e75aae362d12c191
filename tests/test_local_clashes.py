"""The rotamer, peptide and base scans count clashes around the moved atoms only and re-place only
the riding H a candidate moves; the KD-tree bound (``rotamers.Near``) and ``rotamers.RidingH``
must give the same counts, and so the same model, as measuring every atom and re-placing every
H (issue 17, scale: both grew with the square of the model)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from cryogmm.io.maps import read_map_grid
from cryogmm.model import rotamers
from cryogmm.model.refine.config import RefineModelConfig
from cryogmm.model.refine.job import checked_config
from cryogmm.model.refine.refiner import Refiner
from cryogmm.model.restraints import Restraints
from cryogmm.model.topology import build_topology

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from identical_outputs import splat_map  # noqa: E402

DATA = Path(__file__).parent / "data"


def test_near_gives_the_same_counts_as_every_atom():
    t = build_topology(DATA / "hivp_1hvr_xk2.pdb")
    rs = Restraints(t)
    x = rs.with_h(torch.as_tensor(t.coords)).numpy()
    near = rotamers.Near(x)
    rng = np.random.default_rng(0)
    for r in rng.choice(len(t.residues), 40, replace=False):
        S = np.nonzero(t.res_index == r)[0]
        assert rotamers._local_clashes(rs, x, S, near) == rotamers._local_clashes(rs, x, S)
        # a candidate: the residue's atoms moved up to 3 Å (into its neighbours)
        y = x.copy()
        y[S] += rng.normal(scale=1.5, size=(len(S), 3))
        assert rotamers._local_clashes(rs, y, S, near) == rotamers._local_clashes(rs, y, S)
        if rng.random() < 0.5:  # accepted: the tree's bound widens, counts still agree
            x = y
            near.accept(x)
            assert rotamers._local_clashes(rs, x, S, near) == rotamers._local_clashes(rs, x, S)


def test_side_chain_and_base_scans_are_unchanged(tmp_path, monkeypatch):
    """The whole rotamer stage (side chains and bases) on the protease with shuffled chi angles
    and on the RNA hairpin: the same coordinates with the bound and the local riding H as with
    every atom measured and every H re-placed."""
    outs = []
    for measure_all in (False, True):
        if measure_all:  # the old way: every atom measured, every riding H re-placed
            monkeypatch.setattr(rotamers.Near, "partners", lambda self, pos, S, changed=None: np.arange(len(pos)))
            monkeypatch.setattr(rotamers.RidingH, "__call__", lambda self, y, moved: self.rs.with_h(y))
            monkeypatch.setattr(rotamers.RidingH, "rows", lambda self, moved: np.arange(len(self.rs.h_index)))
        for name in ("hivp_1hvr_xk2.pdb", "rna_1k5i.pdb"):
            splat_map(DATA / name, tmp_path / f"{name}.mrc", resolution=4.0, apix=1.0, pad=8.0, noise=0.1, seed=0)
            t = build_topology(DATA / name)
            cfg = checked_config(RefineModelConfig(model=DATA / name, out=tmp_path / "o", map=tmp_path / f"{name}.mrc",
                                                   resolution_A=4.0))
            grid = read_map_grid(tmp_path / f"{name}.mrc")
            rf = Refiner(t, cfg, grid)
            # every side chain's chi1 turned 120°: the scan has work to do
            nbr = rotamers._bond_graph(t)
            x = rf.x_all.detach().clone()
            for tb, q in rotamers._movable_chis(t, rotamers.reference_tables()["rotamer"]):
                x = rotamers.set_torsion(x, q[0], 120.0, nbr, t)
            rf.x_all = rf.rs.with_h(x)
            rotamers.fit_peptides(rf, grid, min_gain=0.05)
            rotamers.fit_bases(rf, grid)
            row = rotamers.fit_side_chains(rf, grid)
            outs.append((name, row["changed"], rf.x_all.detach().numpy().copy()))
    half = len(outs) // 2
    for (n1, c1, x1), (n2, c2, x2) in zip(outs[:half], outs[half:]):
        assert n1 == n2 and c1 == c2
        np.testing.assert_array_equal(x1, x2)
    assert outs[0][1] > 10  # the protease's side chains did move


def test_trial_in_place_equals_a_moved_copy_and_undoes_exactly():
    """rotamers.Trial (a candidate applied in place, riding H re-placed, then undone) gives
    bit for bit the model the copy-per-candidate path gave (clone, move, RidingH), the same
    local clash count with its explicit changed atoms, and restores the model exactly."""
    topo = build_topology(DATA / "hivp_1hvr_xk2.pdb")
    rs = Restraints(topo)
    x = rs.with_h(torch.as_tensor(topo.coords, dtype=torch.float64))
    xn = x.numpy().copy()
    x0, xn0 = x.clone(), xn.copy()
    riding, near = rotamers.RidingH(rs), rotamers.Near(xn)
    rng = np.random.default_rng(0)
    r = int(topo.res_index[np.nonzero(topo.res_name == "ARG")[0][0]])
    atoms = rotamers._side_chain_atoms(topo, r)
    assert len(atoms) >= 4
    pos = xn[atoms] + rng.normal(scale=0.8, size=(len(atoms), 3))
    y = x.clone()
    y[torch.as_tensor(atoms)] = torch.as_tensor(pos)
    y = riding(y, atoms)
    trial = rotamers.Trial(x, xn, riding)
    ch = trial.apply(atoms, pos)
    assert torch.equal(x, y) and np.array_equal(xn, y.numpy())
    assert len(ch) > len(atoms)  # riding H moved too
    assert rotamers._local_clashes(rs, xn, atoms, near, ch) == rotamers._local_clashes(rs, xn, atoms, near)
    trial.undo()
    assert torch.equal(x, x0) and np.array_equal(xn, xn0)
