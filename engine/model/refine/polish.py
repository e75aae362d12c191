"""The polish of model refinement: the weakest geometry weight that meets the geometry goals,
the Ramachandran guard after residue stages, and the Ramachandran repair."""

from __future__ import annotations

import numpy as np
import torch

from cryogmm.model.refine.config import RefineModelConfig
from cryogmm.model.refine.refiner import Refiner
from cryogmm.model.refine.relax import lbfgs_relax
from cryogmm.model.restraints import ROTAMER_OUTLIER, Restraints
from cryogmm.model.rotamers import flip_for_rama
from cryogmm.model.validate import clashes, rama_table, rmsz, rotamer_table


def rama_guard(rf: "Refiner", x_before: torch.Tensor, max_rounds: int = 3):
    """Undo the residue stage where it left new Ramachandran outliers. Residues moved as
    separate rigid bodies with a weak geometry weight can flip a peptide into a region the
    full-atom stage cannot climb out of (adenylate kinase at 4 Å, fsc: Ala73/Asp76 ended as
    outliers). Run after a full-atom stage that has another one after it: for each outlier
    that the model before the residue stage (``x_before``) did not have, the residue and its
    neighbours (a window that grows by one per round) go back to their positions before the
    residue stage; the next full-atom stage joins them to the rest. Outliers that a full
    stage already repaired (the kinking helix of Blau & Lindahl's test passes through some)
    are left alone."""

    topo = rf.topo

    def outliers(x):
        _, _, _, verdict = rama_table(rf.rs, x)
        return {int(topo.rama_res[i]) for i, v in enumerate(verdict) if v == "outlier"}

    with torch.no_grad():
        old = outliers(x_before)
        reverted = set()
        for rnd in range(max_rounds):
            new = outliers(rf.x_all) - old
            if not new:
                break
            win = {r + d for r in new for d in range(-1 - rnd, 2 + rnd)}
            reverted |= win
            sel = torch.as_tensor(np.isin(topo.res_index, sorted(win)) & topo.movable & ~topo.is_h, device=rf.dev)
            x = rf.x_all.clone()
            x[sel] = x_before[sel]
            rf.x_all = rf.rs.with_h(x)
        left = sorted(outliers(rf.x_all) - old)
    rf.log.append(dict(phase="rama_guard", residues_reverted=len(reverted),
                       new_outliers_left=[topo.res_label(r) for r in left]))


