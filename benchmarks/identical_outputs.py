"""Outputs of the main jobs, compared between two versions of the engine (refactoring guard).

Runs the benchmark cases through the command line only (so it works unchanged across any
reorganisation of the engine's modules), then compares every output file of two runs:
report.json figures (timings excluded), STAR/.cs columns (poses, shifts, latents), PDB/mmCIF
coordinates, MRC maps, .npy/.npz/.txt arrays, to a tolerance (default 1e-6, relative to each
array's scale).

Cases (two molecules: adenylate kinase and a second protein built from ideal geometry):
  demo          `cryogmm demo --n 600`: simulate, reconstruct, refine-poses, a segments
                heterogeneity run and a model-fragment refinement, every figure vs the truth
  refine_model  closed AdK (1AKE) into a 4 Å map of the open one (4AKE), `--quick`
  refine_helix  a 30-residue poly-Ala/Leu helix bent at its middle into the straight one's map
  hetero_disp   a displacement-decoder run on the demo's open -> closed particles
  poses_sym     refine-poses with --patches 2 on the demo's particles (patch path)
  fit_gmm       a Gaussian mixture fitted to the demo's reconstruction
  series        refine-series of the helix over three maps (straight, bent 6°, bent 12°), short
  validate      4AKE and 1AKE validated without a map

Usage (the engine under test is whichever `python -m cryogmm.cli` the interpreter finds;
PYTHONPATH can point it at another checkout's packages):
  python benchmarks/identical_outputs.py run OUT_DIR [--cases demo refine_model ...]
  python benchmarks/identical_outputs.py compare BEFORE_DIR AFTER_DIR [--tol 1e-6] [--expect-new pca.npz]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "engine" / "data"
SKIP_KEY_WORDS = ("second", "per_s", "wall", "t_s", "time", "date", "version", "rss", "memory", "host")


def cli(*args, cwd=None):
    cmd = [sys.executable, "-m", "cryogmm.cli", *map(str, args)]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    print(f"  {' '.join(map(str, args[:2]))}: {time.perf_counter() - t:.0f} s", flush=True)


def splat_map(pdb: Path, out: Path, resolution=4.0, apix=1.0, pad=10.0, noise=0.1, seed=0, box=None, origin=None):
    """A map of a model's heavy atoms (Gaussians of sigma = 0.225 x resolution, weighted by atomic
    number) with white noise, written with its origin; independent of the engine's own code."""
    import gemmi
    import mrcfile

    st = gemmi.read_structure(str(pdb))
    xyz, z = [], []
    for ch in st[0]:
        for r in ch:
            for a in r:
                if a.element.name != "H":
                    xyz.append(a.pos.tolist())
                    z.append(a.element.atomic_number)
    xyz, z = np.array(xyz), np.array(z, float)
    lo = xyz.min(0) - pad if origin is None else np.asarray(origin, float)
    n = box or int(math.ceil((xyz.max(0) - lo + pad).max() / apix))
    n += n % 2
    sig = 0.225 * resolution
    ax = lo[None, :] + apix * np.arange(n)[:, None]  # [n, 3] grid coordinates per axis (x, y, z)
    m = np.zeros((n, n, n))
    for c0 in range(0, len(xyz), 256):
        c, w = xyz[c0:c0 + 256], z[c0:c0 + 256]
        gx = np.exp(-0.5 * ((ax[:, 0][None] - c[:, 0:1]) / sig) ** 2)
        gy = np.exp(-0.5 * ((ax[:, 1][None] - c[:, 1:2]) / sig) ** 2)
        gz = np.exp(-0.5 * ((ax[:, 2][None] - c[:, 2:3]) / sig) ** 2)
        m += np.einsum("a,az,ay,ax->zyx", w, gz, gy, gx)
    m += np.random.default_rng(seed).normal(scale=noise * m.std(), size=m.shape)
    with mrcfile.new(out, overwrite=True) as f:
        f.set_data(m.astype(np.float32))
        f.voxel_size = apix
        f.header.origin.x, f.header.origin.y, f.header.origin.z = lo
    return out


