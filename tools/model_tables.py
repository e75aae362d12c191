"""Maintainer script (outside the package): build the reference tables shipped in ``cryogmm/data`` for model refinement and validation.

Run once by a maintainer (not at run time)::

    python tools/model_tables.py CHEM_DATA_DIR

``CHEM_DATA_DIR`` holds ``rotarama_data/`` (Top8000 Ramachandran and rotamer percentile
contour grids, Richardson lab, github.com/rlabduke/reference_data, CC-BY-4.0; Williams et
al. 2018 Protein Sci 27:293) and ``mon_lib/`` (CCP4 monomer library 5.x, LGPL-3; Vagin et
al. 2004 Acta Cryst D60:2184; amino-acid bond and angle targets after Engh & Huber 1991,
2001). The npm package moorhen 0.22.7 carries that library's 5.60 subset this script reads
(``npm pack moorhen@0.22.7``, then ``package/public/baby-gru/data.tar.gz`` ->
``data/ccp4_lib/data/monomers``: use it as ``mon_lib``). Outputs:

``rama_top8000.npz``
    per Ramachandran class the percentile grid (2° bins, φ, ψ in [-180, 180)) quantised to
    uint8 on a log scale, and a Gaussian mixture (weights, means, covariances in degrees)
    fitted by weighted EM to the grid cells above the outlier contour.
``rotamer_top8000.npz``
    per residue type the same for the χ angles (bins as in the source grids).
``geom_monlib.json``
    the CCP4 monomer-library files for the 20 amino acids and MSE, the RNA/DNA nucleotides
    and the ligands of ``LIGANDS``, plus every link and modification block of
    ``mon_lib_list.cif`` (peptide and phosphodiester links, termini, glycosidic links),
    verbatim (LGPL-3 data, redistributed with its notice).

The residues of ``EXTRA_LIGANDS`` (cofactors, nucleotides, ions, cholesterol, glycans) come from
the same library release as carried by the PyPI wheel coot-headless-api 1.3.3rc1 (``pip download
--no-deps coot-headless-api==1.3.3rc1``, unzip, folder
``coot_headless_api/share/coot/lib/data/monomers``; its files for the 37 residues above are
byte-identical to moorhen's), and the lipids and detergents of ``EXTRA_LIPIDS`` from the public
repository MonomerLibrary/monomers (LGPL-3.0, commit ``MONLIB_COMMIT``, one ``<letter>/<CODE>.cif``
per residue; no PyPI or npm package found carries them). Put those files, verbatim, in one folder
laid out as the library is (``h/HEM.cif``, ``p/POV.cif``) and add them to the shipped table without
the moorhen folder::

    python tools/model_tables.py --extend-geom EXTRA_DIR [OUT_DIR]

which keeps every file of the current ``geom_monlib.json`` byte for byte and adds (or, where the
folder has a newer copy, replaces) the residues of ``EXTRA_LIGANDS`` and ``EXTRA_LIPIDS`` the folder
holds; a residue of ``EXTRA_LIGANDS`` the folder lacks must already be in the table.
``python tools/model_tables.py CHEM_DATA_DIR OUT_DIR geom EXTRA_DIR`` rebuilds it from scratch.

Citations and licences are written into each table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

RAMA_FILES = {
    "general": "rama8000-general-noGPIVpreP.data",
    "gly": "rama8000-gly-sym.data",
    "transpro": "rama8000-transpro.data",
    "cispro": "rama8000-cispro.data",
    "prepro": "rama8000-prepro-noGP.data",
    "ileval": "rama8000-ileval-nopreP.data",
}
ROTA_FILES = {k: f"rota8000-{k}.data" for k in (
    "arg", "asn", "asp", "cys", "gln", "glu", "his", "ile", "leu", "lys", "met", "phetyr", "pro", "ser",
    "thr", "trp", "val")}
AMINO = ("ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE", "LEU", "LYS", "MET", "PHE",
         "PRO", "SER", "THR", "TRP", "TYR", "VAL", "MSE")
# RNA and DNA nucleotides (their links and termini are in mon_lib_list.cif)
NUCLEOTIDES = ("A", "C", "G", "U", "DA", "DC", "DG", "DT")
# ligands, cofactors, ions and additives shipped with their dictionaries (every one the source
# folder holds; a residue without one is kept fixed and reported)
LIGANDS = ("ATP", "ADP", "SO4", "PO4", "GOL", "EDO", "PEG", "CIT", "NA")
# added from the coot-headless-api 1.3.3rc1 copy of the library (see the module docstring):
# cofactors and nucleotides, ions, cholesterol, glycans (their glycosidic links and NAG-ASN,
# ``pyr-ASN``, are link blocks of mon_lib_list.cif)
EXTRA_LIGANDS = ("ANP", "GTP", "GDP", "NAD", "NAP", "FAD", "FMN", "SAM", "HEM", "HEC", "COA", "PLP",
                 "MG", "ZN", "CA", "MN", "FE", "K", "CL", "CLR", "NAG", "MAN", "BMA", "FUC", "GAL")
# lipids and detergents of cryo-EM models from MonomerLibrary/monomers at MONLIB_COMMIT (AceDRG dictionaries):
# phospholipids POPC (POV), DOPC (PCW), DOPE (PEE), DLPC (PLC), DSPE (3PE), phosphatidylglycerols DPPG (LHG)
# and POPG (PGW), the detergent DDM (LMT) and cholesteryl hemisuccinate (Y01); those the folder lacks are
# skipped. Cardiolipin (CDL) is left out: the repository's copy (the same at commits 0c2a93ce and 0e2033bf,
# checked 2026-12-03: no AceDRG descriptors, desc_level '.', partial charges) is an old
# libcheck dictionary whose ester C-O targets are 1.454 A (AceDRG's are 1.33-1.34 A).
EXTRA_LIPIDS = ("POV", "PCW", "PEE", "PLC", "3PE", "LHG", "PGW", "LMT", "Y01")
MONLIB_COMMIT = "072d82115701a0e7f968ddd890ccc0f2f4f4bad1"
RAMA_CITATION = ("Top8000 Ramachandran/rotamer percentile contours: Williams CJ et al. (2018) MolProbity: More and "
                 "better reference data for improved all-atom structure validation. Protein Sci 27:293-315. "
                 "Data: github.com/rlabduke/reference_data (commit cbe3006), licence CC-BY-4.0; arg/lys grids "
                 "regenerated with Silk from the Top8000 source data. Adapted here: quantised grids and fitted "
                 "Gaussian mixtures.")
GEOM_CITATION = ("CCP4 monomer library 5.60: Vagin AA et al. (2004) Acta Cryst D60:2184-2195; amino-acid targets "
                 "after Engh RA & Huber R (1991) Acta Cryst A47:392-400 and (2001) Int Tables F 18.3; nucleotide "
                 "and ligand targets from the library's AceDRG dictionaries (Long F et al. (2017) Acta Cryst "
                 "D73:112-122). Licence "
                 "LGPL-3 (GNU Lesser General Public License v3), redistributed unmodified. Sources: npm moorhen "
                 "0.22.7 (amino acids, nucleotides, ATP ADP SO4 PO4 GOL EDO PEG CIT NA, links, ener_lib); the same "
                 "release as carried by PyPI coot-headless-api 1.3.3rc1 (" + " ".join(EXTRA_LIGANDS) + "); "
                 "github.com/MonomerLibrary/monomers commit " + MONLIB_COMMIT + " (lipids and detergents: {lipids}).")
Q_SCALE = 25.0  # uint8 code = round(-log10(pct) * Q_SCALE); 255 = empty cell


def read_grid(path: Path):
    """A Silk/NDimTable text grid: returns (lower[d], upper[d], bins[d], values ndarray)."""
    lo, hi, nb = [], [], []
    rows = []
    with open(path) as fh:
        for line in fh:
            if line.startswith("#"):
                t = line[1:].split()
                if len(t) == 5 and t[0].startswith("x") and t[0].endswith(":"):
                    lo.append(float(t[1])); hi.append(float(t[2])); nb.append(int(t[3]))
                continue
            if line.strip():
                rows.append(line.split())
    a = np.array(rows, dtype=np.float64)
    d = len(nb)
    grid = np.zeros(nb, dtype=np.float64)
    lo_, hi_, nb_ = np.array(lo), np.array(hi), np.array(nb)
    width = (hi_ - lo_) / nb_
    idx = np.floor((a[:, :d] - lo_) / width).astype(int) % nb_
    grid[tuple(idx.T)] = a[:, d]
    return lo_, hi_, nb_, grid


def quantise(grid):
    q = np.full(grid.shape, 255, dtype=np.uint8)
    pos = grid > 0
    q[pos] = np.clip(np.round(-np.log10(grid[pos]) * Q_SCALE), 0, 254).astype(np.uint8)
    return q


def dequantise(q):
    out = 10.0 ** (-q.astype(np.float64) / Q_SCALE)
    out[q == 255] = 0.0
    return out


def _wrap(d, period):
    return (d + period / 2) % period - period / 2


def fit_periodic_gmm(points, weights, period, k, iters=150, seed=0, min_sd=4.0):
    """Weighted EM for a mixture of wrapped Gaussians (full covariance) on a torus.

    ``points [P, D]`` degrees, ``period [D]`` degrees. Returns weights [K], means [K, D],
    covariances [K, D, D]. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    p = weights / weights.sum()
    n, d = points.shape
    # k-means++-like seeding weighted by the data weights
    mu = [points[rng.choice(n, p=p)]]
    for _ in range(1, k):
        dist = np.min([(_wrap(points - m, period) ** 2).sum(1) for m in mu], axis=0)
        q = p * dist
        mu.append(points[rng.choice(n, p=q / q.sum())])
    mu = np.array(mu)
    cov = np.repeat(np.eye(d)[None] * 20.0 ** 2, k, axis=0)
    w = np.full(k, 1.0 / k)
    for _ in range(iters):
        diff = _wrap(points[:, None, :] - mu[None], period)  # [n, k, d]
        inv = np.linalg.inv(cov)
        quad = np.einsum("nki,kij,nkj->nk", diff, inv, diff)
        logr = np.log(w + 1e-300)[None] - 0.5 * quad - 0.5 * np.log(np.linalg.det(cov))[None]
        logr -= logr.max(1, keepdims=True)
        r = np.exp(logr)
        r /= r.sum(1, keepdims=True)
        r *= p[:, None]
        nk = r.sum(0) + 1e-300
        w = nk / nk.sum()
        step = np.einsum("nk,nkd->kd", r, diff) / nk[:, None]
        mu = _wrap(mu + step, period)
        diff = _wrap(points[:, None, :] - mu[None], period)
        cov = np.einsum("nk,nki,nkj->kij", r, diff, diff) / nk[:, None, None] + np.eye(d)[None] * min_sd ** 2
    keep = w > 1e-4
    return w[keep] / w[keep].sum(), mu[keep], cov[keep]


