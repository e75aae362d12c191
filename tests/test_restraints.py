"""Restraint terms: float64 gradcheck of every term (with riding H), analytic values on
ideal geometry, periodic grid lookup against the source grid, neighbour lists."""

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from cryogmm.model.density import sample, splat
from cryogmm.model.restraints import Restraints, grid_value, reference_tables
from cryogmm.core.rotations import dihedral
from cryogmm.model.topology import build_topology

ADK = Path(str(resources.files("cryogmm.data").joinpath("adk_closed.pdb")))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Residues 1-6 of adenylate kinase (MRIILG) with riding H."""
    lines = [l for l in ADK.read_text().splitlines() if l.startswith("ATOM") and int(l[22:26]) <= 6]
    p = tmp_path_factory.mktemp("pep") / "pep.pdb"
    p.write_text("\n".join(lines) + "\nEND\n")
    t = build_topology(p)
    r = Restraints(t)
    return t, r


def test_dihedral_known_values():
    p = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 1, 1]], dtype=torch.float64)
    # IUPAC: looking along 1->2, the far atom turned clockwise is positive
    assert float(torch.rad2deg(dihedral(*p))) == pytest.approx(-90.0)
    p[3] = torch.tensor([-1.0, 1, 0])
    assert abs(float(torch.rad2deg(dihedral(*p)))) == pytest.approx(180.0)


@pytest.mark.parametrize("term", ["bond", "angle", "chiral", "plane", "omega", "rama", "rotamer", "clash"])
def test_gradcheck_terms(small, term):
    t, r = small
    x0 = torch.as_tensor(t.coords, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x0 = x0 + 0.05 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    r.update_pairs(r.with_h(x0), cutoff=6.0)
    if term == "clash":
        # push two non-bonded atoms into contact so the clash term is active
        assert len(r.pairs) > 0
        r.clash_start = -2.0
    # a handful of heavy atoms of residues 2-4 (backbone and side chain) keeps gradcheck quick
    sel = np.nonzero(~t.is_h & np.isin(t.seq_id, [2, 3, 4]))[0]
    heavy = torch.as_tensor(sel[:: max(1, len(sel) // 8)])
    base = x0.detach()

    def f(xh):
        x = base.index_copy(0, heavy, xh)
        return r.terms(r.with_h(x), only=[term])[term]

    xh = base[heavy].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (xh,), eps=1e-6, atol=1e-5, rtol=1e-4)
    r.clash_start = 0.1


def test_ideal_geometry_values(small):
    t, r = small
    x = r.with_h(torch.as_tensor(t.coords))
    # deposited geometry: z-scores of order 1, chirality hand right, planes flat to < 0.1 Å
    assert float(r.bond_z(x).pow(2).mean().sqrt()) < 3
    assert float(r.plane_dev(x).abs().max()) < 0.1
    assert (r.chiral_z(x).abs() < 4).all()


def test_bond_z_analytic():
    # a pure stretch of one bond by 2 sigma gives z = 2 for that bond only
    t = build_topology(ADK)
    r = Restraints(t)
    x = r.with_h(torch.as_tensor(t.coords))
    z0 = r.bond_z(x)
    k = int(np.nonzero((t.atom_name[t.bonds[:, 0]] == "CA") & (t.atom_name[t.bonds[:, 1]] == "C"))[0][0])
    i, j = t.bonds[k]
    d = x[j] - x[i]
    x2 = x.clone()
    # move the whole C-terminal side? simpler: check the formula directly
    stretched = d * (1 + 2 * t.bond_sigma[k] / float(d.norm()))
    x2[j] = x[i] + stretched
    z = r.bond_z(x2)
    assert float(z[k] - z0[k]) == pytest.approx(2.0, abs=1e-9)


def test_grid_lookup_matches_table_at_bin_centres():
    tab = reference_tables()["rama"]["general"]
    g = tab["grid"]
    rng = np.random.default_rng(0)
    ij = rng.integers(0, 180, size=(50, 2))
    angles = -180 + 2.0 * ij + 1.0  # bin centres
    assert np.allclose(grid_value(tab, angles), g[ij[:, 0], ij[:, 1]])
    # periodic: -181 wraps to 179
    assert grid_value(tab, np.array([[-181.0, 0.0]]))[0] == pytest.approx(grid_value(tab, np.array([[179.0, 0.0]]))[0])


def test_rama_energy_prefers_favoured(small):
    t, r = small
    x = r.with_h(torch.as_tensor(t.coords))
    e = r.rama_energy(x).detach().numpy()
    pp = r.phi_psi(x).detach().numpy()
    cls = [["general", "gly", "transpro", "cispro", "prepro", "ileval"][c] for c in t.rama_class]
    pct = np.array([grid_value(reference_tables()["rama"][c], p[None])[0] for c, p in zip(cls, pp)])
    # residues in favoured regions have low energy
    assert (e[pct > 0.02] < 6).all()


def test_splat_integral_and_gradcheck():
    x = torch.tensor([[0.31, -0.23, 0.12], [2.03, 1.07, -1.46]], dtype=torch.float64, requires_grad=True)
    amp = torch.tensor([6.0, 8.0], dtype=torch.float64)
    vol = splat(x, amp, 1.2, (24, 24, 24), 0.5, (-6.0, -6.0, -6.0))
    # the stencil stops at 3 sigma per axis: (erf(3/sqrt 2))^3 = 0.992 of the mass at most
    assert float(vol.detach().sum() * 0.5**3) == pytest.approx(14.0, rel=1e-2)
    f = lambda xx: splat(xx, amp, 1.2, (16, 16, 16), 0.6, (-4.5, -4.5, -4.5)).pow(2).sum()  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)
    # sampling the splatted map at the atom returns its peak value
    v = sample(vol, x.detach(), 0.5, (-6.0, -6.0, -6.0))
    assert v[0] > 0.5 * float(vol.max())


def test_local_clash_count_matches_whole_model_count():
    """The rotamer fit counts only clashes involving the moved side chain; the change it sees
    must equal the change of the whole model's clash count (same pairs, radii, H-bond relief)."""
    from cryogmm.model.rotamers import _bond_graph, _local_clashes, _moving_atoms, set_torsion
    from cryogmm.model.restraints import CLASH_OVERLAP

    t = build_topology(ADK)
    r = Restraints(t)
    x = r.with_h(torch.as_tensor(t.coords))
    r.optimise_rotors(x)
    x = r.with_h(x)

    def whole(y):
        r.update_pairs(y, cutoff=4.0)
        return int((r.overlaps(y) >= CLASH_OVERLAP - 1e-9).sum())

    nbr = _bond_graph(t)
    changed = 0
    for tname, (quads, _) in sorted(t.chis.items())[:6]:
        for k in range(min(3, len(quads))):
            for turn in (120.0, -100.0, 35.0):
                y = r.with_h(set_torsion(x, quads[k, 0], turn, nbr, t))
                S = np.asarray(_moving_atoms(quads[k, 0], nbr, t), dtype=np.int64)
                d_local = _local_clashes(r, y.numpy(), S) - _local_clashes(r, x.numpy(), S)
                d_whole = whole(y) - whole(x)
                assert d_local == d_whole, (tname, k, turn)
                changed += d_whole != 0
    assert changed > 0  # some turns did add clashes: the comparison is not trivially 0 == 0


