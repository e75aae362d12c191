"""refine-series: the latent path, the network's deformation (identity at start, gradients),
a small series along a known motion (adenylate kinase open -> closed, linear interpolation)
whose frames at the maps' latents come closer to the truth than the start with clean
geometry, and bad input (exit 2, nothing written)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cryogmm.cli import main as cli_main
from cryogmm.model.series.job import refine_series
from cryogmm.model.series.config import GOALS
from cryogmm.model.series.config import RefineSeriesConfig
from cryogmm.model.series.net import (
    SeriesModel,
    latent_path,
    normalise_latent,
    random_path_points,
    read_latent,
)
from cryogmm.simulate.maps import series_example
from cryogmm.model.topology import build_topology


@pytest.fixture(autouse=True)
def one_thread():
    """Many small tensors: one thread is far faster than two on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Residues 1-14 of adenylate kinase, 3 maps (2 Å/px): fast inputs for the error paths."""
    d = tmp_path_factory.mktemp("tiny")
    return series_example(d, n_maps=3, residues=(1, 14), apix=2.0, resolution_A=5.0, noise=0.1)


def test_latent_path_even_by_arc_length():
    z = normalise_latent(np.array([[0.0], [1.0], [3.0]]))
    pts, seg, frac = latent_path(z, 5)
    assert np.allclose(pts[:, 0], np.linspace(0, 1, 5))
    assert seg.tolist() == [0, 0, 1, 1, 1]
    assert np.allclose(frac, [0, 0.75, 0.25, 0.625, 1.0])
    assert frac[0] == 0.0 and frac[-1] == 1.0
    # 2-D L-shaped path: first leg length 1, second length 2; 4 points at arc length 0, 1, 2, 3
    z2 = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]])
    pts, seg, frac = latent_path(z2, 4)
    assert np.allclose(pts, [[0, 0], [1, 0], [1, 1], [1, 2]])
    assert seg.tolist() == [0, 1, 1, 1]
    r = random_path_points(z2, 500, np.random.default_rng(0))
    on_leg1 = np.isclose(r[:, 1], 0.0)
    on_leg2 = np.isclose(r[:, 0], 1.0)
    assert np.all(on_leg1 | on_leg2)
    assert 0.2 < on_leg1.mean() < 0.45  # a third of the length


def test_read_latent(tmp_path):
    p = tmp_path / "z.txt"
    p.write_text("# z of each map\n0.1, 2\n0.3 4\n")
    assert read_latent(p, 2).shape == (2, 2)
    from cryogmm.errors import InputError

    with pytest.raises(InputError, match="2 rows but 3 maps"):
        read_latent(p, 3)
    p.write_text("0.1 x\n")
    with pytest.raises(InputError, match="not a table of numbers"):
        read_latent(p, 1)


def test_network_starts_at_model_and_moves_patches_rigidly(tiny):
    topo = build_topology(tiny["start"])
    move = np.nonzero(topo.movable & ~topo.is_h)[0]
    cfg = RefineSeriesConfig(model=tiny["start"], maps=tuple(tiny["maps"]), out=Path("unused"), resolution_A=5.0,
                             n_patches=1)
    sm = SeriesModel(topo, move, 1, cfg, torch.float64, "cpu")
    z = torch.tensor([[0.0], [0.7]], dtype=torch.float64)
    x = sm.coords(z)
    assert torch.allclose(x, torch.as_tensor(topo.coords[move])[None].expand(2, -1, -1))
    # one patch: any network output is a rigid motion, so all distances are kept
    with torch.no_grad():
        sm.net.patch.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 1.0, 2.0, -1.0]))
    y = sm.coords(z)[0]
    dist = lambda a: (a[:, None] - a[None]).norm(dim=-1)  # noqa: E731
    assert torch.allclose(dist(y), dist(x[0]), atol=1e-9)
    assert (y - x[0]).norm(dim=1).mean() > 1.0
    # gradients of the blended deformation with respect to the patch motions
    sm2 = SeriesModel(topo, move, 1, RefineSeriesConfig(model=tiny["start"], maps=(), out=Path("u"), resolution_A=5.0,
                                                        n_patches=3), torch.float64, "cpu")
    p = (0.1 * torch.randn(1, 3 * 6, dtype=torch.float64)).requires_grad_(True)

    def f(q):
        with torch.no_grad():
            sm2.net.patch.weight.zero_()
        sm2.net.patch.bias.data = q[0]
        return sm2.coords(torch.zeros(1, 1, dtype=torch.float64))

    def g(q):
        from cryogmm.core.rotations import rotvec_to_rotmat

        qq = q.view(3, 6) * sm2.motion_scale
        R = rotvec_to_rotmat(qq[:, :3] / sm2.rad)
        rel = sm2.x0[:, None, :] - sm2.cen[None]
        y = torch.einsum("kij,nkj->nki", R, rel) + sm2.cen + qq[None, :, 3:]
        return (sm2.w[:, :, None] * y).sum(1)

    assert torch.allclose(f(p.detach())[0], g(p.detach()), atol=1e-10)
    assert torch.autograd.gradcheck(g, (p,))


def _run(argv):
    return cli_main(["refine-series", *map(str, argv)])


def test_bad_maps_box(tiny, tmp_path, capsys):
    from cryogmm.io.maps import write_map
    from cryogmm.io.maps import read_map_grid

    g = read_map_grid(tiny["maps"][1])
    odd = tmp_path / "odd.mrc"
    write_map(odd, g.data[:-2, :-2, :-2], g.apix, origin_A=g.origin_A)
    out = tmp_path / "out"
    rc = _run([tiny["start"], "--maps", tiny["maps"][0], odd, "--resolution", 5, "--out", out])
    err = capsys.readouterr().err
    assert rc == 2 and "odd.mrc" in err and "share box and sampling" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_map_not_overlapping(tiny, tmp_path, capsys):
    from cryogmm.io.maps import write_map
    from cryogmm.io.maps import read_map_grid

    far = []
    for k, p in enumerate(tiny["maps"]):
        g = read_map_grid(p)
        q = tmp_path / f"far{k}.mrc"
        write_map(q, g.data, g.apix, origin_A=g.origin_A + 500.0)
        far.append(q)
    out = tmp_path / "out"
    rc = _run([tiny["start"], "--maps", *far, "--resolution", 5, "--out", out])
    err = capsys.readouterr().err
    assert rc == 2 and "far0.mrc" in err and "does not overlap" in err
    assert not out.exists()


def test_bad_latent_rows_and_options(tiny, tmp_path, capsys):
    z = tmp_path / "z.txt"
    z.write_text("0\n1\n")
    out = tmp_path / "out"
    rc = _run([tiny["start"], "--maps", *tiny["maps"], "--latent", z, "--resolution", 5, "--out", out])
    err = capsys.readouterr().err
    assert rc == 2 and "z.txt" in err and "2 rows but 3 maps" in err
    rc = _run([tiny["start"], "--maps", tiny["maps"][0], "--resolution", 5, "--out", out])
    assert rc == 2 and "at least 2 maps" in capsys.readouterr().err
    rc = _run([tiny["start"], "--maps", *tiny["maps"], "--resolution", 5, "--frames", 1, "--out", out])
    assert rc == 2 and "--frames" in capsys.readouterr().err
    rc = _run([tiny["start"], "--maps", *tiny["maps"], "--resolution", 1, "--out", out])
    assert rc == 2 and "Nyquist" in capsys.readouterr().err
    assert not out.exists()


def test_small_series_outputs(tiny, tmp_path):
    """A short run end to end: outputs, frame count, report fields, network reload."""
    out = tmp_path / "out"
    rep = refine_series(RefineSeriesConfig(model=tiny["start"], maps=tuple(tiny["maps"]), out=out, resolution_A=5.0,
                                           frames=4, steps=4, n_patches=3, polish_iters=10, capture_steps=3,
                                           references=tuple(tiny["truths"])))
    txt = (out / "series.pdb").read_text()
    assert txt.count("\nMODEL ") + txt.startswith("MODEL ") == 4 and txt.count("ENDMDL") == 4
    assert sorted(p.name for p in out.glob("frame_*.pdb")) == [f"frame_{k:02d}.pdb" for k in range(1, 5)]
    assert len(list(out.glob("map_*.pdb"))) == 3
    rj = json.loads((out / "report.json").read_text())
    assert len(rj["per_frame"]) == 4 and len(rj["per_map"]) == 3
    f0 = rj["per_frame"][0]
    assert f0["between_maps"] == [0, 1] and len(f0["map_cc_neighbours"]) == 2
    assert set(GOALS) <= set(f0)
    assert "ca_rmsd_to_reference_A" in rj["per_map"][0]
    assert [c["map"] for c in rj["capture"]][0] == 2  # the start is the last map's truth: captured first
    ck = torch.load(out / "network.pt", weights_only=False)
    assert ck["latent"].shape == (3, 1)
    assert not list(out.glob(".partial-*"))
    assert rep["per_frame"][0]["frame"] == 1


@pytest.mark.slow
def test_series_recovers_known_motion(tmp_path):
    """Adenylate kinase residues 1-60 (core and the NMP lid) from closed to open: 3 maps along
    the linear path, the start being the closed end; the frames at the maps' latents approach
    the truth models, and every frame meets the geometry goals."""
    ex = series_example(tmp_path / "data", n_maps=3, residues=(1, 60), apix=2.0, resolution_A=4.5, noise=0.2)
    rep = refine_series(RefineSeriesConfig(model=ex["start"], maps=tuple(ex["maps"]), out=tmp_path / "out",
                                           resolution_A=4.5, frames=4, steps=10, capture_steps=30, polish_iters=40,
                                           n_patches=8, references=tuple(ex["truths"])))
    moved = [m for m in rep["per_map"] if m["start_ca_rmsd_to_reference_A"] > 1.0]
    assert len(moved) == 2
    for m in moved:  # measured 3.70 -> 0.83 and 1.85 -> 0.64 Å
        assert m["ca_rmsd_to_reference_A"] < 0.5 * m["start_ca_rmsd_to_reference_A"], m
        assert m["frame"]["map_cc_mask"] > m["start"]["map_cc_mask"] + 0.1
    for f in rep["per_frame"]:
        assert f["passes_goals"], f
