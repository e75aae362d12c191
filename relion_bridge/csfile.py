"""cryoSPARC ``.cs`` particle files <-> :class:`~cryogmm.bridge.table.ParticleTable`.

Read and written with ``cryosparc.dataset.Dataset`` (cryosparc-tools), saved in the numpy
format that cryoSPARC, cryoDRGN and ``numpy.load`` all read. Every ``.cs`` written comes with its ``.csg``
group file, which cryoSPARC's *Import Result Group* job reads (:func:`write_csg`).

Field mapping (conventions from :mod:`cryogmm.bridge.conventions`):

============================  ===============================================================
cryoSPARC                      canonical RELION 3.1
============================  ===============================================================
``blob/path``, ``blob/idx``    ``rlnImageName = "%06d@path" % (idx + 1)``; a leading ``>`` is
                               dropped; UID-prefixed file names are kept (they are the real
                               files on disk)
``blob/psize_A``               optics ``rlnImagePixelSize``
``blob/shape``                 optics ``rlnImageSize`` (square images only)
``ctf/exp_group_id``           ``rlnOpticsGroup = exp_group_id + 1``
``ctf/accel_kv, cs_mm,``       optics ``rlnVoltage``, ``rlnSphericalAberration``,
``amp_contrast``               ``rlnAmplitudeContrast``
``ctf/df1_A, df2_A``           ``rlnDefocusU``, ``rlnDefocusV``
``ctf/df_angle_rad``           ``rlnDefocusAngle`` (degrees)
``ctf/phase_shift_rad``        ``rlnPhaseShift`` (degrees)
``ctf/bfactor``, ``ctf/scale``  ``rlnCtfBfactor``, ``rlnCtfScalefactor``
``alignments3D/pose``          ``rlnAngleRot/Tilt/Psi`` from RELION's ``A = expmap(pose).T``
``alignments3D/shift``         ``rlnOriginX/YAngst = shift * alignments3D/psize_A`` (same sign)
``alignments3D/split``         ``rlnRandomSubset = split + 1``
``alignments3D/class``         ``rlnClassNumber = class + 1``
``cryogmm/<name>``             ``rlnCryogmm<Name>`` (``cryogmm/latent_0`` <-> ``rlnCryogmmLatent0``)
============================  ===============================================================

Without ``alignments3D`` but with ``alignments_class_<k>`` (3D classification), each
particle's pose is taken from its most probable class (``class_posterior``), and
``rlnClassNumber`` is that class + 1. ``alignments2D`` are not turned into RELION columns.
Every original field (``alignments2D``, ``location``, ``pick_stats``, ...) is kept in
``table.cs_fields`` and written back by :func:`write_cs`.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from cryogmm.bridge import conventions
from cryogmm.bridge.table import ParticleTable, StarLayout
from cryogmm.errors import CsError
from cryogmm.io.outputs import atomic_output

__all__ = ["column_for_cs_field", "cs_field_for_column", "csg_results", "read_cs", "write_cs", "write_csg"]

_STR = np.dtypes.StringDType()
_CLASS_RE = re.compile(r"^alignments_class_(\d+)/pose$")


def column_for_cs_field(field: str) -> str | None:
    """``cryogmm/latent_0`` -> ``rlnCryogmmLatent0``; ``cryogmm/label`` -> ``rlnCryogmmLabel``."""
    if not field.startswith("cryogmm/"):
        return None
    parts = field[len("cryogmm/") :].split("_")
    return "rlnCryogmm" + "".join(p[:1].upper() + p[1:] for p in parts)


def cs_field_for_column(column: str) -> str | None:
    """Inverse of :func:`column_for_cs_field` for ``rlnCryogmm*`` columns, else None."""
    if not column.startswith("rlnCryogmm") or len(column) == len("rlnCryogmm"):
        return None
    rest = column[len("rlnCryogmm") :]
    words = re.findall(r"[A-Z][a-z]*|[0-9]+|[a-z]+", rest)
    return "cryogmm/" + "_".join(w.lower() for w in words)


def _decimal(a: np.ndarray) -> np.ndarray:
    """float32 values -> float64 of their shortest decimal text (2.95f -> 2.95, not
    2.950000047...), so that a value written to STAR and read back is the value used."""
    if a.dtype != np.float32:
        return a.astype(np.float64)
    u, inv = np.unique(a, return_inverse=True)
    return u.astype(str).astype(np.float64)[inv.reshape(a.shape)]


def _default_project_dir(path: Path) -> Path:
    """cryoSPARC paths are relative to the project folder that holds the ``J<n>/`` jobs."""
    parent = path.resolve().parent
    return parent.parent if re.fullmatch(r"J\d+", parent.name) else parent


def _load(path: Path):
    from cryosparc.dataset import Dataset

    if not path.exists():
        raise CsError(path, "file not found")
    try:
        return Dataset.load(str(path))
    except Exception as e:  # cryosparc-tools raises several types for a bad file
        raise CsError(path, f"not a readable cryoSPARC dataset ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def read_cs(path, project_dir=None) -> ParticleTable:
    """Read a cryoSPARC particle ``.cs`` file into a :class:`ParticleTable`."""
    path = Path(path)
    ds = _load(path)
    fields = {f: np.asarray(ds[f]) for f in ds.fields()}
    n = len(ds)
    for need in ("blob/path", "blob/idx"):
        if need not in fields:
            raise CsError(
                path, f"no {need} field: not a particle file (fields: {', '.join(list(fields)[:8])}...)"
            )
    p = {}
    # image location
    paths = pd.Series(fields["blob/path"], dtype=object)
    pcodes, pu = pd.factorize(paths)
    pu = np.array([s[1:] if s.startswith(">") else s for s in pu], dtype=object)
    idx = fields["blob/idx"].astype(np.int64)
    names = np.strings.add(np.strings.add(np.strings.zfill((idx + 1).astype(_STR), 6), "@"), pu.astype(_STR)[pcodes])
    p["rlnImageName"] = names.astype(object)
    if "location/micrograph_path" in fields:
        mp = pd.Series(fields["location/micrograph_path"], dtype=object)
        mc, mu = pd.factorize(mp)
        p["rlnMicrographName"] = np.array([s[1:] if s.startswith(">") else s for s in mu], dtype=object)[mc]
    # CTF per particle
    ctf_map = (
        ("ctf/df1_A", "rlnDefocusU", 1.0),
        ("ctf/df2_A", "rlnDefocusV", 1.0),
        ("ctf/df_angle_rad", "rlnDefocusAngle", 1 / conventions.DEG),
        ("ctf/phase_shift_rad", "rlnPhaseShift", 1 / conventions.DEG),
        ("ctf/bfactor", "rlnCtfBfactor", 1.0),
        ("ctf/scale", "rlnCtfScalefactor", 1.0),
    )
    for f, col, k in ctf_map:
        if f in fields:
            p[col] = fields[f] if k == 1.0 else fields[f].astype(np.float64) * k
    # poses
    pose = shift = apsize = split = cls = None
    if "alignments3D/pose" in fields:
        pose = fields["alignments3D/pose"]
        shift = fields.get("alignments3D/shift")
        apsize = fields.get("alignments3D/psize_A")
        split = fields.get("alignments3D/split")
        cls = fields.get("alignments3D/class")
    else:
        ks = sorted(int(m.group(1)) for f in fields if (m := _CLASS_RE.match(f)))
        if ks:
            post = np.stack(
                [fields.get(f"alignments_class_{k}/class_posterior", np.zeros(n, np.float32)) for k in ks], axis=1
            )
            best = np.argmax(post, axis=1)

            def pick(name):
                arrs = [fields.get(f"alignments_class_{k}/{name}") for k in ks]
                if any(a is None for a in arrs):
                    return None
                a = np.stack(arrs, axis=1)
                return a[np.arange(n), best]

            pose, shift, apsize, split = pick("pose"), pick("shift"), pick("psize_A"), pick("split")
            cls = np.asarray(ks)[best]
    if pose is not None:
        A = conventions.csparc_pose_to_relion_rotmat(pose.astype(np.float64))
        e = conventions.rotmat_to_euler_zyz_deg(A)
        p["rlnAngleRot"], p["rlnAngleTilt"], p["rlnAnglePsi"] = e[:, 0], e[:, 1], e[:, 2]
        if shift is not None:
            ps = apsize if apsize is not None else fields.get("blob/psize_A")
            ps = _decimal(ps) if ps is not None else None
            if ps is None:
                raise CsError(path, "alignments3D/shift present but no pixel size (alignments3D/psize_A or blob/psize_A)")
            s = shift.astype(np.float64) * ps[:, None]
            p["rlnOriginXAngst"], p["rlnOriginYAngst"] = s[:, 0], s[:, 1]
    if split is not None:
        p["rlnRandomSubset"] = split.astype(np.int64) + 1
    if cls is not None:
        p["rlnClassNumber"] = cls.astype(np.int64) + 1
    for f, v in fields.items():
        col = column_for_cs_field(f)
        if col is not None and v.ndim == 1:
            p[col] = v
    # optics groups: one per exp_group_id, split further if its optics values differ
    okeys = {}
    okeys["rlnImagePixelSize"] = fields.get("blob/psize_A")
    if "blob/shape" in fields:
        shp = fields["blob/shape"].reshape(n, -1)
        if shp.shape[1] >= 2 and (shp[:, -1] != shp[:, -2]).any():
            bad = int(np.argmax(shp[:, -1] != shp[:, -2]))
            raise CsError(path, f"particle {bad + 1} has non-square images {tuple(shp[bad])}: cryogmm needs square images")
        okeys["rlnImageSize"] = shp[:, -1].astype(np.int64)
    okeys["rlnVoltage"] = fields.get("ctf/accel_kv")
    okeys["rlnSphericalAberration"] = fields.get("ctf/cs_mm")
    okeys["rlnAmplitudeContrast"] = fields.get("ctf/amp_contrast")
    okeys = {k: (_decimal(v) if v.dtype.kind == "f" else v) for k, v in okeys.items() if v is not None}
    exp = fields["ctf/exp_group_id"].astype(np.int64) if "ctf/exp_group_id" in fields else np.zeros(n, np.int64)
    key_df = pd.DataFrame({"exp": exp, **okeys})
    combo = key_df.groupby(list(key_df.columns), sort=True).ngroup().to_numpy() if n else np.zeros(0, np.int64)
    pairs = pd.DataFrame({"e": exp, "c": combo}).drop_duplicates()
    group = exp + 1 if not pairs["e"].duplicated().any() else combo.astype(np.int64) + 1
    if n:
        first = pd.Series(np.arange(n)).groupby(group, sort=True).first().to_numpy()
        optics = pd.DataFrame({"rlnOpticsGroup": group[first]})
    else:
        first = np.zeros(0, np.int64)
        optics = pd.DataFrame({"rlnOpticsGroup": np.array([1])})
    optics["rlnOpticsGroupName"] = [f"opticsGroup{g}" for g in optics["rlnOpticsGroup"]]
    for label in ("rlnAmplitudeContrast", "rlnSphericalAberration", "rlnVoltage", "rlnImagePixelSize", "rlnImageSize"):
        if label in okeys:
            optics[label] = okeys[label][first] if n else okeys[label][:1]
    optics["rlnImageDimensionality"] = 2
    p["rlnOpticsGroup"] = group
    particles = pd.DataFrame(p)
    project_dir = project_dir if project_dir is not None else _default_project_dir(path)
    layout = StarLayout()
    return ParticleTable(particles, optics, source=path, project_dir=project_dir, layout=layout, cs_fields=fields)


def _uids(table: ParticleTable) -> np.ndarray:
    seed = zlib.crc32(f"{table.source}|{table.n}".encode())
    rng = np.random.default_rng(seed)
    u = rng.integers(1, 2**63, size=table.n, dtype=np.int64).astype(np.uint64)
    dup = pd.Series(u).duplicated().to_numpy()
    while dup.any():  # vanishingly rare
        u[dup] = rng.integers(1, 2**63, size=int(dup.sum()), dtype=np.int64).astype(np.uint64)
        dup = pd.Series(u).duplicated().to_numpy()
    return u


def cs_fields_of(table: ParticleTable) -> dict:
    """The ``{field: array}`` that :func:`write_cs` writes for ``table``."""
    out = dict(table.cs_fields) if table.cs_fields is not None else {}
    p = table.particles
    f32 = np.float32
    if "uid" not in out:
        out = {"uid": _uids(table), **out}
    if "blob/path" not in out or "blob/idx" not in out:
        idx, codes, paths = table._image_parts()
        out["blob/path"] = paths[codes]
        out["blob/idx"] = idx.astype(np.uint32)
    if "rlnImageSize" in table.optics.columns or "rlnImageSize" in p.columns:
        out["blob/shape"] = np.repeat(table.box.astype(np.uint32)[:, None], 2, axis=1)
    if "rlnImagePixelSize" in table.optics.columns or "rlnImagePixelSize" in p.columns:
        out["blob/psize_A"] = table.apix.astype(f32)
    if table.has_ctf or "rlnDefocusU" in p.columns:
        old_exp = out.get("ctf/exp_group_id")
        new_exp = (table.optics_group - 1).astype(np.uint32)
        if old_exp is None or not _same_partition(old_exp, new_exp):
            out["ctf/exp_group_id"] = new_exp
        for col, f, k in (
            ("rlnDefocusU", "ctf/df1_A", 1.0),
            ("rlnDefocusV", "ctf/df2_A", 1.0),
            ("rlnDefocusAngle", "ctf/df_angle_rad", conventions.DEG),
            ("rlnPhaseShift", "ctf/phase_shift_rad", conventions.DEG),
            ("rlnCtfBfactor", "ctf/bfactor", 1.0),
            ("rlnCtfScalefactor", "ctf/scale", 1.0),
        ):
            if col in p.columns:
                out[f] = (p[col].to_numpy(dtype=np.float64) * k).astype(f32)
        for label, f in (
            ("rlnVoltage", "ctf/accel_kv"),
            ("rlnSphericalAberration", "ctf/cs_mm"),
            ("rlnAmplitudeContrast", "ctf/amp_contrast"),
        ):
            if label in table.optics.columns or label in p.columns:
                out[f] = table._optics_col(label).astype(f32)
    if table.has_poses:
        out["alignments3D/pose"] = conventions.relion_rotmat_to_csparc_pose(table.rotmat).astype(f32)
        aps = out.get("alignments3D/psize_A")
        aps = _decimal(aps) if aps is not None else table.apix
        out["alignments3D/shift"] = (table.shift_A / aps[:, None]).astype(f32)
        out["alignments3D/psize_A"] = aps.astype(f32)
        if "rlnClassNumber" in p.columns:
            out["alignments3D/class"] = (p["rlnClassNumber"].to_numpy(dtype=np.int64) - 1).clip(0).astype(np.uint32)
    if "rlnRandomSubset" in p.columns and (table.has_poses or "alignments3D/split" in out):
        h = p["rlnRandomSubset"].to_numpy(dtype=np.int64)
        out["alignments3D/split"] = np.where(h == 2, 1, 0).astype(np.uint32)
    for c in p.columns:
        f = cs_field_for_column(c)
        if f is not None:
            v = p[c].to_numpy()
            out[f] = v.astype(f32) if v.dtype.kind == "f" else (v.astype(np.int64) if v.dtype.kind in "iub" else v.astype(str).astype(object))
    return out


def _same_partition(a, b) -> bool:
    pairs = pd.DataFrame({"a": a, "b": b}).drop_duplicates()
    return not pairs["a"].duplicated().any() and not pairs["b"].duplicated().any()


def write_cs(table: ParticleTable, path) -> None:
    """Write ``table`` as a cryoSPARC ``.cs`` (numpy format), atomically, and beside it the
    ``.csg`` group file that cryoSPARC's *Import Result Group* job reads (:func:`write_csg`)."""
    from cryosparc.dataset import NUMPY_FORMAT, Dataset

    fields = cs_fields_of(table)
    ds = Dataset({k: v for k, v in fields.items()})
    with atomic_output(Path(path)) as tmp, open(tmp, "wb") as f:
        ds.save(f, format=NUMPY_FORMAT)
    write_csg(path, fields, table.n)