def test_batched_mixtures_equal_per_table_terms():
    """Rama and rotamer energies are evaluated batched by dimension; each residue's value and
    the gradient must equal the per-table mixture (``_gmm_neglog``) on its own angles."""
    import math

    from cryogmm.model.restraints import _gmm_constants, _wrap_deg

    def _gmm_neglog(ang_deg, w, mu, cov, period, floor, pre, tail):
        """One table at a time, written out: -log(mixture + floor x widened mixture)."""
        diff = _wrap_deg(ang_deg[:, None, :] - mu[None], period)
        inv, logc = pre if pre is not None else _gmm_constants(w, cov)
        lp = torch.logsumexp(logc[None] - 0.5 * torch.einsum("nki,kij,nkj->nk", diff, inv, diff), dim=1) - logc.max()
        tinv, tlogc = tail
        lt = torch.logsumexp(tlogc[None] - 0.5 * torch.einsum("nki,kij,nkj->nk", diff, tinv, diff), dim=1) - tlogc.max()
        return -torch.logaddexp(lp, math.log(floor) + lt.clamp(max=0.0))

    t = build_topology(ADK)
    r = Restraints(t)
    g = torch.Generator().manual_seed(3)
    x = (r.with_h(torch.as_tensor(t.coords)) + 0.4 * torch.randn(t.n_atoms, 3, generator=g, dtype=torch.float64))
    x.requires_grad_(True)
    e_rama, e_rot = r.rama_energy(x), r.rotamer_energy(x)
    (e_rama.sum() + e_rot.sum()).backward()
    got = x.grad.clone()

    y = x.detach().clone().requires_grad_(True)
    pp = r.phi_psi(y)
    ref_rama = torch.zeros(len(r.rama), dtype=torch.float64)
    for cname, (sel, w, mu, cov, period) in r.rama_gmm.items():
        ref_rama = ref_rama.index_copy(0, sel, _gmm_neglog(pp[sel], w, mu, cov, period, r.rama_floor, None,
                                                           _gmm_constants(w, cov * 16.0)))
    parts = []
    for tname, (q, w, mu, cov, period, lo) in r.chi_gmm.items():
        chi = torch.remainder(r.chis_deg(y, tname) - lo, period) + lo
        parts.append(_gmm_neglog(chi, w, mu, cov, period, r.rama_floor, None, _gmm_constants(w, cov * 16.0)))
    ref_rot = torch.cat(parts)
    (ref_rama.sum() + ref_rot.sum()).backward()
    assert len(r.chi_gmm) > 10 and len(r._rot_batches) == 4  # χ1..χ4 tables, one pass each
    assert torch.allclose(e_rama, ref_rama, atol=1e-10) and torch.allclose(e_rot, ref_rot, atol=1e-10)
    assert torch.allclose(got, y.grad, atol=1e-9)


