"""Rigid stages: k-means patches coarse to fine, regrouped into motion domains by clustering
their rigid motions (DynDom-style), then the fit redone with the domains."""

from __future__ import annotations

import numpy as np
import torch

from cryogmm.core.rotations import weighted_kabsch
from cryogmm.model.refine.config import RefineModelConfig
from cryogmm.model.refine.mapterm import MapTerm
from cryogmm.model.refine.refiner import Refiner


def motion_domains(x0: np.ndarray, x1: np.ndarray, labels: np.ndarray, res_of_atom: np.ndarray,
                   threshold_A: float = 1.5, min_residues: int = 12):
    """Group patches that moved together into domains (DynDom's idea, on patch motions).

    ``x0``/``x1 [N, 3]``: atoms before/after a patch-wise rigid fit; ``labels [N]`` the patch of
    each atom; ``res_of_atom [N]`` its residue. Each patch's rigid motion ``T_k`` is its Kabsch
    fit from ``x0`` to ``x1``; the distance between two patches is the RMS, over both patches'
    atoms, of ``|T_k x - T_l x|`` (Å): how differently they moved. Average-linkage clustering
    cut at ``threshold_A``; domains under ``min_residues`` residues join the domain whose motion
    is closest. Returns domain labels per atom (``0..D-1``) and the pairwise distances."""
    from scipy.cluster.hierarchy import fcluster, linkage

    k = int(labels.max()) + 1
    Rs, ts = [], []
    for j in range(k):
        p, q = torch.as_tensor(x0[labels == j]), torch.as_tensor(x1[labels == j])
        R, t = weighted_kabsch(p[None], q, torch.ones(len(p), dtype=p.dtype))
        Rs.append(R[0].numpy()); ts.append(t[0].numpy())
    dist = np.zeros((k, k))
    for a in range(k):
        for b in range(a + 1, k):
            pts = x0[(labels == a) | (labels == b)]
            diff = pts @ (Rs[a] - Rs[b]).T + (ts[a] - ts[b])
            dist[a, b] = dist[b, a] = float(np.sqrt((diff ** 2).sum(1).mean()))
    if k == 1:
        return np.zeros(len(labels), dtype=np.int64), dist
    iu = np.triu_indices(k, 1)
    dom = fcluster(linkage(dist[iu], method="average"), t=threshold_A, criterion="distance") - 1
    nres = lambda d: len(np.unique(res_of_atom[np.isin(labels, np.nonzero(dom == d)[0])]))  # noqa: E731
    while True:
        sizes = {int(d): nres(d) for d in np.unique(dom)}
        small = [d for d, n in sizes.items() if n < min_residues]
        if not small or len(sizes) == 1:
            break
        d = min(small, key=lambda q: sizes[q])
        members = np.nonzero(dom == d)[0]
        others = [o for o in sizes if o != d]
        # the domain whose patches moved most like this one's
        best = min(others, key=lambda o: dist[np.ix_(members, np.nonzero(dom == o)[0])].mean())
        dom[members] = best
    _, dom = np.unique(dom, return_inverse=True)
    return dom[labels].astype(np.int64), dist


def rigid_stage(rf: "Refiner", cfg: RefineModelConfig, grid):
    """Rigid bodies coarse to fine; then, when the patches moved as a few domains, again from
    the start with those motion domains as the coarse bodies (kept if the map agrees better)."""
    n = cfg.steps
    lr, floor = cfg.extra.get("rigid_lr", 0.5), cfg.extra.get("rigid_min_weight", 1e-3)
    terms = {}

    def term(blur):
        if blur not in terms:
            terms[blur] = MapTerm(grid, cfg.resolution_A, cfg.similarity, rf.amp, blur_A=blur, dtype=rf.dt, device=rf.dev)
        return terms[blur]

    def run(levels, tag="", steps=n):
        for labels, name, blur in levels:
            rf.map_k = 1.0
            # patches may stretch the bonds between them (repaired by later stages)
            rf.rigid_bodies(labels, f"{tag}{name}_blur{blur:g}", steps, term(blur), lr_t=lr, floor=floor)

    fine = rf.patch_labels(cfg.n_patches)
    # the first pass, coarse to fine, also finds the motion domains (``domain_probe_steps``
    # per level when the domains are regrouped: it only has to show which patches move together)
    probe = n if not cfg.extra.get("motion_domains", True) else cfg.extra.get("domain_probe_steps", n)
    run([(rf.patch_labels(k) if k != cfg.n_patches else fine, f"rigid{k}", blur)
         for k, blur in cfg.extra.get("rigid_levels", ((1, 8.0), (8, 5.0), (cfg.n_patches, 3.0)))], steps=probe)
    if not cfg.extra.get("motion_domains", True) or cfg.n_patches < 4:
        return
    x0 = rf.start[rf.move_t].cpu().numpy()
    x1 = rf.x_all[rf.move_t].cpu().numpy()
    dom, _ = motion_domains(x0, x1, fine, rf.topo.res_index[rf.move],
                            threshold_A=cfg.extra.get("domain_threshold_A", 1.5),
                            min_residues=cfg.extra.get("domain_min_residues", 12))
    n_dom = int(dom.max()) + 1
    first = np.unique(rf.topo.res_index[rf.move], return_index=True)[1]
    sizes = np.bincount(dom[first], minlength=n_dom)
    rf.log.append(dict(phase="motion_domains", n_domains=n_dom, residues_per_domain=sizes.tolist()))
    if n_dom < 2:
        return
    with torch.no_grad():
        final_term = term(3.0)
        s_patches = float(final_term.score(rf.x_all[rf.heavy_t]))
    kept = rf.x_all.clone()
    traj_len = len(rf.trajectory)
    rf.x_all = rf.start.clone()
    run([(dom, f"domains{n_dom}", 5.0), (dom, f"domains{n_dom}", 3.0), (fine, f"rigid{cfg.n_patches}", 3.0)], tag="d_")
    with torch.no_grad():
        s_domains = float(final_term.score(rf.x_all[rf.heavy_t]))
    rf.log.append(dict(phase="motion_domains_choice", map_patches=s_patches, map_domains=s_domains,
                       kept="domains" if s_domains >= s_patches else "patches"))
    if s_domains < s_patches:
        rf.x_all = kept
        del rf.trajectory[traj_len:]