def helix_pdb(out: Path, n=30, bend_deg=0.0):
    """An ideal alpha helix (poly-Ala with Leu every third residue), optionally bent at its middle."""
    import gemmi

    # ideal helix internal coordinates through gemmi's residue builder are not available, so place
    # backbone atoms on the standard helical net (3.6 residues/turn, 1.5 Å rise) and side chains
    # from a fixed local frame (good enough as a refinement target: the engine's restraints do the rest)
    per = {"N": (1.55, -28.0, -0.95), "CA": (2.30, 0.0, 0.0), "C": (1.60, 28.0, 0.90), "O": (1.75, 42.0, 2.10),
           "CB": (3.35, -8.0, -0.65)}
    st = gemmi.Structure()
    model = gemmi.Model("1")
    ch = gemmi.Chain("A")
    for i in range(n):
        r = gemmi.Residue()
        r.name = "LEU" if i % 3 == 1 else "ALA"
        r.seqid = gemmi.SeqId(i + 1, " ")
        for name, (rad, dphi, dz) in per.items():
            phi = math.radians(100.0 * i + dphi)
            p = np.array([rad * math.cos(phi), rad * math.sin(phi), 1.5 * i + dz])
            if bend_deg and i >= n // 2:
                piv = np.array([0.0, 0.0, 1.5 * (n // 2)])
                t = math.radians(bend_deg)
                rot = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
                p = piv + rot @ (p - piv)
            a = gemmi.Atom()
            a.name, a.element, a.pos, a.occ, a.b_iso = name, gemmi.Element(name[0]), gemmi.Position(*p), 1.0, 30.0
            r.add_atom(a)
        if r.name == "LEU":
            cb = np.array(r["CB"][0].pos.tolist())
            ca = np.array(r["CA"][0].pos.tolist())
            u = (cb - ca) / np.linalg.norm(cb - ca)
            v = np.cross(u, [0, 0, 1.0])
            v /= np.linalg.norm(v)
            for name, pos in (("CG", cb + 1.53 * (0.33 * u + 0.94 * v)),
                              ("CD1", cb + 1.53 * (0.33 * u + 0.94 * v) + 1.52 * u),
                              ("CD2", cb + 1.53 * (0.33 * u + 0.94 * v) + 1.52 * np.cross(u, v))):
                a = gemmi.Atom()
                a.name, a.element, a.pos, a.occ, a.b_iso = name, gemmi.Element("C"), gemmi.Position(*pos), 1.0, 30.0
                r.add_atom(a)
        ch.add_residue(r)
    model.add_chain(ch)
    st.add_model(model)
    st.setup_entities()
    st.write_pdb(str(out))
    return out


CASES = ("demo", "refine_model", "refine_helix", "hetero_disp", "poses_patches", "fit_gmm", "validate", "series")


def run(out: Path, cases):
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    demo = out / "demo"
    if any(c in cases for c in ("demo", "hetero_disp", "poses_patches", "fit_gmm")):
        cli("demo", "--out", demo, "--n", 600, "--device", "cpu")
    if "refine_model" in cases:
        d = out / "refine_model"
        d.mkdir(exist_ok=True)
        splat_map(DATA / "adk_open.pdb", d / "target.mrc", resolution=4.0)
        cli("refine-model", DATA / "adk_closed.pdb", "--map", d / "target.mrc", "--resolution", 4, "--quick",
            "--out", d / "run", "--reference", DATA / "adk_open.pdb")
    if "refine_helix" in cases:
        d = out / "refine_helix"
        d.mkdir(exist_ok=True)
        helix_pdb(d / "straight.pdb")
        helix_pdb(d / "bent.pdb", bend_deg=12.0)
        splat_map(d / "straight.pdb", d / "target.mrc", resolution=4.0, seed=1)
        cli("refine-model", d / "bent.pdb", "--map", d / "target.mrc", "--resolution", 4, "--quick",
            "--out", d / "run", "--reference", d / "straight.pdb")
    if "hetero_disp" in cases:
        parts = demo / "hetero" / "particles"
        cli("hetero", "train", parts / "particles.star", "--model", DATA / "adk_open.pdb", "--out", out / "hetero_disp",
            "--decoder", "displacement", "--zdim", 2, "--epochs", 3, "--batch", 32, "--lowpass-A", 10,
            "--map", parts / "truth_map.mrc", "--device", "cpu")
        cli("hetero", "analyze", out / "hetero_disp", "--out", out / "hetero_disp" / "analysis", "--pcs", 1,
            "--frames", 3, "--clusters", 2, "--truth", parts / "truth.star", "--device", "cpu")
    if "poses_patches" in cases:
        cli("refine-poses", demo / "simulate" / "particles.star", "--out", out / "poses_patches", "--iterations", 1,
            "--patches", 2, "--max-gaussians", 300, "--fit-iterations", 30, "--steps", 10, "--device", "cpu",
            )
    if "fit_gmm" in cases:
        cli("fit-gmm", demo / "reconstruct" / "map.mrc", "--resolution", 8, "--iterations", 50, "--out",
            out / "fit_gmm", "--device", "cpu")
    if "series" in cases:
        d = out / "series"
        d.mkdir(exist_ok=True)
        import gemmi

        truths = [helix_pdb(d / f"truth_{k}.pdb", bend_deg=bend) for k, bend in enumerate((0.0, 6.0, 12.0))]
        allx = np.array([c.atom.pos.tolist() for t in truths for c in gemmi.read_structure(str(t))[0].all()])
        lo = allx.min(0) - 10.0
        box = int(math.ceil((allx.max(0) + 10.0 - lo).max()))
        maps = [splat_map(t, d / f"map_{k}.mrc", resolution=4.0, seed=k, box=box, origin=lo)
                for k, t in enumerate(truths)]
        cli("refine-series", d / "truth_0.pdb", "--maps", *maps, "--resolution", 4, "--frames", 3, "--steps", 5,
            "--capture-steps", 5, "--polish-iters", 5, "--out", d / "run")
    if "validate" in cases:
        for name in ("open", "closed"):
            cli("validate", DATA / f"adk_{name}.pdb", "--out", out / "validate" / name)
    print(f"all cases: {time.perf_counter() - t0:.0f} s")


# ---- comparison ---------------------------------------------------------------------------------

def _json_leaves(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if any(w in str(k).lower() for w in SKIP_KEY_WORDS):
                continue
            yield from _json_leaves(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _json_leaves(v, f"{prefix}[{i}]")
    elif isinstance(obj, bool) or obj is None:
        yield prefix, obj
    elif isinstance(obj, (int, float)):
        yield prefix, float(obj)
    elif isinstance(obj, str) and "/" not in obj:
        yield prefix, obj


def load_arrays(path: Path) -> dict:
    """Named arrays (or scalars/strings) of one output file; {} for files we do not compare."""
    suf = "".join(path.suffixes[-2:]) if path.name.endswith(".mrcs") else path.suffix
    if path.suffix == ".json":
        return dict(_json_leaves(json.loads(path.read_text())))
    if path.suffix == ".star":
        import starfile

        d = starfile.read(path, always_dict=True)
        out = {}
        for block, df in d.items():
            if hasattr(df, "columns"):
                for c in df.columns:
                    if df[c].dtype.kind in "fiu":
                        out[f"{block}/{c}"] = df[c].to_numpy(float)
        return out
    if path.suffix == ".cs":
        a = np.load(path)
        # uid: cryoSPARC's random row ids, new on every write by design
        return {n: a[n].astype(float) for n in a.dtype.names if a[n].dtype.kind in "fiu" and n != "uid"}
    if path.suffix in (".pdb", ".cif"):
        import gemmi

        st = gemmi.read_structure(str(path))
        xyz = [a.pos.tolist() for m in st for ch in m for r in ch for a in r]
        return {"xyz": np.array(xyz), "n_models": len(st)}
    if path.suffix in (".mrc",) or suf == ".mrcs":
        import mrcfile

        with mrcfile.mmap(path, permissive=True) as f:
            return {"data": np.asarray(f.data, float)}
    if path.suffix == ".npy":
        return {"data": np.load(path).astype(float)}
    if path.suffix == ".npz":
        z = np.load(path)
        return {k: z[k].astype(float) for k in z.files if z[k].dtype.kind in "fiub"}
    if path.suffix == ".txt":
        try:
            return {"data": np.loadtxt(path, ndmin=1)}
        except ValueError:
            return {}
    return {}


def _outputs_lists(x: dict, expect_new) -> dict:
    """report.json "outputs" lists as sorted lists without the expected new files."""
    keys = [k for k in x if "/outputs[" in k]
    if not keys:
        return x
    names = sorted(v for k, v in x.items() if k in keys and v not in expect_new)
    y = {k: v for k, v in x.items() if k not in keys}
    y.update({f"/outputs[{i}]": v for i, v in enumerate(names)})
    return y


def compare(a: Path, b: Path, tol: float, expect_new=()) -> int:
    fa = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    fb = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    bad, n_files, n_values = [], 0, 0
    new = sorted(rel for rel in fb - fa if rel.name in expect_new)
    for rel in sorted(fa ^ fb):
        if rel in new:
            continue
        if load_arrays((a if rel in fa else b) / rel) != {}:
            bad.append(f"{rel}: only in {'before' if rel in fa else 'after'}")
    for rel in sorted(fa & fb):
        xa, xb = load_arrays(a / rel), load_arrays(b / rel)
        if rel.suffix == ".json":
            xa, xb = _outputs_lists(xa, expect_new), _outputs_lists(xb, expect_new)
        if not xa and not xb:
            continue
        n_files += 1
        for k in sorted(set(xa) | set(xb)):
            if k not in xa or k not in xb:
                if k in xb and any(f"/{n}" in k for n in expect_new):
                    continue  # a report figure the change adds on purpose
                bad.append(f"{rel}:{k}: only in {'before' if k in xa else 'after'}")
                continue
            va, vb = xa[k], xb[k]
            if isinstance(va, str) or isinstance(vb, str) or va is None or vb is None or isinstance(va, bool):
                if va != vb:
                    bad.append(f"{rel}:{k}: {va!r} != {vb!r}")
                n_values += 1
                continue
            va, vb = np.asarray(va, float), np.asarray(vb, float)
            if va.shape != vb.shape:
                bad.append(f"{rel}:{k}: shape {va.shape} != {vb.shape}")
                continue
            n_values += va.size
            fin = np.isfinite(va) & np.isfinite(vb)
            if not np.array_equal(np.isfinite(va), np.isfinite(vb)):
                bad.append(f"{rel}:{k}: non-finite values differ")
            if fin.any():
                scale = max(1.0, float(np.abs(va[fin]).max()))
                diff = float(np.abs(va[fin] - vb[fin]).max())
                if diff > tol * scale:
                    bad.append(f"{rel}:{k}: max |diff| {diff:.3g} (scale {scale:.3g})")
    for line in bad:
        print("DIFF", line)
    print(f"{n_files} files, {n_values} values compared: {'identical' if not bad else f'{len(bad)} differences'}"
          f" (tolerance {tol:g} of each array's scale)"
          + (f"; new files, as expected: {', '.join(map(str, new))}" if new else ""))
    return 1 if bad else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    c.add_argument("--tol", type=float, default=1e-6)
    c.add_argument("--expect-new", nargs="*", default=[],
                   help="file names and report.json keys a change adds on purpose")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run(args.out, args.cases)
        return 0
    return compare(args.before, args.after, args.tol, set(args.expect_new))


if __name__ == "__main__":
    sys.exit(main())