def test_side_chain_candidates_reach_their_chi_targets():
    """The rotamer fit builds every candidate of a residue at once: each must have exactly its
    target χ angles and unchanged bond lengths."""
    from cryogmm.model.rotamers import _allowed_targets, _bond_graph, _chi_candidates
    from cryogmm.core.rotations import dihedral_deg

    t = build_topology(ADK)
    tabs = reference_tables()["rotamer"]
    nbr = _bond_graph(t)
    xn = t.coords.copy()
    bonds = t.bonds
    for tname in ("lys", "arg", "phetyr", "val"):
        quads, _ = t.chis[tname]
        q = quads[0]
        tb = tabs[tname]
        local, lut, _, pos = _chi_candidates(xn, q, nbr, t, tb, (-15.0, 0.0, 15.0))
        tgt = _allowed_targets(tb, (-15.0, 0.0, 15.0), min(2, q.shape[0]))
        assert len(pos) == len(tgt) > 0
        inside = np.array([a in lut and b in lut for a, b in bonds])
        lb = np.array([[lut[int(a)], lut[int(b)]] for a, b in bonds[inside]])
        d0 = np.linalg.norm(xn[local][lb[:, 0]] - xn[local][lb[:, 1]], axis=1)
        for p, chi_t in zip(pos, tgt):
            lq = [[lut[int(a)] for a in q[c]] for c in range(q.shape[0])]
            chi = np.array([dihedral_deg(*p[lq[c]]) for c in range(q.shape[0])])
            diff = (chi - chi_t[:q.shape[0]] + 180.0) % 360.0 - 180.0
            assert np.abs(diff).max() < 1e-6, tname
            assert np.allclose(np.linalg.norm(p[lb[:, 0]] - p[lb[:, 1]], axis=1), d0, atol=1e-9)


def test_fsc_map_term_fast_path_and_coarse_grid():
    """The fsc map term scores only the shells it uses against a precomputed reference
    spectrum (equal to core_similarity.fsc), and on a grid Fourier-cropped to ~resolution/3 (FSC is
    blind to the wider model Gaussians that grid needs) it keeps the score and its gradient."""
    from cryogmm.core import similarity as core_similarity
    from cryogmm.core.gaussians import ELECTRONS, sigma_from_resolution
    from cryogmm.io.maps import MapGrid
    from cryogmm.model.refine.mapterm import MapTerm

    t = build_topology(ADK, add_hydrogens=False)
    sel = np.nonzero(t.res_index < 60)[0]
    x = torch.as_tensor(t.coords[sel])
    amp = torch.tensor([ELECTRONS.get(e, 6) for e in t.element[sel]], dtype=torch.float64)
    lo = x.min(0).values.numpy() - 6.0
    n = int(np.ceil(float((x.max(0).values - x.min(0).values).max()) + 12.0))
    n += n % 2
    ref = splat(x, amp, sigma_from_resolution(4.0), (n, n, n), 1.0, lo).numpy()
    ref = ref + np.random.default_rng(0).normal(scale=0.2 * ref.std(), size=ref.shape)
    grid = MapGrid(data=ref, apix=1.0, origin_A=lo, path="mem")
    g = torch.Generator().manual_seed(0)
    y = x + 0.5 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    full = MapTerm(grid, 4.0, "fsc", amp, resample=False)
    coarse = MapTerm(grid, 4.0, "fsc", amp)
    assert coarse.ref.shape[0] < 0.8 * n and coarse.kmax == full.kmax
    expect = core_similarity.fsc(full.model_map(y), full.ref)[1:full.kmax + 1].mean()
    grads = []
    for mt in (full, coarse):
        yy = y.clone().requires_grad_(True)
        s = mt.score(yy)
        s.backward()
        grads.append(yy.grad)
        assert float(s) == pytest.approx(float(expect), abs=1e-10 if mt is full else 2e-3)
    cos = float((grads[0] * grads[1]).sum() / grads[0].norm() / grads[1].norm())
    assert cos > 0.995