def grid_points(lo, hi, nb):
    axes = [lo[i] + (np.arange(nb[i]) + 0.5) * (hi[i] - lo[i]) / nb[i] for i in range(len(nb))]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


RAMA_ALLOWED = {"general": 0.0005, "gly": 0.001, "transpro": 0.001, "cispro": 0.0020, "prepro": 0.001,
                "ileval": 0.001}


def build_tables(chem: Path, out: Path, which=("rama", "rotamer", "geom"), extra=None) -> None:
    chem, out = Path(chem), Path(out)
    rr = chem / "rotarama_data"
    if "rama" in which:
        _build_rama(rr, out)
    if "rotamer" in which:
        _build_rotamer(rr, out)
    if "geom" in which:
        _build_geom(chem, out, extra)


def _build_rama(rr, out):
    rama = {"citation": np.array(RAMA_CITATION), "q_scale": np.array(Q_SCALE)}
    for name, f in RAMA_FILES.items():
        lo, hi, nb, g = read_grid(rr / f)
        pts = grid_points(lo, hi, nb)
        vals = g.ravel()
        sel = vals >= RAMA_ALLOWED[name]
        w, mu, cov = fit_periodic_gmm(pts[sel], vals[sel], np.full(2, 360.0), k=12 if name != "cispro" else 6)
        rama[f"{name}_grid"] = quantise(g)
        rama[f"{name}_lo"], rama[f"{name}_hi"] = lo, hi
        rama[f"{name}_gmm_w"], rama[f"{name}_gmm_mu"], rama[f"{name}_gmm_cov"] = w, mu, cov
        print(f"rama {name}: {len(w)} components", flush=True)
    np.savez_compressed(out / "rama_top8000.npz", **rama)


