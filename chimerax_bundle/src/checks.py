"""``cryogmm validate``: the engine's validation (``cryogmm.model.validate``, in memory) of an open model, as a
log table, residue colours and a selection of the outliers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from chimerax.core.errors import UserError

from . import bridge

# colours (RGBA 0-255): residues without problems, Ramachandran allowed (not favoured),
# Ramachandran outliers, rotamer outliers, clashes
COLORS = {"ok": (190, 190, 190, 255), "rama_allowed": (255, 215, 0, 255), "rama_outlier": (220, 20, 20, 255),
          "rotamer_outlier": (255, 140, 0, 255), "clash": (200, 0, 200, 255)}

TABLE = (("bond RMSZ", "bond_rmsz", "{:.2f}"), ("angle RMSZ", "angle_rmsz", "{:.2f}"),
         ("bond outliers (|z|>4)", "bond_outliers", "{}"), ("angle outliers (|z|>4)", "angle_outliers", "{}"),
         ("Rama favoured %", "rama_favoured_pct", "{:.1f}"), ("Rama outliers %", "rama_outlier_pct", "{:.2f}"),
         ("rotamer outliers %", "rotamer_outlier_pct", "{:.2f}"), ("clashscore", "clashscore", "{:.2f}"),
         ("Cβ deviations", "cbeta_deviations", "{}"), ("chirality outliers", "chiral_outliers", "{}"),
         ("cis non-Pro", "omega_cis_nonpro", "{}"), ("map CC (mask)", "map_cc_mask", "{:.3f}"),
         ("map-model FSC 0.5 (Å)", "map_model_fsc_0.5_A", "{:.2f}"), ("Q-score", "qscore_mean", "{:.3f}"))


def validate_structure(session, structure, volume=None, resolution=None, color=True, select=True, out=None):
    bridge.engine()
    from cryogmm.errors import CryoGMMError
    from cryogmm.model.density import check_overlap
    from cryogmm.model.topology import build_topology
    from cryogmm.model.validate import validate_model, write_validation

    if volume is not None and resolution is None:
        raise UserError("cryogmm validate: give the map's resolution with a map, e.g. `map #2 resolution 4`")
    if resolution is not None and not resolution > 0:
        raise UserError(f"cryogmm validate: resolution must be positive, got {resolution}")
    frame = volume.scene_position if volume is not None else structure.scene_position
    st, _ = bridge.structure_to_gemmi(structure, frame_position=frame)
    try:
        topo = build_topology(st)
        grid = None
        if volume is not None:
            grid = bridge.volume_to_grid(volume)
            check_overlap(topo, grid, f"map {volume}")
        rep, restraints = validate_model(topo, grid, resolution, name=str(structure))
        if out:
            write_validation(Path(out), topo, rep, restraints, title=str(structure))
    except CryoGMMError as e:
        raise bridge.engine_error(e) from None
    res = bridge.residue_lookup(structure)
    flagged = {"rama_outlier": set(), "rama_allowed": set(), "rotamer_outlier": set(), "clash": set()}
    for d in rep.get("rama_residues", []):
        if d["verdict"] in ("outlier", "allowed") and d["residue"] in res:
            flagged["rama_" + d["verdict"]].add(res[d["residue"]])
    for d in rep.get("rotamer_outliers", []):
        if d["residue"] in res:
            flagged["rotamer_outlier"].add(res[d["residue"]])
    for d in rep.get("clashes", []):
        for lab in (d["a"], d["b"]):
            r = res.get(lab.rsplit("/", 1)[0])
            if r is not None:
                flagged["clash"].add(r)
    outliers = flagged["rama_outlier"] | flagged["rotamer_outlier"] | flagged["clash"]
    rep["flagged_residues"] = {k: sorted(_label(r) for r in v) for k, v in flagged.items()}
    if color:
        _colour(structure, flagged)
    if select:
        session.selection.clear()
        for r in outliers:
            r.atoms.selected = True
    session.logger.info(table_html(rep, structure, flagged), is_html=True)
    session.logger.info(f"cryogmm validate: {len(flagged['rama_outlier'])} Ramachandran outliers (red), "
                        f"{len(flagged['rotamer_outlier'])} rotamer outliers (orange), {len(flagged['clash'])} "
                        f"residues in clashes (magenta), {len(flagged['rama_allowed'])} Rama allowed (yellow)"
                        + (f"; {len(outliers)} outlier residues selected" if select else ""))
    return rep


def _label(r):
    return f"{r.chain_id}/{r.name}{r.number}{(r.insertion_code or '').strip()}"


def _colour(structure, flagged):
    from chimerax.atomic import Residues

    residues = structure.residues
    ok = np.array(COLORS["ok"], dtype=np.uint8)
    residues.ribbon_colors = np.tile(ok, (len(residues), 1))
    atoms = structure.atoms
    c = atoms.colors.copy()
    carbon = atoms.element_names == "C"
    c[carbon] = ok
    atoms.colors = c
    for key in ("rama_allowed", "rotamer_outlier", "rama_outlier", "clash"):
        if not flagged[key]:
            continue
        rs = Residues(sorted(flagged[key], key=lambda r: (r.chain_id, r.number)))
        col = np.array(COLORS[key], dtype=np.uint8)
        rs.ribbon_colors = np.tile(col, (len(rs), 1))
        ra = rs.atoms
        cc = ra.colors.copy()
        cc[ra.element_names == "C"] = col
        ra.colors = cc


def table_html(rep, structure, flagged):
    rows = "".join(f"<tr><td>{label}</td><td>{fmt.format(rep[k])}</td></tr>" for label, k, fmt in TABLE if k in rep)
    lists = []
    for key, title in (("rama_outlier", "Ramachandran outliers"), ("rotamer_outlier", "rotamer outliers"),
                       ("clash", "residues in clashes")):
        names = rep["flagged_residues"][key]
        if names:
            lists.append(f"<br>{title}: {', '.join(names[:30])}" + (" ..." if len(names) > 30 else ""))
    return (f"<b>cryogmm validate {structure}</b> ({rep['n_residues']} residues, {rep['n_atoms']} atoms)"
            f"<table border=1 cellpadding=2>{rows}</table>{''.join(lists)}")