def polish_rounds(rf: "Refiner", cfg: RefineModelConfig, mt, w: float, n: int):
    """Full-atom L-BFGS on map + geometry after the Adam phase, at the weakest geometry weight
    whose model meets the geometry targets (as real-space refinement programs choose their
    weight against a geometry target).

    The geometry weight (all terms) is ``f x W`` with ``W = max(polish_torsion_factor x w,
    polish_min_weight)`` (w: the stage's automatic weight) and ``f`` rising through
    ``polish_tighten_schedule`` (0.1, 0.15, 0.2, 0.3, 0.5, 1). The first round whose model has
    bond and angle RMSZ <= ``polish_rmsz_target`` (0.7), no Ramachandran outlier, rotamer
    outliers <= 1 % and clashscore <= ``polish_max_clashscore`` (1) is kept; when none does,
    the firmest. The first round starts from the Adam phase's model with ``polish_iters``
    evaluations, each later one goes on from the round before with a third of them
    (``polish_chain``; restarting every round from the Adam model gave the same AdK figures,
    Cα 0.30 vs 0.30 Å, at twice the cost). After a round left Ramachandran outliers, their
    peptides are turned where that cures them (``model_rotamers.flip_for_rama``,
    ``polish_flip_rama``) before the next round.

    Measured on adenylate kinase (closed model into the open form's maps, fsc): the earlier
    polish (torsion and contact terms held at the firm W while only the covalent weight
    relaxed, round after round from the firm end) pulled Cα from 0.25 to 0.32 Å and the 3 Å
    map CC to 0.871-0.879: log-density Ramachandran and rotamer terms at full weight drag
    every residue toward its mode centre. Starting each round from the Adam model with
    all terms scaled (and the peptide-flip scan at 3 Å) gave Cα 0.18 Å and CC 0.900 at 3 Å,
    0.32 Å and 0.902 at 4 Å; with the rounds chained and the probe-like clash relief, 0.21 Å /
    0.895 and 0.30 Å / 0.901 (benchmarks/results/refine_model_gromacs.json).
    ``polish_order="relax"`` keeps the earlier schedule (``polish_schedule``), which the model
    series' captures use."""

    W = max(w * cfg.extra.get("polish_torsion_factor", 3.0), cfg.extra.get("polish_min_weight", 1.0))
    target = cfg.extra.get("polish_rmsz_target", 0.7)
    iters = cfg.extra.get("polish_iters", max(2 * n, 100))
    if cfg.extra.get("polish_order", "tighten") == "relax":
        return _polish_relax(rf, cfg, mt, W, target, iters)
    schedule = cfg.extra.get("polish_tighten_schedule", (0.1, 0.15, 0.2, 0.3, 0.5, 1.0))
    max_clash = cfg.extra.get("polish_max_clashscore", 1.0)
    chain = cfg.extra.get("polish_chain", True)
    x0, n0 = rf.x_all.clone(), len(rf.trajectory)
    rounds = []
    schedule = list(schedule)
    extra_round = True
    for k, f in enumerate(schedule):
        if not chain:
            rf.x_all = x0.clone()
            del rf.trajectory[n0:]  # frames of a round that missed the targets
        rf.lbfgs_phase("polish", mt, W * f, iters if k == 0 or not chain else max(iters // 3, 30))
        with torch.no_grad():
            xh = rf.rs.with_h(rf.x_all)
            bond = rmsz(rf.rs.bond_z(xh).cpu().numpy())
            angle = rmsz(rf.rs.angle_z(xh).cpu().numpy())
            rama_verdict = rama_table(rf.rs, xh)[3]
            n_rama = sum(v == "outlier" for v in rama_verdict)
            rot = rotamer_table(rf.rs, xh)
            n_rot = sum(p < ROTAMER_OUTLIER for *_, p in rot)
            n_clash = len(clashes(rf.rs, xh))
        ok = (bond <= target and angle <= target and n_rama == 0
              and n_rot <= 0.01 * len(rot) and 1000.0 * n_clash / rf.topo.n_atoms <= max_clash)
        rounds.append(dict(w_geometry=W * f, bond_rmsz=bond, angle_rmsz=angle, rama_outliers=n_rama,
                           rotamer_outliers=n_rot, clashes=n_clash, map=rf.log[-1]["map"], met_target=ok))
        if ok:
            break
        if chain and n_rama and cfg.extra.get("polish_flip_rama", True):
            # a Ramachandran outlier that the weights do not cure is mostly a peptide turned
            # the wrong way round (phi near 160°: AdK Glu75 at 4 Å); gradients cannot turn it
            # back (its O must cross the backbone), so it is turned here and the next round
            # goes on from there

            out = [int(rf.topo.rama_res[i]) for i, v in enumerate(rama_verdict) if v == "outlier"]
            with torch.no_grad():
                y, turned = flip_for_rama(rf.rs, xh, out)
            rounds[-1]["peptides_turned"] = turned
            if turned:
                rf.x_all = y
                if k == len(schedule) - 1 and extra_round:  # once more at the firmest weight
                    schedule.append(f)
                    extra_round = False
    rf.log.append(dict(phase="polish_schedule", order="tighten", rmsz_target=target,
                       rounds=rounds, kept_w_geometry=rounds[-1]["w_geometry"]))


def _polish_relax(rf, cfg, mt, W, target, iters):
    """The earlier polish: torsion and contact terms (Rama, rotamers, clashes) held at ``W``;
    the covalent terms start at ``W`` and step down (``polish_schedule``: 1, 0.5, 0.3, 0.2,
    0.15, 0.1 x W), each round from the last, while bond and angle RMSZ stay <= ``target``;
    the last model that met it is kept."""

    schedule = cfg.extra.get("polish_schedule", (1.0, 0.5, 0.3, 0.2, 0.15, 0.1))
    base = dict(rf.rs.weights)
    kept, rounds = None, []
    for i, f in enumerate(schedule):
        w_cov = W * f
        with rf.rs.weights_set(**{k: base[k] / f for k in ("rama", "rotamer", "clash")}):
            rf.lbfgs_phase("polish", mt, w_cov, iters if i == 0 else max(iters // 2, 50))
        with torch.no_grad():
            bond = rmsz(rf.rs.bond_z(rf.x_all).cpu().numpy())
            angle = rmsz(rf.rs.angle_z(rf.x_all).cpu().numpy())
        ok = bond <= target and angle <= target
        rounds.append(dict(w_covalent=w_cov, bond_rmsz=bond, angle_rmsz=angle, map=rf.log[-1]["map"], met_target=ok))
        if ok or kept is None:  # the first round is kept even when it misses the target
            kept = (rf.x_all.clone(), len(rf.trajectory))
        if not ok:
            break
    rf.x_all = kept[0]
    del rf.trajectory[kept[1]:]  # frames of a round that missed the target
    rf.log.append(dict(phase="polish_schedule", order="relax", w_torsion=W, rmsz_target=target, rounds=rounds,
                       kept_w_covalent=[r["w_covalent"] for r in rounds if r["met_target"]][-1:] or [W]))


def rama_repair(rs: Restraints, assemble, x_full: torch.Tensor, move_t: torch.Tensor, n_geo: int, anchor_A: float,
                iters: int = 100, rounds: int = 3, window: int = 2, rama_factor: float = 10.0) -> torch.Tensor:
    """Geometry-only repair of the Ramachandran outliers of ``x_full`` (all atoms, H placed):
    a peptide turn that removes an outlier (``model_rotamers.flip_for_rama``), then L-BFGS on
    the geometry with a harmonic tether (``anchor_A``) to the current atoms, released on the
    outliers and ``window`` residues either side, and the Rama weight x ``rama_factor``; up
    to ``rounds`` times or until none is left; then, if anything was repaired, one settling
    L-BFGS at the usual weights with every atom tethered where it is (the Rama-heavy rounds
    left a Cβ deviation on 4AKE). ``assemble(x_move)`` gives all atoms from the moving ones
    (``move_t``). Used after geometry-only refinement (4AKE's Gly42 left the
    outlier region) and on a model series' frames."""

    topo = rs.topo
    res_move = topo.res_index[move_t.cpu().numpy()]

    def tethered(tether):
        return lambda x, delta: (rs.energy(x, place_h=False) + 0.5 * (tether * (delta / anchor_A) ** 2).sum()) / n_geo

    repaired = False
    for _ in range(rounds):
        verdict = rama_table(rs, x_full)[3]
        out = [int(topo.rama_res[k]) for k, v in enumerate(verdict) if v == "outlier"]
        if not out:
            break
        x_full, _ = flip_for_rama(rs, x_full, out)
        near = np.isin(res_move, [r + d for r in out for d in range(-window, window + 1)])
        tether = torch.as_tensor(np.where(near, 0.0, 1.0), dtype=x_full.dtype, device=x_full.device)[:, None]
        with rs.weights_set(rama=rs.weights["rama"] * rama_factor):
            x_full = lbfgs_relax(rs, assemble, x_full[move_t].clone(), tethered(tether), iters)[0]
        repaired = True
    if repaired:  # settle at the usual weights, every atom tethered where it now is
        x_full = lbfgs_relax(rs, assemble, x_full[move_t].clone(), tethered(1.0), iters)[0]
    return x_full