def _build_rotamer(rr, out):
    rota = {"citation": np.array(RAMA_CITATION), "q_scale": np.array(Q_SCALE)}
    for name, f in ROTA_FILES.items():
        lo, hi, nb, g = read_grid(rr / f)
        pts = grid_points(lo, hi, nb)
        vals = g.ravel()
        sel = vals >= 0.003
        d = len(nb)
        k = {1: 3, 2: 9, 3: 18, 4: 30}[d]
        pts_s, vals_s = pts[sel], vals[sel]
        if len(vals_s) > 30000:  # 4D tables: a fixed random subset of the cells keeps EM fast
            pick = np.random.default_rng(1).choice(len(vals_s), 30000, replace=False)
            pts_s, vals_s = pts_s[pick], vals_s[pick]
        w, mu, cov = fit_periodic_gmm(pts_s, vals_s, hi - lo, k=k, iters=80, min_sd=5.0)
        rota[f"{name}_grid"] = quantise(g)
        rota[f"{name}_lo"], rota[f"{name}_hi"] = lo, hi
        rota[f"{name}_gmm_w"], rota[f"{name}_gmm_mu"], rota[f"{name}_gmm_cov"] = w, mu, cov
        print(f"rotamer {name}: {d} chi, {len(w)} components", flush=True)
    np.savez_compressed(out / "rotamer_top8000.npz", **rota)