def _yaml_quote(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def csg_results(fields) -> list[str]:
    """The result groups (field prefixes) a ``.csg`` names for these ``.cs`` fields: every
    prefix cryoSPARC knows (``blob``, ``ctf``, ``alignments3D``, ``location``, ...); our own
    ``cryogmm/*`` fields stay readable in the ``.cs`` but are not a cryoSPARC result type."""
    out = []
    for f in fields:
        if "/" in f:
            prefix = f.split("/", 1)[0]
            if prefix != "cryogmm" and prefix not in out:
                out.append(prefix)
    return out


def write_csg(cs_path, fields, n: int, name: str = "particles", title: str = "Particles") -> Path:
    """Write ``<stem>.csg`` beside ``cs_path``: the YAML group file cryoSPARC exports and
    imports (``group`` with type ``particle``; under ``results`` one entry per result
    group with ``metafile: '>NAME.cs'`` (relative to the .csg), ``num_items`` and
    ``type: particle.<group>``)."""
    import datetime

    import cryosparc

    cs_path = Path(cs_path)
    lines = [
        f"created: {datetime.datetime.now().isoformat(sep=' ')}",
        "group:",
        f"  description: {_yaml_quote('particles written by cryogmm')}",
        f"  name: {_yaml_quote(name)}",
        f"  title: {_yaml_quote(title)}",
        "  type: particle",
        "results:",
    ]
    for prefix in csg_results(fields):
        lines += [
            f"  {prefix}:",
            f"    metafile: {_yaml_quote('>' + cs_path.name)}",
            f"    num_items: {int(n)}",
            f"    type: particle.{prefix}",
        ]
    lines.append(f"version: v{getattr(cryosparc, '__version__', '4')}")
    csg = cs_path.with_suffix(".csg")
    with atomic_output(csg) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return csg
