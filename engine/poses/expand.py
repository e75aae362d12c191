"""Symmetry expansion of a particle table: one row per particle and symmetry operator, poses
composed with each operator (focused refinement of one copy)."""

from __future__ import annotations

import numpy as np


def expand_table(table, ops, R=None, S=None):
    """Symmetry-expanded copy of a ``ParticleTable``: ``K`` rows per particle (same image,
    same half set) with poses ``A R_k``; ``rlnCryogmmSymCopy`` (1..K) and
    ``rlnCryogmmParticle`` (1-based input row) name each copy. ``R [n,3,3]`` / ``S [n,2]``
    override the table's poses. Returns the expanded table."""
    K, n = len(ops), table.n
    A = np.asarray(table.rotmat if R is None else R, dtype=np.float64)
    sh = np.asarray(table.shift_A if S is None else S, dtype=np.float64)
    rows = np.repeat(np.arange(n), K)
    copy = np.tile(np.arange(K), n)
    RE = np.einsum("nij,njk->nik", A[rows], np.asarray(ops)[copy])
    t = table.subset(rows).with_poses(rotmat=RE, shift_A=sh[rows])
    return t.with_columns(rlnCryogmmSymCopy=copy + 1, rlnCryogmmParticle=rows + 1)
