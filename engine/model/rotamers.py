"""Rotamer rebuild for ``cryogmm refine-model`` (the ``rotamers`` stage).

Into a map (:func:`fit_side_chains`): every side chain is tried at each mode of its
residue's rotamer mixture (the shipped Top8000 fit), with chi1 and chi2 also turned by +-15
degrees (offsets that leave the allowed region are dropped), and scored by the map's density
at its atoms beyond CB (electron-weighted, cubic-spline interpolation), as in real-space
rotamer fitting (Coot's auto-fit rotamer). The best candidate that adds no clash is kept
when it beats the current conformation; a rotamer outlier always takes the best one. A local score
is what separates the candidates: a global map similarity barely changes when one side
chain moves (on adenylate kinase at 4 Å, a global relative-entropy search changed 103 side
chains but raised the map CC only from 0.807 to 0.810).

Clashes are counted only around the moved atoms (:func:`_local_clashes`: the same pairs,
radii and H-bond relief as the whole-model count, whose change it equals), which made the
stage about three times faster on adenylate kinase than a whole neighbour-list rebuild per
candidate.

Peptide flips (:func:`fit_peptides`, run before the side chains at 3.5 Å or better): each
trans peptide turned about its CA-CA axis, kept when its C, O and N gain density.

Base flips (:func:`fit_bases`): each nucleotide's base turned about its glycosidic bond
(anti <-> syn), kept when its atoms gain density without a new clash.

Without a map (:func:`rebuild_rotamers`): only outlier side chains move, to the nearest
allowed conformation (modes with chi1/chi2 offsets) that adds no clash.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryogmm.core.gaussians import ELECTRONS
from cryogmm.core.rotations import axis_rotation, dihedral_deg, rotvec_to_rotmat
from cryogmm.model.restraints import (
    CLASH_OVERLAP,
    HBOND_RELIEF,
    ROTAMER_OUTLIER,
    grid_value,
    is_excluded,
    reference_tables,
)
from cryogmm.model.trials import Near, RidingH, Trial
from cryogmm.model.validate import rama_table


def _bond_graph(topo):
    """Bonded neighbours of every atom (for the atoms each chi turns)."""
    nbr = [[] for _ in range(topo.n_atoms)]
    for i, j in topo.bonds:
        nbr[i].append(j); nbr[j].append(i)
    return nbr


def _movable_chis(topo, tabs):
    """(rotamer table, χ atom quadruples) of every side chain with χ angles that may move."""
    for tname, (quads, res) in topo.chis.items():
        for k in range(len(res)):
            if topo.movable[int(quads[k][0, 2])]:
                yield tabs[tname], quads[k]


def _chi_angles(xn, q) -> np.ndarray:
    """χ angles (degrees) of one side chain at coordinates ``xn``."""
    return np.array([dihedral_deg(*xn[q[c]]) for c in range(q.shape[0])])


def _is_outlier(tb, chi_deg) -> bool:
    """Whether chi angles ``chi_deg`` lie outside the allowed region of rotamer table ``tb``."""

    per = tb["hi"] - tb["lo"]
    return bool(grid_value(tb, np.mod(np.asarray(chi_deg) - tb["lo"], per)[None] + tb["lo"])[0] < ROTAMER_OUTLIER)


def _nearer_targets(tb, chi, chi_offsets, n_chi, steps=(0.25, 0.5, 0.75)) -> np.ndarray:
    """Allowed chi targets of table ``tb`` for a side chain at ``chi``: those of
    :func:`_allowed_targets` and the allowed points part of the way to each of them (``steps``
    of the shortest turn of every chi), so the nearest allowed conformation is not forced to a
    mode's centre: an outlier just outside an allowed region moves a few degrees, not to the
    middle of it."""
    tgt = _allowed_targets(tb, chi_offsets, min(2, n_chi))
    chi = np.asarray(chi, dtype=np.float64)[: tgt.shape[1]]
    d = (tgt - chi + 180.0) % 360.0 - 180.0
    part = np.concatenate([chi + t * d for t in steps])
    per = tb["hi"] - tb["lo"]
    ok = grid_value(tb, np.mod(part - tb["lo"], per) + tb["lo"]) >= ROTAMER_OUTLIER
    return np.concatenate([part[ok], tgt])


def rebuild_rotamers(rf, chi_offsets=(0.0, -15.0, 15.0, -30.0, 30.0)):
    """Without a map: each outlier side chain goes to the allowed conformation nearest to it
    (each rotamer mode with chi1 and chi2 turned by ``chi_offsets``, and the allowed points a
    quarter, half and three quarters of the way there from the side chain's own chis;
    candidates ordered by the side-chain atoms' RMS displacement) that adds no clash; it stays
    when every candidate clashes. Nearest, because without a map the side chain's place is the
    only evidence (a model series' frame, a deposited model)."""

    topo, rs = rf.topo, rf.rs
    tabs = reference_tables()["rotamer"]
    nbr = _bond_graph(topo)
    x = rs.with_h(rf.x_all.detach().clone())
    xn = x.detach().cpu().numpy().copy()
    near = Near(xn)
    riding = RidingH(rs)
    n_rebuilt = n_left = 0
    for tb, q in _movable_chis(topo, tabs):
        chi = _chi_angles(xn, q)
        if not _is_outlier(tb, chi):
            continue
        local, _, S, built = _chi_candidates(xn, q, nbr, topo, tb, chi_offsets,
                                             targets=_nearer_targets(tb, chi, chi_offsets, q.shape[0]))
        heavy = ~topo.is_h[local]
        p0 = xn[local]
        cands = sorted(((float(np.sqrt(((pos - p0)[heavy] ** 2).sum(1).mean())), pos) for pos in built),
                       key=lambda c: c[0])
        base = _local_clashes(rs, xn, S, near, ACCEPTED)
        trial = Trial(x, xn, riding)
        for _, pos in cands:
            ch = trial.apply(local, pos)
            if _local_clashes(rs, xn, S, near, ch) <= base:
                near.accept(xn, ch)
                n_rebuilt += 1
                break
            trial.undo()
        else:
            n_left += 1
    rf.x_all = rs.with_h(x)
    if rf.on_coords is not None:
        rf.on_coords(rf.x_all.detach().cpu().numpy().copy())
    rf.log.append(dict(phase="rotamers", changed=n_rebuilt, left=n_left,
                       scoring="nearest allowed conformation without new clashes (no map)"))


def _side_chain_atoms(topo, r):
    """The movable heavy side-chain atoms (beyond Cβ) of residue ``r``, in atom order (the
    selection over the whole model made once per topology, then looked up per residue)."""
    cache = getattr(topo, "_side_chain_cache", None)
    if cache is None:
        sel = np.nonzero(~topo.is_h & topo.movable & ~np.isin(topo.atom_name, ["N", "CA", "C", "O", "CB", "OXT"]))[0]
        order = np.argsort(topo.res_index[sel], kind="stable")
        cache = (sel[order], topo.res_index[sel][order])
        object.__setattr__(topo, "_side_chain_cache", cache)
    atoms, res = cache
    return atoms[np.searchsorted(res, r, side="left"):np.searchsorted(res, r, side="right")]


def _moving_atoms(quad, nbr, topo):
    """Atoms turned by the torsion ``quad``: those beyond bond quad[1]-quad[2] in the same
    residue, backbone excluded."""
    b, c = int(quad[1]), int(quad[2])
    res = topo.res_index[c]
    seen, stack, moving = {b, c}, [c], []
    while stack:
        a = stack.pop()
        for n in nbr[a]:
            if n not in seen and topo.res_index[n] == res and topo.atom_name[n] not in ("N", "C", "CA", "O"):
                seen.add(n); moving.append(n); stack.append(n)
    return moving


_TARGETS: dict = {}


def _allowed_targets(tb, chi_offsets, n_off: int) -> np.ndarray:
    """Chi targets ``[C, d]`` of table ``tb``: each rotamer mode with its first ``n_off`` chis
    turned by ``chi_offsets`` (every combination), those that leave the allowed region
    dropped; the same for every residue of a type, so computed once per table."""
    import itertools

    key = (id(tb), tuple(chi_offsets), n_off)
    if key not in _TARGETS:
        mu = np.asarray(tb["mu"], dtype=np.float64)
        offs = np.array(list(itertools.product(chi_offsets, repeat=n_off)), dtype=np.float64).reshape(-1, n_off)
        tgt = np.repeat(mu, len(offs), axis=0)
        tgt[:, :n_off] += np.tile(offs, (len(mu), 1))
        per = tb["hi"] - tb["lo"]
        ok = grid_value(tb, np.mod(tgt - tb["lo"], per) + tb["lo"]) >= ROTAMER_OUTLIER
        _TARGETS[key] = (tb, tgt[ok])  # tb kept alive so its id stays its own
    return _TARGETS[key][1]


def _chi_candidates(xn, q, nbr, topo, tb, chi_offsets, targets=None):
    """The allowed side-chain conformations of one residue: each rotamer mode of table ``tb``
    with chi1 and chi2 turned by ``chi_offsets`` (offsets that leave the allowed region are
    dropped), or the chi ``targets [C, d]`` given, built from the atoms at ``xn`` by turning the
    chis of quads ``q`` (all candidates at once). Returns ``(local atom indices, {atom: row in
    local}, atoms chi1 moves, positions of the local atoms per candidate [C, L, 3])``."""
    movers = [np.asarray(_moving_atoms(q[c], nbr, topo), dtype=np.int64) for c in range(q.shape[0])]
    local = np.unique(np.concatenate([movers[0], q.ravel()]))
    lut = {int(a): i for i, a in enumerate(local)}
    lq = np.array([[lut[int(a)] for a in q[c]] for c in range(q.shape[0])])
    lmov = [np.array([lut[int(a)] for a in m], dtype=np.int64) for m in movers]
    tgt = _allowed_targets(tb, chi_offsets, min(2, q.shape[0])) if targets is None else targets
    pos = np.repeat(xn[local][None], len(tgt), axis=0)  # [C, L, 3]
    for c in range(min(tgt.shape[1], q.shape[0])):
        i0, i1, i2, i3 = lq[c]
        axis = pos[:, i2] - pos[:, i1]
        R = axis_rotation(axis / np.linalg.norm(axis, axis=-1, keepdims=True),
                           tgt[:, c] - dihedral_deg(pos[:, i0], pos[:, i1], pos[:, i2], pos[:, i3]))
        m = lmov[c]
        if len(m):
            piv = pos[:, i2][:, None, :]
            pos[:, m] = np.einsum("cij,cmj->cmi", R, pos[:, m] - piv) + piv
    return local, lut, movers[0], pos


def _density_sampler(grid):
    """The map's density at points ``[N, 3]`` (Å): cubic-spline interpolation, 0 outside."""
    from scipy.ndimage import map_coordinates, spline_filter

    coef = spline_filter(np.asarray(grid.data, dtype=np.float64), order=3, mode="constant")
    origin, apix = np.asarray(grid.origin_A, dtype=np.float64), float(grid.apix)

    def density(xyz):
        u = (xyz - origin) / apix
        return map_coordinates(coef, [u[:, 2], u[:, 1], u[:, 0]], order=3, mode="constant", prefilter=False)

    return density


ACCEPTED = np.zeros(0, dtype=np.int64)  # ``changed`` of a model that is the accepted one (no atom changed)


def _local_clashes(rs, xn: np.ndarray, S: np.ndarray, near: Near | None = None, changed=None) -> int:
    """Serious clashes (overlap >= 0.4 Å after H-bond relief) that involve any atom of ``S``,
    with all atoms at ``xn`` (H placed): the clashes a side-chain move can add or remove,
    counted without a whole neighbour-list rebuild (the same pairs, exclusions and radii as
    :func:`cryogmm.validate.clashes`; polar H rotors are not re-turned). With ``near``, only
    the atoms it finds are measured (the same count); ``changed``: the atoms where ``xn``
    differs from the model ``near`` holds (``ACCEPTED`` when it is that model: the count
    before a candidate), else found by comparing every atom."""

    topo = rs.topo
    J = near.partners(xn, S, changed) if near is not None else np.arange(len(xn))
    d = np.linalg.norm(xn[S][:, None, :] - xn[J][None, :, :], axis=-1)
    si, jj = np.nonzero(d < 4.0)
    i, dd, j = S[si], d[si, jj], J[jj]
    keep = (i != j) & (~np.isin(j, S) | (i < j))  # a pair inside S once
    i, j, dd = i[keep], j[keep], dd[keep]
    a, b = np.minimum(i, j), np.maximum(i, j)
    keep = ~is_excluded(topo, a, b) & (topo.movable[a] | topo.movable[b])
    a, b, dd = a[keep], b[keep], dd[keep]
    if not len(a):
        return 0
    vdw, ph, acc = topo.vdw, topo.polar_h, topo.acceptor
    hb = (ph[a] & acc[b]) | (ph[b] & acc[a])  # polar H on an acceptor (Restraints.overlaps)
    ov = vdw[a] + vdw[b] - dd - HBOND_RELIEF * hb
    return int((ov >= CLASH_OVERLAP - 1e-9).sum())


def fit_side_chains(rf, grid, chi_offsets=(-15.0, 0.0, 15.0), outliers_only: bool = False) -> dict:
    """Real-space rotamer fit of every side chain (see the module docstring). Candidates: each
    rotamer mode with chi1 and chi2 each turned by ``chi_offsets``. ``rf`` is the refiner (its
    ``x_all`` is updated); ``grid`` the map. Returns counts for the log."""

    topo, rs = rf.topo, rf.rs
    tabs = reference_tables()["rotamer"]
    density = _density_sampler(grid)
    zw = np.array([ELECTRONS.get(e, 6) for e in topo.element], dtype=np.float64)
    nbr = _bond_graph(topo)
    x = rs.with_h(rf.x_all.detach().clone())
    rs.optimise_rotors(x)  # polar H turned to the start's contacts once; candidates keep them
    x = rs.with_h(x)
    xn = x.detach().cpu().numpy().copy()
    near = Near(xn)
    riding = RidingH(rs)
    n_res = n_changed = n_rejected = 0
    for tb, q in _movable_chis(topo, tabs):
        is_outlier = _is_outlier(tb, _chi_angles(xn, q))
        if outliers_only and not is_outlier:
            continue
        sc = _side_chain_atoms(topo, topo.res_index[int(q[0, 2])])
        if not len(sc):
            continue
        n_res += 1
        local, lut, S, built = _chi_candidates(xn, q, nbr, topo, tb, chi_offsets)
        lsc = np.array([lut[int(a)] for a in sc], dtype=np.int64)
        w = zw[sc]
        current = float((w * density(xn[local][lsc])).sum())
        scores = (density(built[:, lsc].reshape(-1, 3)).reshape(len(built), -1) * w).sum(1) if len(built) else []
        cands = [(float(sc_), pos) for sc_, pos in zip(scores, built)]
        cands.sort(key=lambda c: -c[0])
        base = None
        trial = Trial(x, xn, riding)
        for score, pos in cands:
            if not is_outlier and score <= current + 1e-9 * abs(current):
                break  # an outlier leaves its conformation for the best allowed one
            if base is None:
                base = _local_clashes(rs, xn, S, near, ACCEPTED)
            ch = trial.apply(local, pos)
            if _local_clashes(rs, xn, S, near, ch) <= base:
                near.accept(xn, ch)
                n_changed += 1
                break
            trial.undo()
            n_rejected += 1
    rf.x_all = rs.with_h(x)
    if rf.on_coords is not None:
        rf.on_coords(rf.x_all.detach().cpu().numpy().copy())
    row = dict(phase="rotamers", side_chains=n_res, changed=n_changed, rejected_for_clashes=n_rejected,
               scoring="density at side-chain atoms")
    rf.log.append(row)
    return row


def _peptides(topo):
    """Trans peptides between consecutive movable residues: rows (CA_i, C_i, O_i, N_i+1, CA_i+1,
    residue index i, residue index i+1)."""
    key = {(int(r), str(n)): i for i, (r, n) in enumerate(zip(topo.res_index, topo.atom_name))}
    rows = []
    n_res = int(topo.res_index.max()) + 1 if len(topo.res_index) else 0
    for r in range(n_res - 1):
        ids = [key.get((r, "CA")), key.get((r, "C")), key.get((r, "O")), key.get((r + 1, "N")), key.get((r + 1, "CA"))]
        if any(i is None for i in ids) or not all(topo.movable[i] for i in ids[1:4]):
            continue
        if topo.chain[ids[1]] != topo.chain[ids[3]] or np.linalg.norm(topo.coords[ids[1]] - topo.coords[ids[3]]) > 2.0:
            continue  # chain break
        if topo.res_name[ids[4]] == "PRO":
            continue  # a flip turns the ring with the N; left to the full-atom stage
        rows.append(ids + [r, r + 1])
    return np.array(rows, dtype=np.int64).reshape(-1, 7)


def _amide_h(topo) -> dict:
    """Riding H by parent atom (the amide H turns with its peptide plane)."""
    h_of = {}
    for k, h in enumerate(topo.h_index):
        h_of.setdefault(int(topo.h_frame[k, 0]), []).append(int(h))
    return h_of


def _plane_turns(xn, row, h_of, angles):
    """The peptide plane of ``row`` (C, O, N and the amide H) turned about its CA-CA axis by
    each of ``angles`` (degrees): yields (plane atom indices, new positions)."""
    ca0, c, o, n, ca1 = (int(v) for v in row[:5])
    plane = np.array([c, o, n] + h_of.get(n, []), dtype=np.int64)
    axis = xn[ca1] - xn[ca0]
    axis = axis / np.linalg.norm(axis)
    for deg in angles:
        R = axis_rotation(axis, deg)
        yield plane, (xn[plane] - xn[ca0]) @ R.T + xn[ca0]


def flip_for_rama(rs, x, residues, angles=tuple(range(140, 230, 10))):
    """Without a map: each trans peptide next to a Ramachandran outlier in ``residues``
    (residue indices) is turned about its CA-CA axis (``angles``) when that leaves fewer
    outliers among its two residues and adds no clash; the turn with the fewest outliers,
    then the most favourable Ramachandran percentiles, is kept. Returns ``(x with H,
    peptides turned)``. Used on a model series' frames, whose outliers are mostly peptides
    the network turned the wrong way (phi near 160 degrees)."""

    topo = rs.topo
    want = {int(r) for r in residues}
    rama_res = {int(r): k for k, r in enumerate(topo.rama_res)}
    h_of = _amide_h(topo)
    x = rs.with_h(x.detach().clone())
    xn = x.cpu().numpy().copy()
    near, riding = Near(xn), RidingH(rs)

    def n_out(xx, rr):
        """(outliers, -summed Rama percentile) of residues ``rr``: fewer outliers first, then
        the more favourable (their own φ/ψ only, not the whole model's per candidate)."""
        _, _, pct, v = rama_table(rs, xx, [rama_res[r] for r in rr if r in rama_res])
        return (sum(vk == "outlier" for vk in v), -float(sum(pct[k] for k in range(len(v)))))

    turned = 0
    for row in _peptides(topo):
        rr = (int(row[5]), int(row[6]))
        if not want.intersection(rr):
            continue
        cur = n_out(x, rr)
        if cur[0] == 0:
            continue
        best, base = None, None
        trial = Trial(x, xn, riding)  # candidates applied in place and undone
        for plane, pos in _plane_turns(xn, row, h_of, angles):
            if base is None:
                base = _local_clashes(rs, xn, plane, near, ACCEPTED)
            ch = trial.apply(plane, pos)
            k = n_out(x, rr)
            if not (k[0] >= cur[0] or (best is not None and k >= best[0])) \
                    and _local_clashes(rs, xn, plane, near, ch) <= base:
                best = (k, plane, pos)
            trial.undo()
        if best is not None:
            ch = trial.apply(best[1], best[2])
            near.accept(xn, ch)
            turned += 1
    return x, turned


def fit_peptides(rf, grid, angles=tuple(range(140, 230, 10)), min_gain: float = 0.25) -> dict:
    """Peptide-flip scan (as Coot's pepflip, done for every peptide): the C, O, N (and amide
    H) of each trans peptide are turned about the CA(i)-CA(i+1) axis by ``angles`` (140 to
    220 degrees); among the turns whose electron-weighted density at C, O and N rises by more
    than ``min_gain`` x the map's standard deviation x the atoms' electrons, the best that adds
    no clash and leaves neither residue a Ramachandran outlier is kept (an exact 180 degree
    turn often strains psi(i)/phi(i+1) into an outlier). The full-atom stage then repairs the bond angles. A
    peptide turned the wrong way round lies outside the reach of gradient refinement (its
    oxygen must cross the backbone); on adenylate kinase at 3 Å (closed model into the open
    map) peptide 45-46 stays flipped otherwise. ``refine_model`` runs it at 3.5 Å or better:
    in the open model's own 4 Å map it turned two correct peptides (Thr31, Leu45), in the
    3 Å map none."""

    topo, rs = rf.topo, rf.rs
    pep = _peptides(topo)
    density = _density_sampler(grid)
    sd = float(np.asarray(grid.data, dtype=np.float64).std()) or 1.0

    zw = np.array([ELECTRONS.get(e, 6) for e in topo.element], dtype=np.float64)
    h_of = _amide_h(topo)
    x = rs.with_h(rf.x_all.detach().clone())
    xn = x.detach().cpu().numpy().copy()
    near = Near(xn)
    riding = RidingH(rs)
    rama_res = {int(r): k for k, r in enumerate(topo.rama_res)} if len(topo.rama) else {}

    def rama_ok(xx, residues):
        # the two residues' φ/ψ only (the whole table per candidate grew with the square of the model)
        verdict = rama_table(rs, xx, [rama_res[r] for r in residues if r in rama_res])[3]
        return all(v != "outlier" for v in verdict)

    n_flipped = n_tested = 0
    flipped = []
    for row in pep:
        c, o, n, r0, r1 = (int(v) for v in row[[1, 2, 3, 5, 6]])
        heavy = np.array([c, o, n], dtype=np.int64)
        w = zw[heavy]
        current = float((w * density(xn[heavy])).sum())
        cands = []
        for plane, pos in _plane_turns(xn, row, h_of, angles):
            score = float((w * density(pos[:3])).sum())
            if score - current > min_gain * sd * w.sum():
                cands.append((score, plane, pos))
        n_tested += 1
        cands.sort(key=lambda c: -c[0])
        base = None
        trial = Trial(x, xn, riding)  # each candidate applied in place and undone: no copy of the model
        for score, plane, pos in cands:
            if base is None:
                base = _local_clashes(rs, xn, plane, near, ACCEPTED)
            ch = trial.apply(plane, pos)
            if _local_clashes(rs, xn, plane, near, ch) <= base and rama_ok(x, (r0, r1)):
                near.accept(xn, ch)
                n_flipped += 1
                flipped.append(topo.res_label(r0))
                break
            trial.undo()
    rf.x_all = rs.with_h(x)
    if rf.on_coords is not None and n_flipped:
        rf.on_coords(rf.x_all.detach().cpu().numpy().copy())
    row = dict(phase="peptides", tested=n_tested, flipped=n_flipped, residues=flipped)
    rf.log.append(row)
    return row


BACKBONE_NA = frozenset({"P", "OP1", "OP2", "OP3", "O1P", "O2P", "O3P"})


def fit_bases(rf, grid, angles=(150.0, 165.0, 180.0, 195.0, 210.0), min_gain: float = 0.25) -> dict:
    """Base flips, the nucleic-acid analogue of the rotamer fit: each nucleotide's base (with its
    H) turned about the glycosidic bond C1'-N9/N1 by ``angles`` (anti <-> syn), kept when the
    electron-weighted density at its heavy atoms rises by more than ``min_gain`` x the map's
    standard deviation x their electrons and no clash is added. A base the wrong way round
    lies outside the reach of gradient refinement (its ring must pass through the sugar)."""

    topo, rs = rf.topo, rf.rs
    if not len(topo.puckers):
        return {}
    density = _density_sampler(grid)
    sd = float(np.asarray(grid.data, dtype=np.float64).std()) or 1.0
    zw = np.array([ELECTRONS.get(e, 6) for e in topo.element], dtype=np.float64)
    x = rs.with_h(rf.x_all.detach().clone())
    xn = x.detach().cpu().numpy().copy()
    near = Near(xn)
    riding = RidingH(rs)
    n_tested, flipped = 0, []
    for row, r in zip(topo.puckers, topo.pucker_res):
        c1, nglyc = int(row[4]), int(row[5])
        idx = topo.residues[int(r)]["atoms"]
        base = np.array([i for i in idx if "'" not in topo.atom_name[i] and topo.atom_name[i] not in BACKBONE_NA
                         and i != nglyc and topo.movable[i]], dtype=np.int64)
        heavy = base[~topo.is_h[base]]
        if len(heavy) < 3:
            continue
        n_tested += 1
        w = zw[heavy]
        current = float((w * density(xn[heavy])).sum())
        axis = xn[nglyc] - xn[c1]
        axis /= np.linalg.norm(axis)
        cands = []
        for a in angles:
            pos = (xn[base] - xn[nglyc]) @ axis_rotation(axis, a).T + xn[nglyc]
            score = float((w * density(pos[~topo.is_h[base]])).sum())
            if score - current > min_gain * sd * w.sum():
                cands.append((score, pos))
        cands.sort(key=lambda c: -c[0])
        before = None
        trial = Trial(x, xn, riding)
        for _, pos in cands:
            if before is None:
                before = _local_clashes(rs, xn, base, near, ACCEPTED)
            ch = trial.apply(base, pos)
            if _local_clashes(rs, xn, base, near, ch) <= before:
                near.accept(xn, ch)
                flipped.append(topo.res_label(int(r)))
                break
            trial.undo()
    rf.x_all = rs.with_h(x)
    if rf.on_coords is not None and flipped:
        rf.on_coords(rf.x_all.detach().cpu().numpy().copy())
    out = dict(phase="bases", tested=n_tested, flipped=len(flipped), residues=flipped)
    rf.log.append(out)
    return out


def set_torsion(x, quad, delta_deg, nbr, topo):
    """Rotate the atoms beyond bond quad[1]-quad[2] (same residue side) by ``delta_deg``."""
    b, c = int(quad[1]), int(quad[2])
    moving = _moving_atoms(quad, nbr, topo)
    if not moving:
        return x
    axis = x[c] - x[b]
    axis = axis / axis.norm()

    R = rotvec_to_rotmat(axis * math.radians(delta_deg))
    idx = torch.as_tensor(moving)
    y = x.clone()
    y[idx] = (x[idx] - x[c]) @ R.T + x[c]
    return y
