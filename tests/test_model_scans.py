"""The peptide-flip scans (``fit_peptides`` into a map, ``flip_for_rama`` without one) apply each
candidate in place and measure only the two residues' φ/ψ and the atoms near the move
(issue 17, scale: a copy of the model, every riding H and the whole Ramachandran table per
candidate, and a KD-tree rebuilt after every flip, made them grow with the square of the
model). They must give bit for bit the model of the plain way: a moved copy per candidate,
every H re-placed, the whole table, clashes against every atom."""

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
from cryogmm.model.trials import Near
from cryogmm.model.validate import rama_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from identical_outputs import splat_map  # noqa: E402

DATA = Path(__file__).parent / "data"


def _turned_peptides(rs, x, every=7, deg=180.0):
    """``x`` (H placed) with every ``every``-th peptide plane turned by ``deg`` about its CA-CA axis."""
    xn = x.detach().numpy().copy()
    h_of = rotamers._amide_h(rs.topo)
    for row in rotamers._peptides(rs.topo)[::every]:
        plane, pos = next(rotamers._plane_turns(xn, row, h_of, (deg,)))
        xn[plane] = pos
    return rs.with_h(torch.as_tensor(xn))


def _plain_fit_peptides(rf, grid, angles=tuple(range(140, 230, 10)), min_gain=0.25):
    """The scan the plain way: a moved copy per candidate, every H re-placed, the whole
    Ramachandran table, clashes against every atom."""
    topo, rs = rf.topo, rf.rs
    density = rotamers._density_sampler(grid)
    sd = float(np.asarray(grid.data, dtype=np.float64).std()) or 1.0
    zw = np.array([rotamers.ELECTRONS.get(e, 6) for e in topo.element], dtype=np.float64)
    h_of = rotamers._amide_h(topo)
    x = rs.with_h(rf.x_all.detach().clone())
    xn = x.numpy().copy()
    rama_res = {int(r): k for k, r in enumerate(topo.rama_res)}
    n = 0
    for row in rotamers._peptides(topo):
        c, o, nn, r0, r1 = (int(v) for v in row[[1, 2, 3, 5, 6]])
        heavy = np.array([c, o, nn])
        w = zw[heavy]
        current = float((w * density(xn[heavy])).sum())
        cands = []
        for plane, pos in rotamers._plane_turns(xn, row, h_of, angles):
            score = float((w * density(pos[:3])).sum())
            if score - current > min_gain * sd * w.sum():
                cands.append((score, plane, pos))
        cands.sort(key=lambda c: -c[0])
        for _, plane, pos in cands:
            y = x.clone()
            y[torch.as_tensor(plane)] = torch.as_tensor(pos)
            y = rs.with_h(y)
            verdict = rama_table(rs, y)[3]
            ok = all(verdict[rama_res[r]] != "outlier" for r in (r0, r1) if r in rama_res)
            if rotamers._local_clashes(rs, y.numpy(), plane) <= rotamers._local_clashes(rs, xn, plane) and ok:
                x, xn = y, y.numpy().copy()
                n += 1
                break
    return x, n


def _plain_flip_for_rama(rs, x, residues, angles=tuple(range(140, 230, 10))):
    topo = rs.topo
    rama_res = {int(r): k for k, r in enumerate(topo.rama_res)}
    h_of = rotamers._amide_h(topo)
    x = rs.with_h(x.detach().clone())
    xn = x.numpy().copy()

    def n_out(xx, rr):
        _, _, pct, v = rama_table(rs, xx)
        ks = [rama_res[r] for r in rr if r in rama_res]
        return (sum(v[k] == "outlier" for k in ks), -float(sum(pct[k] for k in ks)))

    turned = 0
    for row in rotamers._peptides(topo):
        rr = (int(row[5]), int(row[6]))
        if not set(residues).intersection(rr) or n_out(x, rr)[0] == 0:
            continue
        cur, best = n_out(x, rr), None
        for plane, pos in rotamers._plane_turns(xn, row, h_of, angles):
            y = x.clone()
            y[torch.as_tensor(plane)] = torch.as_tensor(pos)
            y = rs.with_h(y)
            k = n_out(y, rr)
            if k[0] >= cur[0] or (best is not None and k >= best[0]):
                continue
            if rotamers._local_clashes(rs, y.numpy(), plane) <= rotamers._local_clashes(rs, xn, plane):
                best = (k, y)
        if best is not None:
            x, xn = best[1], best[1].numpy().copy()
            turned += 1
    return x, turned


def test_peptide_scan_in_place_equals_the_plain_way(tmp_path):
    name = "hivp_1hvr_xk2.pdb"
    splat_map(DATA / name, tmp_path / "m.mrc", resolution=3.0, apix=1.0, pad=8.0, noise=0.1, seed=0)
    grid = read_map_grid(tmp_path / "m.mrc")
    t = build_topology(DATA / name)
    cfg = checked_config(RefineModelConfig(model=DATA / name, out=tmp_path / "o", map=tmp_path / "m.mrc", resolution_A=3.0))
    rf = Refiner(t, cfg, grid)
    x_start = _turned_peptides(rf.rs, rf.x_all)
    rf.x_all = x_start.clone()
    ref, n_ref = _plain_fit_peptides(rf, grid, min_gain=0.05)
    rf.x_all = x_start.clone()
    row = rotamers.fit_peptides(rf, grid, min_gain=0.05)
    assert row["flipped"] == n_ref >= 5  # the scan had work to do
    assert torch.equal(rf.x_all, ref)


