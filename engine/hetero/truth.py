"""Ground truth for heterogeneity: model files, superposition, and figures against a simulation.

- :func:`write_models` (from :mod:`cryogmm.gmm`): frames of a :class:`cryogmm.gmm.Model` as a multi-model PDB
  (optional per-atom B-factors, e.g. a segment number for colouring).
- :func:`superpose_file`: move one conformation onto another by the Cα atoms of chosen
  residues (Kabsch), so that two endpoints differ by their internal motion only (the
  adenylate kinase files 4AKE/1AKE come in different frames; interpolating them raw mixes
  a global rotation into the "conformational" path).
- :func:`truth_figures`: Spearman correlation of a latent coordinate with the true frame,
  and the Cα RMSD of each particle's decoded model to its true frame.
"""

from __future__ import annotations

import numpy as np

from cryogmm.core.rotations import kabsch
from cryogmm.errors import ModelError
from cryogmm.io.structures import read_model, write_models

# adenylate kinase CORE domain (E. coli numbering): NMP is 30-59, LID 122-159
ADK_CORE = tuple(range(1, 30)) + tuple(range(60, 122)) + tuple(range(160, 215))


def superpose_file(moving, reference, out, residues=None) -> float:
    """Write ``moving`` (first model) superposed onto ``reference`` by the Cα atoms they share
    (only residue numbers in ``residues`` when given). Returns the Cα RMSD over those atoms (Å)."""

    ref, mov = read_model(reference), read_model(moving)
    kr, km = atom_keys(ref), atom_keys(mov)
    ir, im = match_atoms(kr, km)
    ca = ref.atom_name[ir] == "CA"
    if residues is not None:
        ca &= np.isin(ref.seq_id[ir], np.asarray(residues))
    if ca.sum() < 3:
        raise ModelError(moving, f"shares {int(ca.sum())} Cα atoms with {reference}; need at least 3 to superpose")
    R, t = kabsch(ref.coords[0][ir[ca]], mov.coords[0][im[ca]])
    moved = mov.coords[0] @ R.T + t
    write_models(out, mov, moved[None])
    return float(np.sqrt(((moved[im[ca]] - ref.coords[0][ir[ca]]) ** 2).sum(1).mean()))


def atom_keys(model) -> list:
    return list(zip(model.chain.tolist(), model.seq_id.tolist(), model.atom_name.tolist()))


def match_atoms(keys_a, keys_b):
    """Indices ``(ia, ib)`` of the atoms present in both key lists, in ``a``'s order."""
    pos = {k: i for i, k in enumerate(keys_b)}
    ia = [i for i, k in enumerate(keys_a) if k in pos]
    return np.array(ia, dtype=np.int64), np.array([pos[keys_a[i]] for i in ia], dtype=np.int64)


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a), np.asarray(b)).statistic)


def truth_figures(z: np.ndarray, frames: np.ndarray, *, pc1: np.ndarray | None = None, decoded_ca=None,
                  truth_ca=None, reference_ca=None) -> dict:
    """Figures against a simulation's truth.

    ``z [n, D]``: latent means; ``frames [n]``: true frame index; ``pc1 [n]``: the first
    principal component of ``z`` (computed when None). ``decoded_ca [n, C, 3]``: each
    particle's decoded Cα atoms; ``truth_ca [F, C, 3]``: the true frames' Cα atoms (same
    order, same frame); ``reference_ca [C, 3]``: the starting model, for the baseline.
    RMSDs are taken without superposition: poses are given, so a model must sit where the
    particle's molecule sits.
    """
    z = np.asarray(z, dtype=np.float64)
    frames = np.asarray(frames)
    if pc1 is None:
        zc = z - z.mean(0)
        _, _, vt = np.linalg.svd(zc, full_matrices=False)
        pc1 = zc @ vt[0]
    out = {
        "spearman_pc1_vs_frame": spearman(pc1, frames),
        "abs_spearman_pc1_vs_frame": abs(spearman(pc1, frames)),
        "best_abs_spearman_any_latent_dim": max(abs(spearman(z[:, d], frames)) for d in range(z.shape[1])),
        "n_particles": int(len(frames)),
    }
    if decoded_ca is not None and truth_ca is not None:
        t = np.asarray(truth_ca)[frames]
        r = np.sqrt(((np.asarray(decoded_ca) - t) ** 2).sum(-1).mean(-1))
        out["median_ca_rmsd_decoded_vs_true_A"] = float(np.median(r))
        out["p90_ca_rmsd_decoded_vs_true_A"] = float(np.percentile(r, 90))
        if reference_ca is not None:
            r0 = np.sqrt(((np.asarray(reference_ca)[None] - t) ** 2).sum(-1).mean(-1))
            out["median_ca_rmsd_reference_vs_true_A"] = float(np.median(r0))
    return out
