"""RELION as the judge of our Euler, shift and CTF conventions.

1. ``relion_reconstruct --ctf`` on our simulated particles must give back our noise-free
   truth map (correlation >= 0.95 after low-passing both to 3x the pixel size, no peak shift).
2. Our ``reconstruct`` of particles made by ``relion_project --ctf`` from that map must too.
A negative control (origins with the wrong sign) shows the check can fail.

Needs Debian's ``relion`` package (``apt-get install -y --no-install-recommends relion``).
"""

import shutil
import subprocess

import pytest
import starfile
import torch

from cryogmm.cli import main as cli
from cryogmm.io.maps import read_map
from cryogmm.core.fourier import lowpass
from cryogmm.core.similarity import peak_shift, real_space_correlation

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(shutil.which("relion_reconstruct") is None or shutil.which("relion_project") is None,
                       reason="RELION is not installed (apt-get install -y --no-install-recommends relion)"),
]

BOX, APIX = 48, 2.5


def compare(map_path, truth_path):
    m, _ = read_map(map_path)
    t, _ = read_map(truth_path)
    res = 3 * APIX
    m, t = lowpass(torch.as_tensor(m), res, APIX), lowpass(torch.as_tensor(t), res, APIX)
    return float(real_space_correlation(m, t)), peak_shift(t, m).abs().max().item()


def run(cmd, cwd):
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert p.returncode == 0, f"{cmd[0]} failed: {p.stderr[-2000:]}"


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from cryogmm.demo import example_model

    out = tmp_path_factory.mktemp("relion") / "sim"
    rc = cli(["simulate", "--model", str(example_model("open")), "--n", "600", "--box", str(BOX), "--apix", str(APIX),
              "--snr", "inf", "--shift-sd", "3", "--defocus", "0.8", "2.5", "--seed", "7", "--out", str(out)])
    assert rc == 0
    return out


def test_relion_reconstructs_our_simulation(sim):
    run(["relion_reconstruct", "--i", "particles.star", "--o", "relion_map.mrc", "--ctf"], sim)
    cc, shift = compare(sim / "relion_map.mrc", sim / "truth_map.mrc")
    assert cc >= 0.95, f"RELION's reconstruction of our particles correlates {cc:.3f} with the truth"
    assert shift < 0.5, f"RELION's reconstruction is shifted by {shift:.2f} px"


def test_negative_control_wrong_shift_sign_is_caught(sim):
    """The same check fails when the origins carry the wrong sign: the test can fail."""
    blocks = starfile.read(sim / "particles.star", always_dict=True)
    parts = blocks["particles"].copy()
    parts["rlnOriginXAngst"] *= -1
    parts["rlnOriginYAngst"] *= -1
    starfile.write({"optics": blocks["optics"], "particles": parts}, sim / "wrong_sign.star", overwrite=True)
    run(["relion_reconstruct", "--i", "wrong_sign.star", "--o", "wrong_sign.mrc", "--ctf"], sim)
    cc, _ = compare(sim / "wrong_sign.mrc", sim / "truth_map.mrc")
    assert cc < 0.9


def test_we_reconstruct_relion_projections(sim, tmp_path):
    run(["relion_project", "--i", "truth_map.mrc", "--o", "rproj", "--ang", "particles.star", "--ctf",
         "--angpix", str(APIX)], sim)
    rc = cli(["reconstruct", str(sim / "rproj.star"), "--out", str(tmp_path / "rec"), "--no-wiener"])
    assert rc == 0
    cc, shift = compare(tmp_path / "rec" / "map.mrc", sim / "truth_map.mrc")
    assert cc >= 0.95, f"our reconstruction of RELION's projections correlates {cc:.3f} with the truth"
    assert shift < 0.5


def test_our_and_relion_reconstructions_agree(sim, tmp_path):
    if not (sim / "relion_map.mrc").exists():
        run(["relion_reconstruct", "--i", "particles.star", "--o", "relion_map.mrc", "--ctf"], sim)
    assert cli(["reconstruct", str(sim / "particles.star"), "--out", str(tmp_path / "ours"), "--no-wiener"]) == 0
    cc, shift = compare(tmp_path / "ours" / "map.mrc", sim / "relion_map.mrc")
    assert cc >= 0.97 and shift < 0.5