def _extra_files(extra, have=()) -> dict:
    """``{rel path: text}`` of the ``EXTRA_LIGANDS`` and ``EXTRA_LIPIDS`` dictionaries in folder ``extra``,
    each checked to be a whole monomer file (its ``data_comp_CODE`` block, atoms, and bonds unless
    it is a single atom). A residue of ``EXTRA_LIGANDS`` missing from the folder is an error unless
    ``have`` (the rel paths already in the table) holds it."""
    import gemmi

    files = {}
    for res in EXTRA_LIGANDS + EXTRA_LIPIDS:
        rel = f"{res[0].lower()}/{res}.cif"
        p = Path(extra) / rel
        if not p.is_file():
            if res in EXTRA_LIGANDS and rel not in have:
                raise SystemExit(f"{p}: missing")
            print(f"{res}: not in {extra}, " + ("kept from the table" if rel in have else "skipped"), flush=True)
            continue
        text = p.read_text()
        block = gemmi.cif.read_string(text).find_block(f"comp_{res}")
        n_atoms = len(block.find_values("_chem_comp_atom.atom_id")) if block else 0
        if n_atoms == 0 or (n_atoms > 1 and len(block.find_values("_chem_comp_bond.atom_id_1")) == 0):
            raise SystemExit(f"{p}: not a whole monomer dictionary of {res}")
        if res in EXTRA_LIPIDS:  # copied by hand from the repository (HEM and HEC count atoms otherwise)
            _check_self_consistent(block, gemmi.cif.read_string(text).find_block("comp_list"), res, p)
        files[rel] = text
    return files


