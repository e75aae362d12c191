"""ChimeraX objects <-> cryogmm engine inputs, in memory: structures to gemmi structures, volumes
to the engine's map grids, engine coordinates back onto ChimeraX atoms (files only where a job
runs through the engine's command line). Only public ChimeraX API (atoms, residues,
``scene_position``, ``GridData``)."""

from __future__ import annotations

import numpy as np
from chimerax.core.errors import UserError

ENGINE_INSTALL = (
    "Install it into ChimeraX's own Python: `chimerax -m pip install torch==2.13.0` (the CPU build; on a "
    "GPU machine your CUDA build of torch), then `chimerax -m pip install /path/to/cryogmm` from the cryogmm "
    "repository (see the bundle's README for ChimeraX builds that need numpy < 2)")


def engine():
    """Import the engine (``cryogmm`` and torch) or raise a UserError saying how to install it."""
    try:
        import torch  # noqa: F401

        import cryogmm  # noqa: F401
        import cryogmm.model.refine.job  # noqa: F401
    except ImportError as e:
        raise UserError(f"cryogmm: the cryogmm engine cannot be imported in ChimeraX's Python ({e}). "
                        + ENGINE_INSTALL) from None
    return cryogmm


def engine_error(e) -> UserError:
    """An engine CryoGMMError (one clear line) as a ChimeraX UserError."""
    return UserError(f"cryogmm: {e}")


# ----------------------------------------------------------------------------- frames

def to_frame(points, src_position, dst_position):
    """Points from ``src`` model coordinates to ``dst`` model coordinates (both scene_positions)."""
    return (dst_position.inverse() * src_position).transform_points(np.asarray(points, dtype=np.float64))


# ----------------------------------------------------------------------------- structures

def atom_keys(atoms):
    """(chain, residue number, insertion code, atom name) per ChimeraX atom."""
    res = atoms.residues
    return list(zip(res.chain_ids, (int(n) for n in res.numbers), (str(i).strip() for i in res.insertion_codes),
                    atoms.names))


def structure_to_gemmi(structure, frame_position=None):
    """``structure`` (its current coordinates, optionally in another model's frame) as a gemmi
    Structure, in memory; returns it and the ChimeraX atoms in its order."""
    import gemmi

    atoms = structure.atoms
    if len(atoms) == 0:
        raise UserError(f"cryogmm: {structure} has no atoms")
    xyz = atoms.coords if frame_position is None else to_frame(atoms.coords, structure.scene_position, frame_position)
    st = gemmi.Structure()
    st.name = structure.name
    model = gemmi.Model("1")
    chains = {}
    order = []
    idx = {a: i for i, a in enumerate(atoms)}
    for r in structure.residues:
        cid = r.chain_id or "A"
        if cid not in chains:
            model.add_chain(gemmi.Chain(cid))
            chains[cid] = len(chains)
        gr = gemmi.Residue()
        gr.name = r.name
        icode = (r.insertion_code or " ")[:1]
        gr.seqid = gemmi.SeqId(int(r.number), icode)
        gr.het_flag = "A" if r.polymer_type != 0 else "H"
        for a in r.atoms:
            i = idx[a]
            ga = gemmi.Atom()
            ga.name = a.name
            ga.element = gemmi.Element(a.element.name)
            ga.pos = gemmi.Position(*map(float, xyz[i]))
            ga.occ = float(a.occupancy)
            ga.b_iso = float(a.bfactor)
            gr.add_atom(ga)
            order.append(i)
        model[chains[cid]].add_residue(gr)
    st.add_model(model)
    st.setup_entities()
    return st, atoms[np.asarray(order, dtype=np.int64)]


def write_structure_pdb(structure, path, frame_position=None):
    """Write :func:`structure_to_gemmi` as PDB (for jobs that run through the engine's command
    line); returns the ChimeraX atoms written, in file order."""
    st, atoms = structure_to_gemmi(structure, frame_position)
    st.write_pdb(str(path))
    return atoms


def topology_index(topo, atoms):
    """Indices ``(topo_i, atom_i)`` pairing engine topology atoms with ChimeraX ``atoms`` by
    chain, residue number, insertion code and atom name."""
    lut = {k: i for i, k in enumerate(atom_keys(atoms))}
    ti, ai = [], []
    for d in topo.residues:
        for i in d["atoms"]:
            k = (d["chain"], int(d["seq"]), str(d["icode"]).strip(), str(topo.atom_name[i]))
            j = lut.get(k)
            if j is not None:
                ti.append(i)
                ai.append(j)
    return np.asarray(ti, dtype=np.int64), np.asarray(ai, dtype=np.int64)


def residue_lookup(structure):
    """``"A/LYS12"`` style labels (as the engine's ``Topology.res_label``) -> ChimeraX residue."""
    out = {}
    for r in structure.residues:
        out[f"{r.chain_id or 'A'}/{r.name}{int(r.number)}{(r.insertion_code or '').strip()}"] = r
    return out


# ----------------------------------------------------------------------------- volumes

