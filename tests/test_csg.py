"""cryoSPARC side: every .cs we write has its .csg group file, and subsets map back to the originals.

The .csg is read back the way cryoSPARC's Import Result Group reads it: each result's
``metafile`` (``>`` = beside the .csg) is loaded with cryosparc-tools and must hold that
result's fields and ``num_items`` rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from cryosparc.dataset import Dataset

from cryogmm.bridge.io import read_particles, write_particles
from cryogmm.bridge.results import SOURCE_INDEX_COLUMN
from cryogmm.bridge.star import write_star_blocks
from cryogmm.cli import main

N = 12


def make_star(path: Path) -> Path:
    rng = np.random.default_rng(3)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnImagePixelSize": [1.5],
                           "rlnImageSize": [64], "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                           "rlnAmplitudeContrast": [0.1], "rlnImageDimensionality": [2]})
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(N)],
        "rlnOpticsGroup": np.ones(N, dtype=np.int64),
        "rlnAngleRot": rng.uniform(-180, 180, N), "rlnAngleTilt": rng.uniform(0, 180, N),
        "rlnAnglePsi": rng.uniform(-180, 180, N),
        "rlnOriginXAngst": rng.normal(0, 2, N), "rlnOriginYAngst": rng.normal(0, 2, N),
        "rlnDefocusU": rng.uniform(9000, 20000, N), "rlnDefocusV": rng.uniform(9000, 20000, N),
        "rlnDefocusAngle": rng.uniform(0, 180, N), "rlnRandomSubset": rng.integers(1, 3, N),
        "rlnCryogmmLabel": np.arange(N) % 3,
    })
    write_star_blocks({"optics": optics, "particles": parts}, path)
    return path


def read_csg(path: Path) -> dict:
    """The .csg YAML (two levels of mappings, scalars quoted or plain) as nested dicts."""
    root, stack = {}, [(-1, None)]
    stack[0] = (-1, root)
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        key, _, value = line.strip().partition(":")
        value = value.strip()
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        if value == "":
            parent[key] = {}
            stack.append((indent, parent[key]))
        else:
            parent[key] = value[1:-1].replace("''", "'") if value.startswith("'") else value
    return root


def check_csg(cs: Path, n: int) -> dict:
    csg = cs.with_suffix(".csg")
    assert csg.is_file(), f"{cs.name} written without {csg.name}"
    g = read_csg(csg)
    assert g["group"]["type"] == "particle" and g["version"].startswith("v")
    results = g["results"]
    assert {"blob", "ctf", "alignments3D"} <= set(results)
    for prefix, r in results.items():
        assert r["type"] == f"particle.{prefix}"
        assert r["metafile"].startswith(">")
        ds = Dataset.load(str(csg.parent / r["metafile"][1:]))  # cryosparc-tools, as cryoSPARC reads it
        assert int(r["num_items"]) == len(ds) == n
        assert any(f.startswith(prefix + "/") for f in ds.fields()), prefix
    assert "cryogmm" not in results  # our own fields stay in the .cs only (not a cryoSPARC result type)
    return g


def test_every_cs_comes_with_its_csg(tmp_path, capsys):
    star = make_star(tmp_path / "in.star")
    t = read_particles(star)
    write_particles(t, tmp_path / "direct.cs")
    check_csg(tmp_path / "direct.cs", N)
    # the CLI's writers go through the same path
    assert main(["convert", str(star), str(tmp_path / "conv.cs")]) == 0
    check_csg(tmp_path / "conv.cs", N)
    assert main(["subset", str(star), "--label", "1", "--label-column", "rlnCryogmmLabel",
                 "--out", str(tmp_path / "sub.cs")]) == 0
    check_csg(tmp_path / "sub.cs", int((np.arange(N) % 3 == 1).sum()))
    # and the .cs reads back the same particles
    back = read_particles(tmp_path / "conv.cs")
    np.testing.assert_allclose(back.rotmat, t.rotmat, atol=1e-5)
    capsys.readouterr()


def test_subset_indices_map_back_to_the_originals(tmp_path, capsys):
    star = make_star(tmp_path / "in.star")
    orig = read_particles(star)
    (tmp_path / "idx.txt").write_text("7 2 5 11 0\n")
    for suffix in (".star", ".cs"):
        out = tmp_path / f"sub{suffix}"
        assert main(["subset", str(star), "--indices", str(tmp_path / "idx.txt"), "--out", str(out)]) == 0
        s = read_particles(out)
        idx = s.particles[SOURCE_INDEX_COLUMN].to_numpy()
        assert idx.tolist() == [7, 2, 5, 11, 0]
        # the column really points at the same particles
        assert s.particles["rlnImageName"].tolist() == orig.particles["rlnImageName"].to_numpy()[idx].tolist()
        np.testing.assert_allclose(s.rotmat, orig.rotmat[idx], atol=1e-5)
        # a subset of the subset still names rows of the first file
        out2 = tmp_path / f"sub2{suffix}"
        assert main(["subset", str(out), "--label", "2", "--label-column", "rlnCryogmmLabel", "--out", str(out2)]) == 0
        s2 = read_particles(out2)
        idx2 = s2.particles[SOURCE_INDEX_COLUMN].to_numpy()
        assert set(idx2) == {i for i in (7, 2, 5, 11, 0) if i % 3 == 2} and len(idx2) == s2.n
        assert s2.particles["rlnImageName"].tolist() == orig.particles["rlnImageName"].to_numpy()[idx2].tolist()
    # in the .cs it is the field cryogmm/source_index, and cryoSPARC's own uid is kept alongside
    ds = Dataset.load(str(tmp_path / "sub.cs"))
    assert np.asarray(ds["cryogmm/source_index"]).tolist() == [7, 2, 5, 11, 0]
    assert len(set(np.asarray(ds["uid"]).tolist())) == 5
    check_csg(tmp_path / "sub.cs", 5)
    capsys.readouterr()
