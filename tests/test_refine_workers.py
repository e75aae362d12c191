"""The CPU worker threads of pose refinement: a batch split across threads gives every
particle the pose the whole batch gives it, in order, and torch's thread count comes back."""

import math

import pytest
import torch

from cryogmm.core.gaussians import Gaussians
from cryogmm.core.rotations import rotvec_to_rotmat
from cryogmm.poses.align import BandFrc, cpu_workers, refine_parts, stack_mixtures


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def _case(B=7, N=40, box=32, apix=2.0):
    gen = torch.Generator().manual_seed(3)
    mixes = [Gaussians(torch.randn(N, 3, generator=gen) * 8, torch.rand(N, generator=gen) + 0.5,
                       torch.full((N,), 2.5)) for _ in range(2)]
    mix = stack_mixtures([mixes[0], Gaussians(mixes[1].centers[:-5], mixes[1].amplitudes[:-5], mixes[1].sigmas[:-5])])
    band = BandFrc(box, apix, 2, 12)
    A_true = rotvec_to_rotmat(torch.randn(B, 3, generator=gen))
    sets = torch.tensor([0, 1, 1, 0, 1, 0, 0])[:B]
    # particle images: each particle's own set's mixture at its true pose, shifted by 1 Å
    from cryogmm.core.projection import project
    g = Gaussians(mix.centers[sets], mix.amplitudes[sets], mix.sigmas[sets])
    img = project(g, A_true, torch.full((B, 2), 1.0), band.crop, band.apix_crop)
    x = band.crop_ft(img)
    ctf = torch.ones_like(x)
    A0 = rotvec_to_rotmat(torch.randn(B, 3, generator=gen) * math.radians(3)) @ A_true
    return mix, sets, band, x, ctf, A0, torch.zeros(B, 2)


def test_split_batch_equals_whole_batch(two_threads):
    mix, sets, band, x, ctf, A0, s0 = _case()
    kw = dict(steps=12, lr_rad=math.radians(1.0), lr_A=0.3)
    whole = refine_parts(None, mix, sets, band, x, ctf, A0, s0, **kw)
    with cpu_workers(torch.device("cpu")) as w:
        assert w is not None and w.n == 2
        assert torch.get_num_threads() == 1  # the workers share the cores, one thread each
        split = refine_parts(w, mix, sets, band, x, ctf, A0, s0, **kw)
    assert torch.get_num_threads() == 2
    for a, b in zip(whole, split):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # the refinement moved the poses (the comparison is not between two unchanged starts)
    assert (whole[0] - A0).abs().max() > 1e-3


def test_no_workers_off_the_cpu_or_for_one_job(two_threads):
    with cpu_workers(torch.device("cuda")) as w:
        assert w is None
    with cpu_workers(None) as w:
        assert w is None
    with cpu_workers(torch.device("cpu"), jobs=1) as w:
        assert w is None and torch.get_num_threads() == 2
    torch.set_num_threads(1)
    with cpu_workers(torch.device("cpu")) as w:
        assert w is None


def test_threads_restored_after_an_error(two_threads):
    with pytest.raises(RuntimeError):
        with cpu_workers(torch.device("cpu")) as w:
            w.map(lambda _: (_ for _ in ()).throw(RuntimeError("boom")), [0, 1])
    assert torch.get_num_threads() == 2


def test_prefetch_thread_applies_the_transform(tmp_path):
    """``chunks(transform=...)`` runs the transform where the images are read: in the prefetch
    thread with ``prefetch``, inline without; the batches are the same either way."""
    import threading

    import mrcfile
    import numpy as np

    from cryogmm.bridge.images import ImageSource
    from cryogmm.poses.job import _upload
    from cryogmm.runtime import pin_images

    n, box = 10, 8
    data = np.random.default_rng(0).normal(size=(n, box, box)).astype(np.float32)
    p = tmp_path / "s.mrcs"
    with mrcfile.new(str(p)) as m:
        m.set_data(data)
    src = ImageSource([str(p)], np.zeros(n, np.int64), np.arange(n), box)
    assert pin_images(torch.device("cpu")) is None  # a CPU job uploads the numpy batch as it is
    pin = pin_images(torch.device("cpu"), force=True)
    seen = []

    def transform(a):
        seen.append(threading.current_thread().name)
        return pin(a)

    for prefetch in (0, 2):
        seen.clear()
        got = list(src.chunks(4, prefetch=prefetch, transform=transform))
        assert [len(i) for i, _ in got] == [4, 4, 2]
        for idx, t in got:
            assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
            np.testing.assert_array_equal(t.numpy(), data[idx])
            assert torch.equal(_upload(t, torch.device("cpu")), t)
        assert set(seen) == ({"cryogmm-prefetch"} if prefetch else {threading.current_thread().name})
    # without a transform: numpy batches, uploaded as float32 views
    idx, a = next(iter(src.chunks(4)))
    assert isinstance(a, np.ndarray) and torch.equal(_upload(a, torch.device("cpu")), torch.from_numpy(data[:4]))


def test_keep_freed_memory_switch(monkeypatch):
    """The allocator setting the command line makes: off with CRYOGMM_KEEP_FREED=0, and on
    Linux with glibc (this suite's machines) it takes effect; tensors still free and reuse."""
    import sys

    from cryogmm.runtime import MALLOC_ENV, keep_freed_memory

    monkeypatch.setenv(MALLOC_ENV, "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv(MALLOC_ENV)
    on = keep_freed_memory()
    if sys.platform.startswith("linux"):
        import platform

        if platform.libc_ver()[0] == "glibc":
            assert on is True
    x = torch.ones(8 << 20)  # 32 MB, over glibc's default mmap threshold
    del x
    assert float(torch.ones(8 << 20).sum()) == 8 << 20
