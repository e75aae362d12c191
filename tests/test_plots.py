"""Plots and progress bars (issue 21): Ramachandran panels per residue class, a glycine judged and
drawn against the glycine contours; latent plots that fit the latent's dimension; FSC plots that
say when a resolution is the Nyquist limit; progress bars with the stage's unit that move."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from cryogmm.demo import example_model
from cryogmm.io.plots import RAMA_TITLES, fsc_plot, latent_plot, nyquist_limited, rama_plot


def _png_size(path):
    from matplotlib.image import imread

    h, w = imread(path).shape[:2]
    return w, h


@pytest.fixture(scope="module")
def adk_rama():
    from cryogmm.model.restraints import RAMA_ALLOWED, RAMA_FAVOURED, Restraints, grid_value, reference_tables
    from cryogmm.model.topology import RAMA_CLASSES, build_topology
    from cryogmm.model.validate import rama_table

    topo = build_topology(example_model("open"))
    r = Restraints(topo)
    pp, classes, pct, verdict = rama_table(r, r.with_h(torch.as_tensor(topo.coords)))
    tabs = reference_tables()["rama"]
    contours = {c: (tabs[c]["grid"], RAMA_ALLOWED[c], RAMA_FAVOURED) for c in RAMA_CLASSES}
    return dict(topo=topo, pp=pp, classes=np.asarray(classes), verdict=np.asarray(verdict), tabs=tabs,
                contours=contours, grid_value=grid_value, allowed=RAMA_ALLOWED, favoured=RAMA_FAVOURED)


def test_rama_data_has_molprobitys_six_classes(adk_rama):
    assert set(adk_rama["tabs"]) == set(RAMA_TITLES) == {"general", "gly", "transpro", "cispro", "prepro", "ileval"}


def test_glycine_judged_and_drawn_against_the_glycine_contours(adk_rama, tmp_path):
    d = adk_rama
    topo = d["topo"]
    gly = d["classes"] == "gly"
    names = np.array([topo.residues[i]["name"] for i in topo.rama_res])
    assert gly.sum() > 5 and (names[gly] == "GLY").all() and (names == "GLY").sum() == gly.sum()
    # every glycine's verdict is its place on the glycine contours
    p_gly = d["grid_value"](d["tabs"]["gly"], d["pp"][gly])
    want = np.where(p_gly >= d["favoured"], "favoured", np.where(p_gly >= d["allowed"]["gly"], "allowed", "outlier"))
    assert (d["verdict"][gly] == want).all()
    # ... and some of them would be outliers on the general contours (the white of that panel)
    p_gen = d["grid_value"](d["tabs"]["general"], d["pp"][gly])
    assert ((p_gen < d["allowed"]["general"]) & (want != "outlier")).any()
    counts = rama_plot(tmp_path / "rama.png", d["pp"], d["classes"], d["verdict"], d["contours"], title="AdK")
    assert counts["gly"]["n"] == gly.sum() and counts["general"]["n"] == (d["classes"] == "general").sum()
    assert sum(c["n"] for c in counts.values()) == len(d["pp"])
    assert counts["gly"]["outlier"] == (want == "outlier").sum()
    w, h = _png_size(tmp_path / "rama.png")
    assert w > 1.2 * h  # six panels, 3 x 2


def test_rama_plot_a_lone_glycine_goes_to_its_panel(adk_rama, tmp_path):
    """A glycine at phi 80, psi -170 (the glycine-only region) on an empty model."""
    d = adk_rama
    counts = rama_plot(tmp_path / "one.png", [[80.0, -170.0]], ["gly"], ["favoured"], d["contours"])
    assert counts["gly"] == {"n": 1, "favoured": 1, "allowed": 0, "outlier": 0}
    assert all(c["n"] == 0 for k, c in counts.items() if k != "gly")
    assert d["grid_value"](d["tabs"]["gly"], np.array([[80.0, -170.0]]))[0] >= d["favoured"]
    assert d["grid_value"](d["tabs"]["general"], np.array([[80.0, -170.0]]))[0] < d["allowed"]["general"]


def test_latent_plot_fits_the_latent_dimension(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    one = latent_plot(tmp_path / "one.png", rng.normal(size=(300, 1)) + labels[:, None], labels, np.array([1.0]))
    two = latent_plot(tmp_path / "two.png", rng.normal(size=(300, 4)), labels, np.array([0.5, 0.3, 0.1, 0.1]))
    w1, _ = _png_size(one)
    w2, _ = _png_size(two)
    assert w1 < 0.75 * w2  # one panel (the distribution of z), not a degenerate PC1/PC2 scatter


def test_fsc_plot_says_nyquist_limited(tmp_path):
    box, apix = 32, 2.0
    flat = np.ones(box // 2 + 1)
    falling = np.linspace(1, -0.2, box // 2 + 1)
    assert nyquist_limited(flat, box, 0.143) and not nyquist_limited(falling, box, 0.143)
    assert nyquist_limited(falling, box, -0.5)
    fsc_plot({"a": flat, "b": falling}, box, apix, tmp_path / "fsc.png", mask="soft spherical mask")
    assert (tmp_path / "fsc.png").stat().st_size > 1000


def test_progress_units_and_bars_that_move(monkeypatch):
    from cryogmm.runtime import Progress, close_bars, stage_unit

    assert stage_unit("read particles") == "ptcl" and stage_unit("global iteration 2") == "ptcl"
    assert stage_unit("epoch 3/20") == "img" and stage_unit("polish") == "step" and stage_unit("rigid 1") == "step"
    buf = io.StringIO()
    monkeypatch.setattr("sys.stderr", buf)
    p = Progress(bar=True)
    for k in range(0, 601, 100):
        p("read particles", k, 600)
    p("polish", 10, 150)  # an L-BFGS polish that converged early, then a second, shorter one
    for k in range(1, 51):
        p("polish", k, 50)
    p("rigid", 3, 100)  # left open: ended by close_bars when the job returns
    close_bars()
    text = buf.getvalue()
    assert "600/600" in text and "ptcl/s" in text  # the last state stays in a log
    assert "50/50" in text and "step/s" in text and "ptcl/s]" not in text.split("polish")[-1]
    assert "3/100" in text and not p._bars
