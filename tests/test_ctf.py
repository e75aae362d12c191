"""RELION's CTF: analytic values, symmetries, and the rfft layout."""

import math

import numpy as np
import pytest
import torch

from cryogmm.core.ctf import CtfParams, apply_ctf, ctf_rfft2, rfft2_frequencies


def params(**kw):
    base = dict(defocus_u_A=15000.0, defocus_v_A=14000.0, defocus_angle_deg=30.0, voltage_kV=300.0, cs_mm=2.7,
                amp_contrast=0.1)
    base.update(kw)
    return CtfParams(**base)


def relion_ctf_scalar(kx, ky, du, dv, ang, kv, cs, q0, ps=0.0, b=0.0):
    """RELION ctf.h getCTF, written out for one frequency (1/Å)."""
    V = kv * 1e3
    lam = 12.2643247 / math.sqrt(V * (1 + V * 0.978466e-6))
    K1 = math.pi * lam
    K2 = math.pi / 2 * cs * 1e7 * lam**3
    K3 = math.atan(q0 / math.sqrt(1 - q0 * q0))
    K4 = -b / 4
    K5 = math.radians(ps)
    u2 = kx * kx + ky * ky
    ell = math.atan2(ky, kx) - math.radians(ang)
    deltaf = -(du + dv) / 2 - (du - dv) / 2 * math.cos(2 * ell)
    arg = K1 * deltaf * u2 + K2 * u2 * u2 - K5 - K3
    return -math.sin(arg) * math.exp(K4 * u2)


def test_matches_relion_formula_at_sample_frequencies():
    box, apix = 64, 1.3
    p = params(phase_shift_deg=20.0, bfactor_A2=50.0)
    c = ctf_rfft2(p, box, apix, dtype=torch.float64)[0]
    ky, kx = rfft2_frequencies(box, apix, dtype=torch.float64)
    for iy, ix in [(0, 0), (3, 5), (60, 7), (17, 32), (40, 20)]:
        want = relion_ctf_scalar(kx[iy, ix].item(), ky[iy, ix].item(), 15000, 14000, 30, 300, 2.7, 0.1, 20, 50)
        assert c[iy, ix].item() == pytest.approx(want, abs=1e-12)


def test_dc_equals_amplitude_contrast():
    c = ctf_rfft2(params(amp_contrast=0.07), 32, 1.0, dtype=torch.float64)
    assert c[0, 0, 0].item() == pytest.approx(0.07, abs=1e-12)


def test_first_zero_without_cs():
    """With Cs = 0 and no astigmatism, chi = -pi lambda df k^2 - K3 = -pi: k0^2 = (pi - K3)/(pi lambda df)."""
    df, q0, kv = 20000.0, 0.1, 300.0
    V = kv * 1e3
    lam = 12.2643247 / math.sqrt(V * (1 + V * 0.978466e-6))
    k0 = math.sqrt((math.pi - math.asin(q0)) / (math.pi * lam * df))
    box, apix = 512, 1.0
    c = ctf_rfft2(params(defocus_u_A=df, defocus_v_A=df, cs_mm=0.0, amp_contrast=q0), box, apix, dtype=torch.float64)[0]
    row = c[0].numpy()  # ky = 0, kx = j / (box apix)
    j = np.nonzero(np.sign(row[:-1]) != np.sign(row[1:]))[0][0]
    k_cross = (j + row[j] / (row[j] - row[j + 1])) / (box * apix)
    assert k_cross == pytest.approx(k0, rel=2e-3)


def test_astigmatism_swap_symmetry():
    """Swapping U and V and turning the azimuth by 90 degrees gives the same CTF."""
    a = ctf_rfft2(params(defocus_u_A=16000, defocus_v_A=13000, defocus_angle_deg=25.0), 48, 1.1, dtype=torch.float64)
    b = ctf_rfft2(params(defocus_u_A=13000, defocus_v_A=16000, defocus_angle_deg=115.0), 48, 1.1, dtype=torch.float64)
    torch.testing.assert_close(a, b)


def test_batch_and_apply():
    p = CtfParams(defocus_u_A=[10000.0, 20000.0], defocus_v_A=[10000.0, 19000.0], defocus_angle_deg=0.0,
                  voltage_kV=300.0, cs_mm=2.7, amp_contrast=0.1)
    c = ctf_rfft2(p, 32, 2.0)
    assert c.shape == (2, 32, 17)
    img = torch.zeros(2, 32, 32)
    img[:, 16, 16] = 1.0  # a delta at the centre: its CTF-filtered image is the CTF's inverse transform
    out = apply_ctf(img, c)
    want = torch.fft.fftshift(torch.fft.irfft2(c, s=(32, 32)), dim=(-2, -1))
    torch.testing.assert_close(out, want)
    # centre symmetry of a real even filter
    torch.testing.assert_close(out[:, 16, 17], out[:, 16, 15])
