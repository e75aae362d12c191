"""The one L-BFGS relaxation of atomic coordinates under restraints plus a map term (used by the
polish of refine-model and the frame polish of refine-series)."""

from __future__ import annotations

import torch

from cryogmm.model.restraints import Restraints


def lbfgs_relax(rs: Restraints, assemble, x0: torch.Tensor, loss_fn, iters: int, progress=None, after_round=None):
    """Two rounds of L-BFGS (strong Wolfe line search) on a displacement ``delta`` of the moving
    heavy atoms ``x0 [N, 3]``, minimising ``loss_fn(x_full, delta)`` where ``x_full =
    assemble(x0 + delta)`` (all atoms, riding H placed). Every 20 evaluations the rotatable polar
    H are turned to their best contacts and the contact pairs refreshed. ``progress(n)`` is
    called after each evaluation, ``after_round(x_full)`` (detached) after each round.
    Returns the final ``x_full`` (detached) and the number of evaluations."""
    with torch.no_grad():  # conformation-dependent (CDL) targets at the start, fixed during the L-BFGS
        rs.refresh_targets(assemble(x0))
    delta = torch.zeros_like(x0, requires_grad=True)
    opt = torch.optim.LBFGS([delta], lr=1.0, max_iter=max(1, iters // 2), history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)
    state = {"n": 0}

    def closure():
        opt.zero_grad()
        if state["n"] % 20 == 0:
            with torch.no_grad():
                xx = assemble(x0 + delta)
                rs.optimise_rotors(xx)
                rs.update_pairs(rs.with_h(xx))
        x = assemble(x0 + delta)
        loss = loss_fn(x, delta)
        loss.backward()
        state["n"] += 1
        if progress is not None:
            progress(state["n"])
        return loss

    for _ in range(2):
        opt.step(closure)
        if after_round is not None:
            with torch.no_grad():
                after_round(assemble(x0 + delta).detach())
    with torch.no_grad():
        return assemble(x0 + delta).detach(), state["n"]