def volume_grid(v):
    """(data [z, y, x] float32, voxel size Å, origin xyz Å) of a ChimeraX volume's full grid,
    in the volume's own model frame. Raises UserError for grids the engine cannot take."""
    d = v.data
    step = np.asarray(d.step, dtype=np.float64)
    if not np.allclose(step, step[0], rtol=1e-4):
        raise UserError(f"cryogmm: map {v} has unequal voxel sizes {tuple(step)}; resample it first "
                        "(e.g. `volume resample #N spacing S`)")
    rot = np.asarray(d.rotation, dtype=np.float64)
    if not np.allclose(rot, np.eye(3), atol=1e-6) or tuple(d.cell_angles) != (90, 90, 90):
        raise UserError(f"cryogmm: map {v} has a skewed or rotated grid; resample it on an orthogonal grid first")
    m = np.asarray(d.matrix(), dtype=np.float32)
    if m.ndim != 3 or min(m.shape) < 4:
        raise UserError(f"cryogmm: map {v} is not a 3D grid (shape {m.shape})")
    return m, float(step[0]), np.asarray(d.origin, dtype=np.float64)


def volume_to_grid(v):
    """The full grid of ``v`` as the engine's :class:`cryogmm.io.maps.MapGrid` (in the volume's
    own frame), in memory."""
    from cryogmm.io.maps import MapGrid

    m, apix, origin = volume_grid(v)
    return MapGrid(data=m, apix=apix, origin_A=origin, path=str(v))


def write_volume_mrc(v, path):
    """Write the full grid of ``v`` as MRC (origin header = the grid origin in the volume's frame),
    for jobs that run through the engine's command line."""
    from cryogmm.io.maps import write_map

    m, apix, origin = volume_grid(v)
    write_map(path, m, apix, origin_A=origin)


def volumes_to_grids(volumes):
    """Every volume of a series on one grid, in memory: the first volume's frame and spacing, a box
    covering all of them (trilinear interpolation; zero outside a volume). The engine's model
    series needs its maps on one box; ChimeraX maps simulated or opened separately rarely are."""
    from cryogmm.io.maps import MapGrid

    ref = volumes[0]
    m0, apix, o0 = volume_grid(ref)
    lo, hi = o0.copy(), o0 + (np.array(m0.shape[::-1]) - 1) * apix
    for v in volumes[1:]:
        m, a, o = volume_grid(v)
        far = o + (np.array(m.shape[::-1]) - 1) * a
        corners = np.array([[x, y, z] for x in (o[0], far[0]) for y in (o[1], far[1]) for z in (o[2], far[2])])
        c = to_frame(corners, v.scene_position, ref.scene_position)
        lo, hi = np.minimum(lo, c.min(0)), np.maximum(hi, c.max(0))
    n = np.ceil((hi - lo) / apix).astype(int) + 1  # (x, y, z)
    axes = [lo[k] + apix * np.arange(n[k]) for k in range(3)]
    zz, yy, xx = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], 1).astype(np.float32)
    grids = []
    for v in volumes:
        vals = v.interpolated_values(pts, point_xform=ref.scene_position)
        grids.append(MapGrid(data=np.asarray(vals, dtype=np.float32).reshape(n[2], n[1], n[0]), apix=apix,
                             origin_A=lo.astype(np.float64), path=str(v)))
    return grids


# ----------------------------------------------------------------------------- STAR jobs

def star_in_process() -> bool:
    """True when the engine's STAR/.cs bridge (``cryogmm.bridge.io``) imports in this Python.
    It uses numpy 2 string arrays (``np.dtypes.StringDType``), so it does not under ChimeraX
    builds that ship numpy 1.x; jobs reading or writing particle files then run through the
    engine's own command line in an environment of its own (:func:`run_engine_cli`)."""
    try:
        import cryogmm.bridge.io  # noqa: F401
    except (ImportError, AttributeError):
        return False
    return True


def engine_cli():
    """The ``cryogmm`` program of a separate engine environment: ``$CRYOGMM_CLI``, else a
    ``cryogmm`` on PATH outside ChimeraX's own Python prefix; None when there is none."""
    import os
    import shutil
    import sys
    from pathlib import Path

    exe = os.environ.get("CRYOGMM_CLI")
    if exe:
        return exe
    found = shutil.which("cryogmm")
    if found and not Path(found).resolve().is_relative_to(Path(sys.prefix).resolve()):
        return found
    return None


def run_engine_cli(args, what):
    """Run ``cryogmm ARGS`` in the separate engine environment; UserError (with the engine's
    one-line error) when it fails or when there is none."""
    import subprocess

    exe = engine_cli()
    if exe is None:
        raise UserError(
            f"{what}: particle (STAR/.cs) files go through cryogmm.bridge, which needs numpy >= 2, and this "
            f"ChimeraX's Python has numpy {np.__version__}. Set the environment variable CRYOGMM_CLI to the "
            "`cryogmm` program of an engine environment (e.g. the cryogmm repository's .venv/bin/cryogmm) so "
            "ChimeraX runs that step there")
    p = subprocess.run([str(exe)] + [str(a) for a in args], capture_output=True, text=True, encoding="utf-8",
                       errors="replace")
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()
        raise UserError(f"{what}: `cryogmm {' '.join(map(str, args[:2]))} ...` failed (exit {p.returncode}): "
                        f"{tail[-1] if tail else 'no message'}")
    return p.stdout