def _splat_before(x, amp, sigma, shape, apix, origin_A, cut=3.0):
    """density.splat as it was before the scale work (issue 17): the amplitude multiplied into
    the [N, K, K, K] stencil last, the grid summed out of place; the reference for the test below."""
    import math

    dev, dt = x.device, x.dtype
    nz, ny, nx = shape
    org = torch.as_tensor(np.asarray(origin_A, dtype=np.float64), dtype=dt, device=dev)
    s = torch.as_tensor(sigma, dtype=dt, device=dev)
    r = int(math.ceil(cut * float(s) / apix)) + 1
    u = (x - org) / apix
    base = torch.floor(u.detach()).long() - r + 1
    idx = base[:, :, None] + torch.arange(2 * r, device=dev)[None, None, :]
    g = torch.exp(-0.5 * (((idx.to(dt) - u[:, :, None]) * apix) / s) ** 2)
    norm = amp / (2 * math.pi * (s**2)) ** 1.5
    lim = torch.tensor([nx, ny, nz], device=dev)
    g = g * ((idx >= 0) & (idx < lim[None, :, None]))
    idxc = torch.minimum(idx.clamp(min=0), (lim - 1)[None, :, None])
    gx, gy, gz = g[:, 0], g[:, 1], g[:, 2]
    w = (gz[:, :, None, None] * gy[:, None, :, None] * gx[:, None, None, :]) * norm[:, None, None, None]
    flat = (idxc[:, 2, :, None, None] * ny + idxc[:, 1, None, :, None]) * nx + idxc[:, 0, None, None, :]
    out = torch.zeros(nz * ny * nx, dtype=dt, device=dev)
    return out.index_add(0, flat.reshape(-1), w.reshape(-1)).reshape(nz, ny, nx)


def test_refinement_objective_unchanged_by_the_scale_changes(tmp_path, monkeypatch):
    """The objective of a refinement step (Refiner.step_loss: restraints + fsc map term) and its
    gradient, for the rigid-patch, per-residue and per-atom parameterisations, equal what the
    earlier formulation gave (splat's product order and out-of-place sum, autograd's gradient of
    rfftn instead of cryogmm.core.fourier.rfftn_ortho's irfftn) to 1e-9 relative, on a protease
    dimer with its inhibitor whose map box (62 = 2 x 31) is odd-sized in Fourier terms."""
    import sys

    import cryogmm.model.refine.mapterm as mapterm_mod
    from cryogmm.model.refine.config import RefineModelConfig
    from cryogmm.model.refine.job import checked_config, read_inputs
    from cryogmm.model.refine.refiner import Refiner

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from identical_outputs import splat_map

    pdb = Path(__file__).parent / "data" / "hivp_1hvr_xk2.pdb"
    splat_map(pdb, tmp_path / "map.mrc", resolution=4.0, apix=1.2, pad=8.0, noise=0.1, seed=0, box=62)
    cfg = checked_config(RefineModelConfig(model=pdb, map=tmp_path / "map.mrc", resolution_A=4.0, out=tmp_path / "o"))
    topo, grid = read_inputs(cfg)
    rf = Refiner(topo, cfg, grid)
    g = torch.Generator().manual_seed(0)
    shake = 0.3 * torch.randn(len(rf.move), 3, generator=g, dtype=torch.float64)

    def evaluate():
        out = []
        for labels, blur in ((rf.patch_labels(8), 3.0), (rf.residue_labels(), 1.5), (None, 0.0)):
            mt = mapterm_mod.MapTerm(grid, 4.0, "fsc", rf.amp, blur_A=blur, dtype=rf.dt, device=rf.dev)
            if labels is None:
                x0 = rf.x_all[rf.move_t] + shake
                params, fn, skip = [torch.zeros_like(x0, requires_grad=True)], (lambda ps, x0=x0: x0 + ps[0]), {}
            else:
                params, fn, skip = rf.rigid_parameters(labels)
                with torch.no_grad():
                    params[1] += 0.2 * torch.randn(params[1].shape, generator=g, dtype=torch.float64)
            with rf.rs.weights_set(**skip):
                loss, geo, s, _ = rf.step_loss(params, fn, mt, 0.7)
                loss.backward()
            out.append((float(loss), float(s), torch.cat([p.grad.reshape(-1) for p in params])))
        return out

    g.manual_seed(1)
    new = evaluate()
    monkeypatch.setattr(mapterm_mod, "rfftn_ortho", lambda x: torch.fft.rfftn(x, norm="ortho"))
    monkeypatch.setattr(mapterm_mod, "splat", _splat_before)
    g.manual_seed(1)
    old = evaluate()
    for (ln, sn, gn), (lo, so, go) in zip(new, old):
        assert ln == pytest.approx(lo, rel=1e-9) and sn == pytest.approx(so, rel=1e-9)
        assert float((gn - go).norm() / go.norm()) < 1e-9 and float(go.norm()) > 0
