"""Conformation to orientation: each particle's decoded conformation of a masked region
brought into register by a rigid pose change (weighted Kabsch), from a heterogeneity run."""

from __future__ import annotations

import numpy as np
import torch

from cryogmm.core.rotations import rotmat_angle_deg, weighted_kabsch
from cryogmm.errors import MapError, OptionError
from cryogmm.hetero.run import Run
from cryogmm.poses.align import focus_widths


def conformation_to_orientation(R, S, deformed, neutral, weights):
    """Turn each particle's conformational change of a region into a change of orientation.

    ``R [n, 3, 3]``, ``S [n, 2]`` Å: the particles' poses (RELION ``A`` and origin);
    ``deformed [n, N, 3]``: the Gaussian centres of each particle's own conformation;
    ``neutral [N, 3]``: the neutral (reference) centres; ``weights [N]``: how much each
    Gaussian belongs to the region (the mask at its neutral centre times its amplitude).

    The masked RMSD between the particle's conformation and the neutral mixture is minimised
    over rigid motions (weighted Kabsch: ``Rot d_j + t ~ n_j`` in the region). A region point
    of the particle then sits where the neutral region point sits under the pose
    ``A' = A Rot^T`` with origin ``o' = o + (A Rot^T t)[:2]`` (image position ``(A r)[:2] - o``),
    so the projections of the neutral mixture at the new pose and of the particle's own
    conformation at the old one agree inside the mask, for every view. Returns
    ``(R' [n, 3, 3], S' [n, 2], rmsd_before [n], rmsd_after [n])``.
    """
    R = torch.as_tensor(R, dtype=torch.float64)
    S = torch.as_tensor(S, dtype=torch.float64)
    D = torch.as_tensor(deformed, dtype=torch.float64)
    Nn = torch.as_tensor(neutral, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64)
    Rot, t = weighted_kabsch(D, Nn, w)
    wn = w / w.sum()
    before = torch.sqrt((wn * ((D - Nn) ** 2).sum(-1)).sum(-1))
    moved = D @ Rot.transpose(1, 2) + t[:, None]
    after = torch.sqrt((wn * ((moved - Nn) ** 2).sum(-1)).sum(-1))
    A_new = R @ Rot.transpose(1, 2)
    S_new = S + (A_new @ t[:, :, None])[:, :2, 0]
    return A_new, S_new, before, after


def hetero_poses(cfg, table, mask, R, S, apix, dev, progress):
    """Poses from a heterogeneity run (``cfg.hetero``): the conformation of each particle,
    its region (``mask``) brought back onto the neutral model. Returns ``(R, S, figures)``."""

    run = Run(cfg.hetero, device=dev, star=cfg.star, project_dir=cfg.project_dir)
    if run.data.n != table.n:
        raise OptionError("--hetero", f"the run {cfg.hetero} holds {run.data.n} particles but {cfg.star} has "
                          f"{table.n}: give the particles it was trained on")
    progress("conformation to orientation", 0, table.n)
    z = torch.as_tensor(run.encode_all(), dtype=torch.float32)
    base = run.ref.gaussians.to(dev)
    m = focus_widths(base, mask, apix)  # width scaled by 1/(0.25 + 0.75 M): recover M at each centre
    M = ((base.sigmas / m.sigmas) - 0.25) / 0.75
    w = (M.clamp(0, 1) * base.amplitudes.abs()).detach().cpu()
    if float(w.sum()) <= 0:
        raise MapError(cfg.mask, f"covers none of the heterogeneity run's Gaussians ({cfg.hetero})")
    Rn, Sn, before, after = [], [], [], []
    with torch.no_grad():
        for b0 in range(0, table.n, 512):
            zb = z[b0:b0 + 512].to(dev)
            d = run.vae.deformer(base, zb).centers.cpu()
            a, s, rb, ra = conformation_to_orientation(R[b0:b0 + 512], S[b0:b0 + 512], d, base.centers.cpu(), w)
            Rn.append(a.float()); Sn.append(s.float()); before.append(rb); after.append(ra)
            progress("conformation to orientation", min(b0 + 512, table.n), table.n)
    Rn, Sn = torch.cat(Rn), torch.cat(Sn)
    before, after = torch.cat(before).numpy(), torch.cat(after).numpy()
    dang = rotmat_angle_deg(Rn.double(), R.double()).numpy()
    figures = {"run": str(cfg.hetero), "zdim": int(z.shape[1]),
               "region_rmsd_A": {"before_median": float(np.median(before)), "after_median": float(np.median(after))},
               "pose_change_deg": {"median": float(np.median(dang)), "p90": float(np.percentile(dang, 90))}}
    return Rn, Sn, figures
