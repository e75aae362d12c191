"""Rotamer rebuild for ``cryogmm refine-model --rebuild-rotamers``.

Side chains whose rotamer is an outlier are set to each mode of their residue's rotamer
mixture (the shipped Top8000 fit); the best map fit that adds no clash is kept.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["rebuild_rotamers", "set_torsion"]


def rebuild_rotamers(rf, mapterm):
    """Outlier side chains tried at every mode of their rotamer mixture; best map fit kept
    unless it adds clashes."""
    from cryogmm.restraints import ROTAMER_OUTLIER, dihedral, grid_value, reference_tables
    from cryogmm.validate import clashes

    topo, rs = rf.topo, rf.rs
    tabs = reference_tables()["rotamer"]
    x = rf.x_all.detach().clone()
    n_rebuilt = 0
    # bond graph for the atoms moved by each chi
    nbr = [[] for _ in range(topo.n_atoms)]
    for i, j in topo.bonds:
        nbr[i].append(j); nbr[j].append(i)
    for tname, (quads, res) in topo.chis.items():
        tb = tabs[tname]
        for k in range(len(res)):
            chi = torch.rad2deg(dihedral(*(x[torch.as_tensor(quads[k, :, m])] for m in range(4)))).numpy()
            per = tb["hi"] - tb["lo"]
            if grid_value(tb, np.mod(chi - tb["lo"], per)[None] + tb["lo"])[0] >= ROTAMER_OUTLIER:
                continue
            best, best_score = None, None
            base_clash = len(clashes(rs, x))
            for mu in tb["mu"]:
                y = x.clone()
                for c in range(quads.shape[1]):
                    q = quads[k, c]
                    cur = float(torch.rad2deg(dihedral(*(y[int(q[m])] for m in range(4)))))
                    target = float(mu[c]) if c < len(mu) else cur
                    y = set_torsion(y, q, target - cur, nbr, topo)
                sc = float(mapterm.score(y[rf.heavy_t])) if mapterm is not None else 0.0
                if len(clashes(rs, y)) > base_clash:
                    continue
                if best_score is None or sc > best_score:
                    best, best_score = y, sc
            if best is not None:
                x = best
                n_rebuilt += 1
    rf.x_all = rs.with_h(x)
    if rf.on_coords is not None:
        rf.on_coords(rf.x_all.detach().cpu().numpy().copy())
    rf.log.append(dict(phase="rotamers", rebuilt=n_rebuilt))


def set_torsion(x, quad, delta_deg, nbr, topo):
    """Rotate the atoms beyond bond quad[1]-quad[2] (same residue side) by ``delta_deg``."""
    b, c = int(quad[1]), int(quad[2])
    res = topo.res_index[c]
    seen, stack = {b, c}, [c]
    moving = []
    while stack:
        a = stack.pop()
        for n in nbr[a]:
            if n not in seen and topo.res_index[n] == res and topo.atom_name[n] not in ("N", "C", "CA", "O"):
                seen.add(n); moving.append(n); stack.append(n)
    if not moving:
        return x
    axis = x[c] - x[b]
    axis = axis / axis.norm()
    from cryogmm.model_refine import _rotvec_to_rotmat

    R = _rotvec_to_rotmat(axis * math.radians(delta_deg))
    idx = torch.as_tensor(moving)
    y = x.clone()
    y[idx] = (x[idx] - x[c]) @ R.T + x[c]
    return y
