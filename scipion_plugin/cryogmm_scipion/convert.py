"""Between pwem objects and the files the engine reads and writes (STAR, MRC, report.json).

Particles go out through scipion-em-relion's RELION 3.1 writer, the convention every
Scipion plugin that talks STAR follows (CTF, optics groups, alignment as RELION Euler angles
and origins in Å). The refined STAR comes back here: the engine keeps every input column,
so each row is matched to its particle by ``rlnImageId`` and only the alignment (and the
per-particle figures the engine adds) change.
"""

import json
import os

import numpy as np
from emtable import Table

import pwem.convert.transformations as tfs
from pwem.constants import ALIGN_NONE, ALIGN_PROJ
from pyworkflow.plugin import Domain


def mapFile(volume):
    """The MRC path behind a pwem Volume/VolumeMask (drops Scipion's ``:mrc`` suffix)."""
    fn = volume.getFileName()
    return fn.split(":")[0] if fn.endswith((":mrc", ":mrcs")) else fn


def isMrc(path):
    return path.lower().endswith((".mrc", ".map", ".mrcs", ".rec"))


def writeParticlesStar(partSet, starFile, workDir):
    """Write ``partSet`` as RELION 3.1 STAR; stacks are linked under ``workDir/input``.

    Alignment is written as projection alignment when the set has one, none otherwise.
    """
    relionConvert = Domain.importFromPlugin("relion.convert", doRaise=True)
    alignType = ALIGN_PROJ if partSet.hasAlignmentProj() else ALIGN_NONE
    relionConvert.writeSetOfParticles(partSet, starFile, outputDir=workDir,
                                      alignType=alignType)


def relionToMatrix(rot, tilt, psi, originXA, originYA, apix):
    """RELION Euler angles (deg) and origins (Å) -> Scipion's 4x4 projection matrix.

    Scipion stores the inverse of the transform RELION applies: rotation from the
    ZYZ angles negated (Scipion's static 'szyz' axes), translation = -origin in pixels,
    then inverted; the same as scipion-em-relion's reader, so a STAR written by its
    writer and read here gives back the matrix it started from.
    """
    rad = -np.deg2rad([rot, tilt, psi])
    M = tfs.euler_matrix(rad[0], rad[1], rad[2], "szyz")
    M[:3, 3] = [-originXA / apix, -originYA / apix, 0.0]
    return np.linalg.inv(M)


def matrixToRelion(M, apix):
    """Inverse of :func:`relionToMatrix`: (rot, tilt, psi) degrees, (x, y) origin in Å."""
    Minv = np.linalg.inv(M)
    shifts = -tfs.translation_from_matrix(Minv) * apix
    angles = -np.rad2deg(tfs.euler_from_matrix(Minv, axes="szyz"))
    return angles, shifts[:2]


def rotationAngleDeg(M1, M2):
    """Angle (deg) of the rotation taking one projection matrix's rotation to the other's."""
    R = np.asarray(M1)[:3, :3].T @ np.asarray(M2)[:3, :3]
    c = np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(c)))


def readStarRows(starFile, tableName="particles"):
    """Rows of a STAR table (emtable rows: attribute access by label)."""
    return list(Table.iterRows(starFile, tableName=tableName))


def readOpticsPixelSize(starFile):
    table = Table(fileName=starFile, tableName="optics")
    return float(table[0].rlnImagePixelSize)


def readReport(folder):
    with open(os.path.join(folder, "report.json")) as f:
        return json.load(f)


def fscFromReport(report):
    """(frequencies 1/Å, masked FSC) from an engine report holding an ``fsc`` curve, else None."""
    curve = report.get("fsc")
    if not isinstance(curve, dict) or "resolution_A" not in curve:
        return None
    res = np.asarray(curve["resolution_A"], dtype=float)
    values = curve.get("masked") or curve.get("fsc") or curve.get("unmasked")
    if values is None or len(values) != len(res):
        return None
    freq = np.where(res > 0, 1.0 / res, 0.0)
    return [float(f) for f in freq], [float(v) for v in values]


def splitModels(pdbFile, outDir):
    """Write each MODEL of a multi-model PDB as its own file ``outDir/frame_XX.pdb``
    (plain text: the records between MODEL and ENDMDL); returns the paths in order."""
    os.makedirs(outDir, exist_ok=True)
    frames, current = [], None
    with open(pdbFile) as f:
        for line in f:
            rec = line[:6].strip()
            if rec == "MODEL":
                current = []
            elif rec == "ENDMDL":
                if current is not None:
                    frames.append(current)
                current = None
            elif current is not None:
                current.append(line)
    if not frames:
        raise ValueError("%s holds no MODEL/ENDMDL records" % pdbFile)
    paths = []
    for i, lines in enumerate(frames):
        path = os.path.join(outDir, "frame_%02d.pdb" % i)
        with open(path, "w") as f:
            f.writelines(lines)
            f.write("END\n")
        paths.append(path)
    return paths


def volumeOriginFromMrc(path):
    """Scipion's origin (a Transform, shifts in Å) of an MRC file: its header origin, the
    position of voxel (0, 0, 0), as Scipion stores it (default: -box/2 * sampling)."""
    import mrcfile

    from pwem.objects import Transform

    with mrcfile.open(path, header_only=True, permissive=True) as m:
        o = m.header.origin
        t = Transform()
        t.setShifts(float(o.x), float(o.y), float(o.z))
    return t