def test_flip_for_rama_in_place_equals_the_plain_way():
    t = build_topology(DATA / "hivp_1hvr_xk2.pdb")
    rs = Restraints(t)
    x = _turned_peptides(rs, rs.with_h(torch.as_tensor(t.coords, dtype=torch.float64)), every=5, deg=170.0)
    verdict = rama_table(rs, x)[3]
    out = [int(t.rama_res[k]) for k, v in enumerate(verdict) if v == "outlier"]
    assert len(out) >= 5
    ref, n_ref = _plain_flip_for_rama(rs, x, out)
    y, n = rotamers.flip_for_rama(rs, x, out)
    assert n == n_ref >= 3
    assert torch.equal(y, ref)


def test_rama_table_of_some_rows_is_the_whole_tables_rows():
    t = build_topology(DATA / "hivp_1hvr_xk2.pdb")
    rs = Restraints(t)
    x = _turned_peptides(rs, rs.with_h(torch.as_tensor(t.coords, dtype=torch.float64)), every=5, deg=170.0)
    pp, names, pct, verdict = rama_table(rs, x)
    rows = [7, 3, 40, len(pp) - 1]
    pp2, names2, pct2, verdict2 = rama_table(rs, x, rows)
    np.testing.assert_array_equal(pp2, pp[rows])
    np.testing.assert_array_equal(pct2, pct[rows])
    assert names2 == [names[k] for k in rows] and verdict2 == [verdict[k] for k in rows]
    assert rama_table(rs, x, [])[3] == []


def test_near_stays_exact_when_atoms_move_far():
    """Atoms moved beyond the rebuild distance are listed (not rebuilt per move) and still found."""
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 40, size=(3000, 3))
    near = Near(x, max_far=40)
    builds = 0
    for _ in range(120):
        ch = rng.choice(len(x), 3, replace=False)
        y = x.copy()
        y[ch] += rng.normal(scale=2.0, size=(3, 3))  # often beyond rebuild_A
        S = rng.choice(len(x), 5, replace=False)
        J = near.partners(y, S, ch)
        d = np.linalg.norm(y[S][:, None] - y[None], axis=-1)
        truth = np.nonzero((d < near.reach).any(0))[0]
        assert np.isin(truth, J).all()
        tree = near.tree
        x = y
        near.accept(x, ch)
        builds += near.tree is not tree
    assert 0 < builds < 20  # rebuilt when the list of far atoms fills, not after every far move


def test_residue_means_equal_a_mask_per_residue():
    from cryogmm.model.validate import residue_means

    rng = np.random.default_rng(2)
    res = np.repeat(np.arange(300), rng.integers(1, 25, size=300))
    res[rng.choice(len(res), 40, replace=False)] = rng.integers(0, 300, size=40)  # not all contiguous
    v = rng.normal(size=len(res))
    got = residue_means(v, res)
    assert list(got) == sorted(set(res.tolist()))
    for ri, m in got.items():
        assert m == float(v[res == ri].mean())


def test_counts_before_a_candidate_are_taken_on_the_accepted_model(tmp_path, monkeypatch):
    """Every scan passes ``ACCEPTED`` (no atom changed) only where the model is the one ``Near``
    holds, so skipping the comparison of every atom there loses nothing."""
    calls = []
    plain = Near.partners

    def checked(self, pos, S, changed=None):
        if changed is not None and not len(changed):
            assert np.array_equal(pos, self.cur)
            calls.append(1)
        return plain(self, pos, S, changed)

    monkeypatch.setattr(Near, "partners", checked)
    for name in ("hivp_1hvr_xk2.pdb", "rna_1k5i.pdb"):
        splat_map(DATA / name, tmp_path / "m.mrc", resolution=3.0, apix=1.0, pad=8.0, noise=0.1, seed=0)
        grid = read_map_grid(tmp_path / "m.mrc")
        t = build_topology(DATA / name)
        cfg = checked_config(RefineModelConfig(model=DATA / name, out=tmp_path / "o", map=tmp_path / "m.mrc",
                                               resolution_A=3.0))
        rf = Refiner(t, cfg, grid)
        nbr = rotamers._bond_graph(t)
        x = _turned_peptides(rf.rs, rf.x_all)
        for tb, q in rotamers._movable_chis(t, rotamers.reference_tables()["rotamer"]):
            x = rotamers.set_torsion(x, q[0], 120.0, nbr, t)
        rf.x_all = rf.rs.with_h(x)
        rotamers.fit_peptides(rf, grid, min_gain=0.05)
        rotamers.fit_bases(rf, grid)
        rotamers.fit_side_chains(rf, grid)
        rotamers.rebuild_rotamers(rf)
        verdict = rama_table(rf.rs, rf.x_all)[3]
        rotamers.flip_for_rama(rf.rs, rf.x_all, [int(t.rama_res[k]) for k, v in enumerate(verdict) if v == "outlier"])
    assert len(calls) > 50