def _check_self_consistent(block, comp_list, res, path) -> None:
    """A dictionary copied by hand must be whole and unchanged: its atom count equals its own
    ``_chem_comp.number_atoms_all``, every bond and angle target agrees with its own ideal
    coordinates (AceDRG writes both from one optimisation: within 0.05 Å and 5°) and every chiral
    centre's volume sign is the hand of those coordinates."""
    tab = block.find("_chem_comp_atom.", ["atom_id", "x", "y", "z"])
    xyz = {r[0]: np.array([float(r[1]), float(r[2]), float(r[3])]) for r in tab}
    if comp_list is not None:
        ids = list(comp_list.find_values("_chem_comp.id"))
        if res in ids and len(xyz) != int(comp_list.find_values("_chem_comp.number_atoms_all")[ids.index(res)]):
            raise SystemExit(f"{path}: {len(xyz)} atoms, _chem_comp.number_atoms_all says otherwise")
    for a, b, d0, d1 in block.find("_chem_comp_bond.", ["atom_id_1", "atom_id_2", "value_dist_nucleus", "value_dist"]):
        d = np.linalg.norm(xyz[a] - xyz[b])
        if min(abs(d - float(d0)), abs(d - float(d1))) > 0.05:
            raise SystemExit(f"{path}: bond {a}-{b} is {d:.3f} Å at the ideal coordinates, target {d0}")
    for a, b, c, v in block.find("_chem_comp_angle.", ["atom_id_1", "atom_id_2", "atom_id_3", "value_angle"]):
        u, w = xyz[a] - xyz[b], xyz[c] - xyz[b]
        ang = np.degrees(np.arccos(np.clip(u @ w / np.linalg.norm(u) / np.linalg.norm(w), -1, 1)))
        if abs(ang - float(v)) > 5.0:
            raise SystemExit(f"{path}: angle {a}-{b}-{c} is {ang:.1f}° at the ideal coordinates, target {v}")
    for c, a, b, d, sign in block.find("_chem_comp_chir.", ["atom_id_centre", "atom_id_1", "atom_id_2", "atom_id_3",
                                                            "volume_sign"]):
        vol = float(np.dot(xyz[a] - xyz[c], np.cross(xyz[b] - xyz[c], xyz[d] - xyz[c])))
        if (sign.startswith("pos") and vol <= 0) or (sign.startswith("neg") and vol >= 0):
            raise SystemExit(f"{path}: chiral centre {c} is {sign} but its ideal coordinates give volume {vol:.2f}")


def _write_geom(files, out):
    lipids = " ".join(r for r in EXTRA_LIPIDS if f"{r[0].lower()}/{r}.cif" in files) or "none"
    (out / "geom_monlib.json").write_text(json.dumps({"citation": GEOM_CITATION.format(lipids=lipids),
                                                      "licence": "LGPL-3.0", "files": files}))


def _build_geom(chem, out, extra=None):
    ml = chem / "mon_lib"
    files = {}
    for res in AMINO + NUCLEOTIDES + LIGANDS:
        files[f"{res[0].lower()}/{res}.cif"] = (ml / res[0].lower() / f"{res}.cif").read_text()
    if extra is not None:
        files.update(_extra_files(extra))
    lst = (ml / "list" / "mon_lib_list.cif").read_text()
    blocks = lst.split("\ndata_")
    keep = [b for b in blocks[1:] if b.startswith(("link_", "mod_"))]
    files["list/mon_lib_list.cif"] = "\n".join("data_" + b for b in keep) + "\n"
    files["ener_lib.cif"] = (ml / "ener_lib.cif").read_text()
    _write_geom(files, out)


def extend_geom(extra, out) -> None:
    """Add the ``EXTRA_LIGANDS``/``EXTRA_LIPIDS`` files of folder ``extra`` to ``out/geom_monlib.json``,
    keeping every file it holds (the moorhen folder is not needed)."""
    out = Path(out)
    files = json.loads((out / "geom_monlib.json").read_text())["files"]
    files.update(_extra_files(extra, have=set(files)))
    _write_geom(files, out)


if __name__ == "__main__":  # pragma: no cover
    default_out = Path(__file__).resolve().parents[1] / "engine" / "data"
    if sys.argv[1] == "--extend-geom":
        extend_geom(Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else default_out)
        sys.exit(0)
    which = tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else ("rama", "rotamer", "geom")
    build_tables(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else default_out, which,
                 extra=Path(sys.argv[4]) if len(sys.argv) > 4 else None)
