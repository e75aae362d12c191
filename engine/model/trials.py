"""Candidate moves of a few atoms for the model's scans (rotamers, peptide and base flips):
which atoms may clash with them (:class:`Near`), their riding H (:class:`RidingH`) and the
move applied in place and undone (:class:`Trial`), so that a candidate costs the atoms it
changes, not the whole model."""

from __future__ import annotations

import numpy as np
import torch

from cryogmm.model.restraints import place_hydrogens, riding_positions


class Near:
    """Which atoms may lie within ``reach`` Å of some points, exactly, without a distance to every
    atom: a KD-tree of the accepted coordinates at one moment, its radius widened by the
    farthest any atom has moved since, plus the atoms a candidate changes. Atoms moved more
    than ``rebuild_A`` since the tree was built (a flipped peptide's O: 2.5 Å) are not held in
    the bound but listed and always returned; the tree is rebuilt when that list passes
    ``max_far`` atoms (a rebuild costs the model: one per flip made the peptide scan grow
    with the square of the model). A stage scans thousands of candidates; the distances to
    the whole model made the side-chain scan grow with the square of the model (66 ms per
    candidate at 98k atoms)."""

    def __init__(self, xn: np.ndarray, reach: float = 4.0, rebuild_A: float = 2.0, max_far: int = 512):
        self.reach, self.rebuild_A, self.max_far = reach, rebuild_A, max_far
        self.cur = xn.copy()
        self._build()

    def _build(self):
        from scipy.spatial import cKDTree

        self.tree, self.ref, self.moved = cKDTree(self.cur), self.cur.copy(), 0.0
        self.far = np.zeros(0, dtype=np.int64)

    def accept(self, xn: np.ndarray, changed: np.ndarray | None = None):
        """``xn`` is now the accepted model (``changed``: a superset of the atoms that differ
        from the last one, if known: no scan of the whole model)."""
        ch = np.nonzero((xn != self.cur).any(1))[0] if changed is None else np.asarray(changed, dtype=np.int64)
        self.cur[ch] = xn[ch]
        if not len(ch):
            return
        d = np.sqrt(((self.cur[ch] - self.ref[ch]) ** 2).sum(1))
        far = d > self.rebuild_A
        if far.any():
            self.far = np.union1d(self.far, ch[far])
            if len(self.far) > self.max_far:
                self._build()
                return
        near = ~far & ~np.isin(ch, self.far)
        if near.any():
            self.moved = max(self.moved, float(d[near].max()))

    def partners(self, pos: np.ndarray, S: np.ndarray, changed: np.ndarray | None = None) -> np.ndarray:
        """Every atom that may lie within ``reach`` of an atom of ``S`` at coordinates ``pos``
        (the accepted model or a candidate that differs from it in a few atoms; ``changed``: a
        superset of those atoms, if known)."""
        p = pos[S]
        hits = self.tree.query_ball_point(p, self.reach + self.moved + 1e-9)
        if changed is None:
            changed = np.nonzero((pos != self.cur).any(1))[0]
        far = self.far
        if len(far):  # the listed atoms inside the box of S widened by the reach (the others are too far)
            fp = pos[far]
            far = far[((fp >= p.min(0) - self.reach - 1e-9) & (fp <= p.max(0) + self.reach + 1e-9)).all(1)]
        return np.unique(np.concatenate([np.asarray(h, dtype=np.int64) for h in hits] + [S, changed, far]))


class RidingH:
    """Riding H re-placed only where a candidate moved heavy atoms: the H whose frames use any of
    them (every other H keeps its place, bit for bit what re-placing all would give)."""

    def __init__(self, rs):
        self.rs = rs
        hf = rs.h_frame.cpu().numpy().reshape(-1, 3)
        flat = hf.reshape(-1)
        self.order = np.argsort(flat, kind="stable") // 3  # H rows sorted by frame atom
        self.keys = np.sort(flat)

    def rows(self, moved: np.ndarray) -> np.ndarray:
        """The riding-H rows whose frames use any atom of ``moved``."""
        lo = np.searchsorted(self.keys, moved, side="left")
        hi = np.searchsorted(self.keys, moved, side="right")
        return np.unique(np.concatenate([self.order[a:b] for a, b in zip(lo, hi)] + [np.zeros(0, np.int64)]))

    def __call__(self, y: torch.Tensor, moved: np.ndarray) -> torch.Tensor:
        rs = self.rs
        rows = self.rows(moved)
        if not len(rows):
            return y
        r = torch.as_tensor(rows, device=y.device)
        return place_hydrogens(y, rs.h_index[r], rs.h_frame[r], rs.h_coef[r])


class Trial:
    """A candidate move of a few atoms applied in place to the accepted model (``x`` torch and
    its copy ``xn`` numpy, riding H re-placed as :class:`RidingH` does) and undone unless
    kept: the work is the atoms changed, not a copy of the whole model per candidate (at 100k
    atoms the copies made the side-chain scan grow with the square of the model)."""

    def __init__(self, x: torch.Tensor, xn: np.ndarray, riding: RidingH):
        self.x, self.xn, self.riding = x, xn, riding
        self.changed, self.saved = None, None

    def apply(self, atoms: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Move ``atoms`` to ``pos`` (and their riding H); returns the atoms changed."""
        x, rs = self.x, self.riding.rs
        rows = self.riding.rows(atoms)
        h_idx = rs.h_index[torch.as_tensor(rows, device=x.device)] if len(rows) else None
        ch = np.unique(np.concatenate([atoms, h_idx.cpu().numpy() if h_idx is not None else np.zeros(0, np.int64)]))
        self.changed, self.saved = ch, (x[torch.as_tensor(ch, device=x.device)].clone(), self.xn[ch].copy())
        x[torch.as_tensor(atoms, device=x.device)] = torch.as_tensor(pos, dtype=x.dtype, device=x.device)
        if h_idx is not None:
            r = torch.as_tensor(rows, device=x.device)
            x[h_idx] = riding_positions(x, rs.h_frame[r], rs.h_coef[r])
        self.xn[ch] = x[torch.as_tensor(ch, device=x.device)].detach().cpu().numpy()
        return ch

    def undo(self):
        self.x[torch.as_tensor(self.changed, device=self.x.device)] = self.saved[0]
        self.xn[self.changed] = self.saved[1]
