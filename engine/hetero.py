"""Heterogeneity from an atomic model: a VAE whose decoder moves the model.

Per particle, an encoder reads the (Fourier-cropped) image beside the CTF-modulated
projection of the reference model at the particle's pose and gives a Gaussian posterior
over a latent ``z``; a deformer (:mod:`cryogmm.deform`) turns a sample of ``z`` into a moved
copy of the reference's coarse Gaussians (one per residue at its Cα, or backbone and
side-chain centroids), which is projected at the particle's pose (from the STAR), multiplied
by its CTF and compared with the image:

- ``segments`` decoder (cryoSPHERE, Gilles & Singer): soft segments along the chain, each
  moved as a rigid body per image;
- ``displacement`` decoder (atomic VAE, Zhong et al.): an offset per Gaussian, held
  together by restraints: harmonic 3.8 Å bonds between consecutive Cα, a maximum distance
  between a residue's backbone and side-chain centroids, and a clash term.

The forward model is computed in Fourier space on the cropped grid: the 2D transform of a
projected Gaussian is analytic (``a exp(-2 pi^2 s^2 |k|^2) exp(-2 pi i k.x)``) and separable
in ``kx`` and ``ky``, so a batch of projections is one complex batched matrix product, free
of aliasing whatever the crop. The loss is either the Gaussian likelihood (white noise, its
variance measured outside the particle) or cryoSPHERE's correlation, over the frequencies
up to ``lowpass_A``; the KL term is ramped in over ``kl_warmup`` epochs. A checkpoint is
written after every epoch; ``resume`` continues from it.

Several processes or GPUs (``torch.distributed``; gloo on CPUs, NCCL on GPUs)::

    torchrun --nproc_per_node 2 -m cryogmm.cli hetero train particles.star --model ref.pdb --out run

The training step is wrapped in ``DistributedDataParallel``. Each epoch's permutation and
each batch's latent noise are drawn identically on every rank (same seeds); every global
batch of ``batch`` particles is split among the ranks by stride (``idx[rank::world]``, the
split ``DistributedSampler`` makes), each rank's loss is its share of the global batch mean,
and DDP averages the gradients: the optimiser sees the gradient of the one-process batch,
so training follows the one-process run up to float reduction order. Rank 0 alone writes the
checkpoint (every epoch), ``config.json``, ``loss.png`` and ``report.json``; ``resume`` works
with any number of processes. Each rank holds the Fourier-cropped particles in memory.

Precision: ``matmul_precision`` ``tf32`` lets the encoder's and the projection's float32
matrix products use TF32 tensor cores on GPUs; the loss sums and the Adam state stay float32.

Analysis (:func:`analyze_hetero`): latent means per particle, PCA trajectories as
multi-model PDB files, maps along them from the deformed models and by back-projecting the
particles nearest each trajectory point, k-means clusters as STAR and .cs subsets, plots
and the learned segments. :func:`decode_hetero` writes one model per latent row.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cryogmm.deform import Deformer, make_deformer, mlp
from cryogmm.errors import InputError, ModelError, OptionError, StarError
from cryogmm.gmm import Gaussians

__all__ = [
    "HeteroConfig",
    "train_hetero",
    "AnalyzeConfig",
    "analyze_hetero",
    "decode_hetero",
    "project_fourier",
    "Reference",
    "load_reference",
    "ParticleData",
    "load_particles",
    "HeteroVAE",
    "restraint_terms",
    "demo_hetero",
]

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"


# --------------------------------------------------------------------------- configs
@dataclass
class HeteroConfig:
    star: Path
    model: Path
    out: Path
    decoder: str = "segments"
    segments: int = 20
    per_chain: bool = False
    zdim: int = 8
    epochs: int = 20
    batch: int = 64
    lowpass_A: float = 8.0
    gaussians: str = "ca"
    resolution_A: float | None = None
    loss: str = "gaussian"
    kl_warmup: int = 5
    beta: float = 1.0
    lr: float = 1e-3
    hidden: int = 256
    temperature: float = 0.1
    bond_weight: float = 1.0
    clash_weight: float = 1.0
    sidechain_weight: float = 1.0
    elastic_weight: float | None = None
    elastic_seq: int = 4
    map: Path | None = None
    project_dir: Path | None = None
    resume: bool = False
    seed: int = 0
    device: str | None = None
    max_particles: int | None = None
    matmul_precision: str = "highest"


# --------------------------------------------------------------------------- reference
@dataclass
class Reference:
    """The reference model and its coarse Gaussians in the particles' box frame.

    ``center_A``: the file-frame point at the box centre; ``owner [M]``: Gaussian of every
    atom; ``residue_of [N]``: residue (0-based) of every Gaussian; ``chain_of_residue [R]``;
    ``kind [N]``: 0 backbone/Cα, 1 side chain.
    """

    model: object
    gaussians: Gaussians
    center_A: np.ndarray
    owner: np.ndarray
    residue_of: np.ndarray
    chain_of_residue: np.ndarray
    kind: np.ndarray
    path: str

    def atoms_box(self) -> torch.Tensor:
        """Atom coordinates ``[M, 3]`` in the box frame (Å from the centre)."""
        return torch.as_tensor(self.model.coords[0] - self.center_A, dtype=torch.float32)

    @property
    def ca_index(self) -> np.ndarray:
        return np.flatnonzero(self.model.atom_name == "CA")


def _map_center(path, box: int, apix: float) -> np.ndarray:
    """File-frame position (Å) of the centre voxel of a map, from its header origin."""
    import mrcfile

    from cryogmm.errors import MapError

    path = Path(path)
    if not path.is_file():
        raise MapError(path, "no such file")
    try:
        with mrcfile.open(path, mode="r", permissive=True, header_only=True) as m:
            o = np.array([float(m.header.origin.x), float(m.header.origin.y), float(m.header.origin.z)])
            nx = int(m.header.nx)
            vs = float(m.voxel_size.x)
            start = np.array([int(m.header.nxstart), int(m.header.nystart), int(m.header.nzstart)])
    except Exception as e:
        raise MapError(path, f"is not a readable MRC file ({e})") from None
    if nx != box:
        raise MapError(path, f"is {nx} px wide but the particles are {box} px")
    if vs > 0 and abs(vs - apix) > 1e-3 * apix:
        raise MapError(path, f"pixel size {vs:g} Å differs from the particles' {apix:g} Å")
    if not np.any(o) and np.any(start):
        o = start * apix
    return o + (box // 2) * apix


def load_reference(path, *, box: int, apix: float, mode: str = "ca", resolution_A: float | None = None,
                   center_A=None) -> Reference:
    """Read the reference model and build its coarse Gaussians centred in the box.

    Raises :class:`ModelError` naming the residues that lie outside the particle box (the
    model does not overlay the particles' map).
    """
    from cryogmm.gmm import coarse_grain, gaussians_from_coords, read_model

    model = read_model(path)
    center = model.center_of_mass() if center_A is None else np.asarray(center_A, dtype=np.float64)
    res = resolution_A or 2.0 * apix
    g = gaussians_from_coords(model, model.coords[0], mode, resolution_A=res, center_A=center)
    groups = coarse_grain(model, mode)
    owner = np.empty(len(model.element), dtype=np.int64)
    for i, grp in enumerate(groups):
        owner[grp] = i
    residue_of = np.array([model.res_id[grp[0]] for grp in groups], dtype=np.int64)
    kind = np.array([0 if mode != "residue2" or np.isin(model.atom_name[grp], ("N", "CA", "C", "O", "OXT")).any()
                     else 1 for grp in groups], dtype=np.int64)
    n_res = int(model.res_id.max()) + 1
    chain_names = {c: i for i, c in enumerate(dict.fromkeys(model.chain.tolist()))}
    chain_of_residue = np.zeros(n_res, dtype=np.int64)
    chain_of_residue[model.res_id] = [chain_names[c] for c in model.chain]
    # every atom must lie inside the box, with room for the particle's motion
    half = box // 2 * apix
    xyz = model.coords[0] - center
    out = np.abs(xyz).max(1) > half
    if out.any():
        bad = np.unique(model.seq_id[out])
        chains = sorted(set(model.chain[out].tolist()))
        raise ModelError(path, f"{len(bad)} residue(s) (chain {','.join(chains)} {bad[0]}..{bad[-1]}) lie outside "
                         f"the {box}-px box of {apix:g} Å around the particles' centre "
                         f"({center[0]:.1f}, {center[1]:.1f}, {center[2]:.1f}) Å: the model does not overlay the "
                         f"particles (give --map, the consensus map the model was fitted in)")
    return Reference(model, g, center, owner, residue_of, chain_of_residue, kind, str(path))


# --------------------------------------------------------------------------- particles
def crop_size(box: int, apix: float, lowpass_A: float) -> int:
    """Even crop (px) whose Nyquist reaches ``lowpass_A`` (with a small margin), at most ``box``."""
    k = math.ceil(box * apix / lowpass_A)
    return int(min(box, 2 * (k + 1)))


def _crop_rows(box: int, crop: int):
    return np.concatenate([np.arange(crop // 2), np.arange(box - crop // 2, box)])


@dataclass
class ParticleData:
    """Particles in memory, Fourier-cropped: ``ft [n, crop, crop//2+1]`` complex (``rfft2``
    layout, orthonormal: white noise of variance ``noise_var`` per pixel keeps that variance
    per coefficient), poses ``rotmat [n,3,3]``, ``shift_A [n,2]``, CTF on the cropped grid
    computed per batch from ``table``."""

    table: object
    ft: torch.Tensor
    rotmat: torch.Tensor
    shift_A: torch.Tensor
    box: int
    apix: float
    crop: int
    noise_var: float
    band: torch.Tensor  # [crop, crop//2+1] weights (0 outside the loss band, 2 for mirrored columns)
    k2: torch.Tensor  # |k|^2 (1/Å^2) on the cropped grid
    kx: torch.Tensor
    ky: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.ft.shape[0])

    @property
    def apix_crop(self) -> float:
        return self.apix * self.box / self.crop

    def ctf(self, idx) -> torch.Tensor:
        from cryogmm.ctf import CtfParams, ctf_rfft2

        return ctf_rfft2(CtfParams.from_table(self.table, np.asarray(idx)), self.crop, self.apix_crop)

    def images_real(self, ft: torch.Tensor) -> torch.Tensor:
        """Cropped transforms -> centred real images ``[B, crop, crop]``."""
        return torch.fft.fftshift(torch.fft.irfft2(ft, s=(self.crop, self.crop), norm="ortho"), dim=(-2, -1))


def load_particles(star, *, lowpass_A: float, project_dir=None, radius_A: float | None = None, batch: int = 512,
                   max_particles: int | None = None, progress=None) -> ParticleData:
    """Read a STAR (or .cs) with poses and CTF and Fourier-crop every image to ``lowpass_A``.

    The noise variance is measured in real space outside ``radius_A`` (default 0.8 x the box
    radius): the mean variance of those pixels over the particles.
    """
    from cryogmm.bridge.images import ImageSource
    from cryogmm.bridge.io import read_particles

    progress = progress or (lambda *a: None)
    star = Path(star)
    if not star.is_file():
        raise StarError(star, "no such file")
    table = read_particles(star, project_dir=project_dir)
    table.require(poses=True, ctf=True, why="heterogeneity training (poses from a consensus refinement, and CTF)")
    if table.n < 2:
        raise StarError(star, f"holds {table.n} particle(s); heterogeneity needs many")
    if max_particles is not None and table.n > max_particles:
        table = table.subset(np.arange(max_particles))
    boxes, apixes = np.unique(table.box), np.unique(np.round(table.apix, 6))
    if len(boxes) != 1 or len(apixes) != 1:
        raise StarError(star, f"particles of several box sizes {boxes.tolist()} or pixel sizes {apixes.tolist()}; "
                        "use one optics setting")
    box, apix = int(boxes[0]), float(apixes[0])
    if lowpass_A < 2 * apix:
        raise OptionError("--lowpass-A", f"{lowpass_A:g} Å is beyond Nyquist ({2 * apix:g} Å) of {star}")
    crop = crop_size(box, apix, lowpass_A)
    rows = torch.as_tensor(_crop_rows(box, crop))
    src = ImageSource.from_table(table)
    yy, xx = np.mgrid[:box, :box] - box // 2
    r = np.hypot(yy, xx) * apix
    rad = 0.8 * box // 2 * apix if radius_A is None else radius_A
    outside = torch.as_tensor(r > rad)
    fts, var_sum, var_n = [], 0.0, 0
    for idx, imgs in src.chunks(batch):
        x = torch.as_tensor(imgs)
        if outside.any():
            bg = x[:, outside]
            var_sum += float(bg.var(dim=1).sum())
            var_n += len(idx)
        f = torch.fft.rfft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho")
        fts.append(f[:, rows, : crop // 2 + 1].clone())
        progress("read particles", int(idx[-1]) + 1, table.n)
    src.close()
    ft = torch.cat(fts)
    if var_n == 0:
        raise StarError(star, f"images of {box} px leave no pixels outside {rad:g} Å to measure the noise")
    noise_var = var_sum / var_n
    if not np.isfinite(noise_var) or noise_var <= 0:
        raise StarError(star, "images have no variance outside the particle (blank or masked images?)")
    from cryogmm.ctf import rfft2_frequencies

    ky, kx = rfft2_frequencies(crop, apix * box / crop, dtype=torch.float64)
    k2 = kx**2 + ky**2
    band = ((k2 <= (1.0 / lowpass_A) ** 2) & (k2 > 0)).double()
    band[:, 1: crop // 2] *= 2.0  # columns with a mirrored twin in the full transform
    return ParticleData(
        table=table, ft=ft, rotmat=torch.as_tensor(table.rotmat, dtype=torch.float32),
        shift_A=torch.as_tensor(table.shift_A, dtype=torch.float32), box=box, apix=apix, crop=crop,
        noise_var=float(noise_var), band=band.float(), k2=k2.float(), kx=kx[0].float(), ky=ky[:, 0].float(),
    )


# --------------------------------------------------------------------------- forward model
def project_fourier(g: Gaussians, rotmat: torch.Tensor, shift_A: torch.Tensor | None, kx: torch.Tensor,
                    ky: torch.Tensor) -> torch.Tensor:
    """Fourier transforms of the projections of a mixture: ``[B, len(ky), len(kx)]`` complex.

    ``P(k) = sum_n a_n exp(-2 pi^2 s_n^2 |k|^2) exp(-2 pi i k . x_n)`` with ``x_n = (A c_n)[:2] -
    shift`` (the image-plane position, as :func:`cryogmm.project.project`), ``kx``, ``ky`` in
    1/Å. Separable: one complex batched matrix product. ``g`` may carry per-image centres
    ``[B, N, 3]``. Equals the continuous transform of the projected density (e/Å^2 integrated
    over the plane), so ``P / apix^3`` is the DFT of the image ``project`` draws.
    """
    from cryogmm.project import rotate_centers

    xy, _ = rotate_centers(g.centers, rotmat, shift_A)
    B = xy.shape[0]
    s = g.sigmas.expand(B, -1) if g.sigmas.dim() == 1 else g.sigmas
    a = g.amplitudes.expand(B, -1) if g.amplitudes.dim() == 1 else g.amplitudes
    two_pi = 2.0 * math.pi
    s2 = (two_pi**2 / 2.0) * s[..., None] ** 2
    ex = torch.exp(-s2 * kx**2) * a[..., None]  # [B, N, kx]
    ey = torch.exp(-s2 * ky**2)
    px = -two_pi * xy[..., 0, None] * kx
    py = -two_pi * xy[..., 1, None] * ky
    cx = torch.complex(ex * torch.cos(px), ex * torch.sin(px))
    cy = torch.complex(ey * torch.cos(py), ey * torch.sin(py))
    return torch.bmm(cy.transpose(1, 2), cx)


# --------------------------------------------------------------------------- restraints
def restraint_pairs(ref: Reference, clash_cut_A: float = 12.0, elastic_seq: int = 0) -> dict:
    """Index pairs for the restraints: consecutive Cα (or backbone centroids) of a chain,
    side chain to its own backbone (residue2), and non-bonded pairs closer than
    ``clash_cut_A`` in the reference (the clash neighbour list)."""
    c = ref.gaussians.centers.double()
    bb = np.flatnonzero(ref.kind == 0)
    res = ref.residue_of[bb]
    ch = ref.chain_of_residue[res]
    consecutive = (np.diff(res) == 1) & (ch[1:] == ch[:-1])
    bonds = np.stack([bb[:-1][consecutive], bb[1:][consecutive]], 1) if len(bb) > 1 else np.zeros((0, 2), int)
    d_bond = torch.linalg.norm(c[bonds[:, 0]] - c[bonds[:, 1]], dim=1) if len(bonds) else torch.zeros(0)
    keep = (d_bond < 4.3).numpy()  # chain breaks and cis-peptides stay free
    bonds = bonds[keep]
    sc = np.flatnonzero(ref.kind == 1)
    bb_of_res = {int(r): int(i) for i, r in zip(bb, ref.residue_of[bb])}
    side = np.array([[bb_of_res[int(ref.residue_of[i])], i] for i in sc if int(ref.residue_of[i]) in bb_of_res],
                    dtype=np.int64).reshape(-1, 2)
    side_max = (torch.linalg.norm(c[side[:, 0]] - c[side[:, 1]], dim=1) + 1.0) if len(side) else torch.zeros(0)
    d = torch.cdist(c, c)
    ii, jj = torch.triu_indices(len(c), len(c), offset=1)
    near = d[ii, jj] < clash_cut_A
    r_i, r_j = torch.as_tensor(ref.residue_of)[ii], torch.as_tensor(ref.residue_of)[jj]
    nonbonded = (r_j - r_i).abs() > 1
    sel = near & nonbonded
    clash = torch.stack([ii[sel], jj[sel]], 1)
    # a clash is a pair closer than 3.6 Å (Cα) or than its reference distance, whichever is smaller
    clash_min = torch.clamp(d[clash[:, 0], clash[:, 1]], max=3.6) if len(clash) else torch.zeros(0)
    # elastic network: neighbour pairs, only those within `elastic_seq` residues along the
    # chain when given (local geometry kept, hinges free)
    el = near & ((r_j - r_i).abs() <= elastic_seq) if elastic_seq > 0 else near
    elastic = torch.stack([ii[el], jj[el]], 1)
    return {"bonds": torch.as_tensor(bonds, dtype=torch.long), "side": torch.as_tensor(side, dtype=torch.long),
            "side_max": side_max.float(), "clash": clash.long(), "clash_min": clash_min.float(),
            "elastic": elastic.long(), "elastic_d0": d[elastic[:, 0], elastic[:, 1]].float()}


def restraint_terms(centers: torch.Tensor, pairs: dict, bond_A: float = 3.8) -> dict:
    """Restraint energies per model ``[B]`` (Å^2 units) of deformed centres ``[B, N, 3]``:
    ``bond`` harmonic around ``bond_A``; ``sidechain`` squared excess over the maximum
    backbone-to-side-chain distance; ``clash`` squared overlap below the clash distance;
    ``elastic`` (when ``pairs`` has ``elastic``) harmonic around the reference distance
    ``elastic_d0`` of neighbour pairs (an elastic network that keeps local geometry)."""
    out = {}
    b = pairs["bonds"]
    if len(b):
        d = torch.linalg.norm(centers[:, b[:, 0]] - centers[:, b[:, 1]], dim=-1)
        out["bond"] = ((d - bond_A) ** 2).sum(1)
    s = pairs["side"]
    if len(s):
        d = torch.linalg.norm(centers[:, s[:, 0]] - centers[:, s[:, 1]], dim=-1)
        out["sidechain"] = (torch.relu(d - pairs["side_max"]) ** 2).sum(1)
    c = pairs["clash"]
    if len(c):
        d = torch.linalg.norm(centers[:, c[:, 0]] - centers[:, c[:, 1]] + 1e-9, dim=-1)
        out["clash"] = (torch.relu(pairs["clash_min"] - d) ** 2).sum(1)
    e = pairs.get("elastic")
    if e is not None and len(e):
        d = torch.linalg.norm(centers[:, e[:, 0]] - centers[:, e[:, 1]], dim=-1)
        out["elastic"] = ((d - pairs["elastic_d0"]) ** 2).sum(1)
    return out


# --------------------------------------------------------------------------- the VAE
class HeteroVAE(nn.Module):
    """Encoder (image and reference projection -> posterior over ``z``), deformer, scale."""

    def __init__(self, crop: int, zdim: int, deformer: Deformer, hidden: int = 256, init_log_scale: float = 0.0):
        super().__init__()
        self.crop, self.zdim = int(crop), int(zdim)
        self.encoder = mlp(2 * crop * crop, 2 * zdim, hidden, 3, zero_last=False)
        self.deformer = deformer
        self.log_scale = nn.Parameter(torch.tensor(float(init_log_scale)))
        yy, xx = torch.meshgrid(torch.arange(crop) - crop // 2, torch.arange(crop) - crop // 2, indexing="ij")
        self.register_buffer("mask", (torch.hypot(yy.float(), xx.float()) < crop // 2).float())

    def encode(self, img: torch.Tensor, ref_img: torch.Tensor):
        """Real cropped images ``[B, crop, crop]`` (noise-whitened) -> ``(mu, logvar)`` ``[B, zdim]``."""
        x = torch.cat([(img * self.mask).flatten(1), (ref_img * self.mask).flatten(1)], 1)
        h = self.encoder(x)
        return h[:, : self.zdim], h[:, self.zdim:].clamp(-12, 6)


class _Forward:
    """The per-batch computation shared by training, encoding and evaluation.

    The encoder's inputs (the band-limited image and the reference's CTF-modulated
    projection at the particle's pose, both whitened) and the CTFs are computed once for all
    particles: the reference does not change during training.
    """

    def __init__(self, vae: HeteroVAE, ref: Reference, data: ParticleData, device, chunk: int = 512):
        self.vae, self.data, self.dev = vae, data, device
        self.base = ref.gaussians.to(device)
        self.kx, self.ky = data.kx.to(device), data.ky.to(device)
        self.band = data.band.to(device)
        self.sd = math.sqrt(data.noise_var)
        self.apix3 = data.apix**3
        self.ctf_all = torch.cat([data.ctf(np.arange(b0, min(b0 + chunk, data.n))) for b0 in range(0, data.n, chunk)])
        # the image scale: least squares of the reference against (up to) 256 particles
        with torch.no_grad():
            x, R, sh, ctf = self._batch(np.arange(min(data.n, 256)))
            p = self.project(self.base, R, sh, ctf)
            self.ref_scale = float((self.band * (x.conj() * p).real).sum() / (self.band * (p.abs() ** 2)).sum())
        if not self.ref_scale > 0:
            raise InputError(data.table.source, "the images do not correlate positively with the reference model's "
                             "projections: check the poses, the CTF sign or the model's position (--map)")
        encs = []
        with torch.no_grad():
            for b0 in range(0, data.n, chunk):
                idx = np.arange(b0, min(b0 + chunk, data.n))
                x, R, sh, ctf = self._batch(idx)
                ref_ft = self.project(self.base, R, sh, ctf) * self.ref_scale
                img = data.images_real(x * (self.band > 0)) / self.sd
                rimg = data.images_real(ref_ft * (self.band > 0)) / self.sd
                encs.append(torch.stack([img, rimg], 1).cpu())
        self.enc_all = torch.cat(encs)

    def _batch(self, idx):
        d = self.data
        idx_t = torch.as_tensor(idx)
        return (d.ft[idx_t].to(self.dev), d.rotmat[idx_t].to(self.dev), d.shift_A[idx_t].to(self.dev),
                self.ctf_all[idx_t].to(self.dev))

    def batch(self, idx):
        return self._batch(idx) + (self.enc_all[torch.as_tensor(idx)].to(self.dev),)

    def project(self, g, R, sh, ctf):
        # orthonormal DFT of a box-px image drawn by `project` = P / (apix^3 * box)
        return project_fourier(g, R, sh, self.kx, self.ky) * ctf / (self.apix3 * self.data.box)

    def predict(self, g, R, sh, ctf):
        return self.project(g, R, sh, ctf) * torch.exp(self.vae.log_scale)

    def encode(self, enc):
        return self.vae.encode(enc[:, 0], enc[:, 1])


def _data_term(x, p, band, noise_var, loss: str):
    """Per image: Gaussian negative log-likelihood (up to a constant) or scaled correlation loss."""
    r = x - p
    if loss == "gaussian":
        return (band * (r.real**2 + r.imag**2)).sum((-2, -1)) / (2.0 * noise_var)
    xx = (band * (x.real**2 + x.imag**2)).sum((-2, -1))
    pp = (band * (p.real**2 + p.imag**2)).sum((-2, -1))
    xp = (band * (x.conj() * p).real).sum((-2, -1))
    corr = xp / torch.sqrt(xx * pp).clamp_min(1e-20)
    return (xx.detach() / (2.0 * noise_var)) * (1.0 - corr)


class _TrainStep(nn.Module):
    """One training batch as a module (so ``DistributedDataParallel`` can wrap it): per-image
    loss, data, KL and restraint terms for particles ``idx`` with latent noise ``eps``."""

    def __init__(self, vae: HeteroVAE, fw: "_Forward", pairs: dict, cfg: HeteroConfig, elastic_weight: float):
        super().__init__()
        self.vae = vae
        self._fw, self._pairs, self._cfg = fw, pairs, cfg
        self._w = {"bond": cfg.bond_weight, "sidechain": cfg.sidechain_weight, "clash": cfg.clash_weight,
                   "elastic": elastic_weight}

    def forward(self, idx, eps, beta: float):
        fw, cfg = self._fw, self._cfg
        x, R, sh, ctf, enc = fw.batch(idx)
        mu, logvar = fw.encode(enc)
        z = mu + eps * torch.exp(0.5 * logvar)
        g = self.vae.deformer(fw.base, z)
        p = fw.predict(g, R, sh, ctf)
        dterm = _data_term(x, p, fw.band, fw.data.noise_var, cfg.loss)
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)
        terms = restraint_terms(g.centers, self._pairs)
        rterm = sum(self._w[k] * v for k, v in terms.items()) if terms else torch.zeros_like(dterm)
        return dterm + beta * kl + rterm, dterm, kl, terms


def _rank_share(idx_all, eps_all, r: int, w: int):
    """Rank ``r``'s share of a global batch (particles ``idx_all``, latent noise ``eps_all``): every
    ``w``-th row from row ``r`` (the split ``DistributedSampler`` makes). Returns ``(idx, eps, weight)``;
    a rank left without particles gets a zero-weight stand-in, so that DDP's collectives stay in step."""
    idx, eps = idx_all[r::w], eps_all[r::w]
    if len(idx) == 0:
        return idx_all[:1], eps_all[:1], 0.0
    return idx, eps, 1.0


def _rank_loss(per: torch.Tensor, weight: float, n_all: int, w: int) -> torch.Tensor:
    """The loss whose gradient, averaged by DDP over ``w`` ranks, is the gradient of the mean of
    ``per`` over the whole global batch of ``n_all`` particles (one process: that mean)."""
    return per.mean() if w == 1 else per.sum() * (weight * w / n_all)


def _build(cfg: HeteroConfig, ref: Reference, data: ParticleData) -> HeteroVAE:
    deformer = make_deformer(cfg.decoder, n=ref.gaussians.n, zdim=cfg.zdim, residue_of=ref.residue_of,
                             chain_of_residue=ref.chain_of_residue, segments=cfg.segments, hidden=cfg.hidden,
                             temperature=cfg.temperature, per_chain=cfg.per_chain)
    return HeteroVAE(data.crop, cfg.zdim, deformer, hidden=cfg.hidden)


def _check_config(cfg: HeteroConfig):
    if cfg.decoder not in ("segments", "displacement"):
        raise OptionError("--decoder", f"{cfg.decoder!r}; expected segments or displacement")
    if cfg.loss not in ("gaussian", "correlation"):
        raise OptionError("--loss", f"{cfg.loss!r}; expected gaussian or correlation")
    if cfg.gaussians not in ("ca", "residue2"):
        raise OptionError("--gaussians", f"{cfg.gaussians!r}; expected ca or residue2")
    for name, v, lo in (("--zdim", cfg.zdim, 1), ("--epochs", cfg.epochs, 1), ("--batch", cfg.batch, 1),
                        ("--segments", cfg.segments, 1)):
        if v < lo:
            raise OptionError(name, f"{v}; expected at least {lo}")
    if cfg.lowpass_A <= 0:
        raise OptionError("--lowpass-A", f"{cfg.lowpass_A}; expected a positive resolution in Å")


def _setup(cfg: HeteroConfig, progress=None):
    data = load_particles(cfg.star, lowpass_A=cfg.lowpass_A, project_dir=cfg.project_dir,
                          max_particles=cfg.max_particles, progress=progress)
    center = _map_center(cfg.map, data.box, data.apix) if cfg.map else None
    ref = load_reference(cfg.model, box=data.box, apix=data.apix, mode=cfg.gaussians,
                         resolution_A=cfg.resolution_A, center_A=center)
    return data, ref


def _config_json(cfg) -> dict:
    """The config with absolute paths, so a run can be analyzed from any folder."""
    d = asdict(cfg)
    return {k: (str(Path(v).absolute()) if isinstance(v, (Path, str)) and k in _PATHS and v else v)
            for k, v in d.items()}


_PATHS = ("star", "model", "out", "map", "project_dir")


def _save_checkpoint(path, vae, opt, epoch, history, cfg, data, ref, rng):
    from cryogmm.bridge.fileio import atomic_output

    state = {
        "epoch": epoch,
        "model": vae.state_dict(),
        "optimizer": opt.state_dict(),
        "history": json.dumps(history),
        "config": json.dumps(_config_json(cfg)),
        "meta": json.dumps({"crop": data.crop, "box": data.box, "apix": data.apix, "noise_var": data.noise_var,
                            "center_A": ref.center_A.tolist(), "n_gaussians": ref.gaussians.n}),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": json.dumps(rng.bit_generator.state),
    }
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no checkpoint here: train first (cryogmm hetero train)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(path, f"is not a readable cryogmm hetero checkpoint ({str(e).splitlines()[0]})") from None


def train_hetero(cfg: HeteroConfig, progress=None) -> dict:
    """Train; write ``checkpoint.pt`` (every epoch), ``config.json``, ``loss.png`` and
    ``report.json`` into ``cfg.out``. Returns the report."""
    from cryogmm import distributed
    from cryogmm.bridge.fileio import atomic_output
    from cryogmm.jobs import Timer, pick_device, set_matmul_precision, write_report

    timer = Timer()
    progress = progress or (lambda *a: None)
    _check_config(cfg)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    state = None
    if cfg.resume:
        state = _load_checkpoint(ckpt_path)
        old = json.loads(state["config"])
        for k in ("decoder", "zdim", "segments", "gaussians", "lowpass_A", "hidden", "per_chain"):
            if str(old[k]) != str(getattr(cfg, k)):
                raise OptionError(f"--{k.replace('_', '-')}", f"{getattr(cfg, k)} differs from the checkpoint's "
                                  f"{old[k]} in {ckpt_path}: resume with the same settings")
    elif ckpt_path.exists():
        raise OptionError("--out", f"{out} already holds a training run ({CHECKPOINT}); use --resume or a new --out")
    dev = pick_device(cfg.device)
    set_matmul_precision(dev, cfg.matmul_precision)
    dev = distributed.setup(dev)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    data, ref = _setup(cfg, progress)
    vae = _build(cfg, ref, data).to(dev)
    fw = _Forward(vae, ref, data, dev)
    pairs = {k: v.to(dev) for k, v in restraint_pairs(ref, elastic_seq=cfg.elastic_seq).items()}
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    # the elastic network holds the displacement decoder's local geometry; segments are rigid already
    elastic_weight = cfg.elastic_weight if cfg.elastic_weight is not None else (
        0.1 if cfg.decoder == "displacement" else 0.0)
    history = []
    first = 0
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history = json.loads(state["history"])
        first = int(state["epoch"]) + 1
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = json.loads(state["numpy_rng"])
    else:
        with torch.no_grad():
            vae.log_scale.fill_(math.log(fw.ref_scale))
    step = distributed.ddp(_TrainStep(vae, fw, pairs, cfg, elastic_weight), dev)
    r, w = distributed.rank(), distributed.world()
    main = distributed.is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_output(out / CONFIG) as tmp:
            tmp.write_text(json.dumps(_config_json(cfg), indent=2) + "\n")
    n = data.n
    seconds_train = sum(h["seconds"] for h in history)
    for epoch in range(first, cfg.epochs):
        t0 = time.perf_counter()
        vae.train()
        beta = cfg.beta * min(1.0, (epoch + 1) / max(1, cfg.kl_warmup))
        order = rng.permutation(n)
        sums = {"loss": 0.0, "data": 0.0, "kl": 0.0}
        for b0 in range(0, n, cfg.batch):
            idx_all = np.sort(order[b0:b0 + cfg.batch])
            # the batch's latent noise, drawn whole on every rank (the one-process stream), then split
            eps_all = torch.randn(len(idx_all), cfg.zdim, device=dev)
            idx, eps, weight = _rank_share(idx_all, eps_all, r, w)
            per, dterm, kl, terms = step(idx, eps, beta)
            loss = _rank_loss(per, weight, len(idx_all), w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            k = len(idx) if weight else 0
            sums["loss"] += float(per.detach().mean()) * k
            sums["data"] += float(dterm.detach().mean()) * k
            sums["kl"] += float(kl.detach().mean()) * k
            for name, v in terms.items():
                sums[name] = sums.get(name, 0.0) + float(v.detach().mean()) * k
            progress(f"epoch {epoch + 1}/{cfg.epochs}", b0 + len(idx_all), n)
        if w > 1:
            keys = sorted(sums)
            tot = distributed.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
            sums = dict(zip(keys, tot.tolist()))
        sec = time.perf_counter() - t0
        seconds_train += sec
        rec = {"epoch": epoch + 1, "beta": beta, "seconds": sec, "images_per_s": n / sec}
        rec.update({k: v / n for k, v in sums.items()})
        history.append(rec)
        if main:
            _save_checkpoint(ckpt_path, vae, opt, epoch, history, cfg, data, ref, rng)
    report = {
        "job": "hetero train",
        "decoder": cfg.decoder,
        "n_particles": n,
        "n_gaussians": ref.gaussians.n,
        "box": data.box,
        "crop": data.crop,
        "apix_A": data.apix,
        "lowpass_A": cfg.lowpass_A,
        "noise_sd": math.sqrt(data.noise_var),
        "zdim": cfg.zdim,
        "epochs": len(history),
        "resumed_from_epoch": first if cfg.resume else None,
        "history": history,
        "seconds_training": seconds_train,
        "images_per_s": n * len(history) / seconds_train if seconds_train > 0 else None,
        "device": str(dev),
        "seconds": timer(),
        "config": _config_json(cfg),
        "outputs": [CHECKPOINT, CONFIG, "loss.png", "report.json"],
    }
    if w > 1:
        report["processes"] = w
    if main:
        _loss_plot(out / "loss.png", history)
        write_report(out / "report.json", report)
    distributed.barrier()
    return report


def _loss_plot(path, history):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cryogmm.bridge.fileio import atomic_output

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    ax[0].plot(ep, [h["data"] for h in history])
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("data term (per image)")
    ax[1].plot(ep, [h["kl"] for h in history])
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("KL (nats per image)")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- loading a run
class Run:
    """A trained run: config, reference, VAE (eval mode) and, on demand, the particles."""

    def __init__(self, run_dir, device=None, need_data: bool = True, star=None, project_dir=None):
        self.dir = Path(run_dir)
        state = _load_checkpoint(self.dir / CHECKPOINT)
        cfgd = json.loads(state["config"])
        meta = json.loads(state["meta"])
        for k in ("star", "model", "out", "map", "project_dir"):
            cfgd[k] = Path(cfgd[k]) if cfgd.get(k) else None
        self.cfg = HeteroConfig(**cfgd)
        if star is not None:
            self.cfg.star = Path(star)
        if project_dir is not None:
            self.cfg.project_dir = Path(project_dir)
        self.meta = meta
        self.epoch = int(state["epoch"]) + 1
        self.dev = device or torch.device("cpu")
        self.ref = load_reference(self.cfg.model, box=meta["box"], apix=meta["apix"], mode=self.cfg.gaussians,
                                  resolution_A=self.cfg.resolution_A, center_A=np.array(meta["center_A"]))
        deformer = make_deformer(self.cfg.decoder, n=self.ref.gaussians.n, zdim=self.cfg.zdim,
                                 residue_of=self.ref.residue_of, chain_of_residue=self.ref.chain_of_residue,
                                 segments=self.cfg.segments, hidden=self.cfg.hidden,
                                 temperature=self.cfg.temperature, per_chain=self.cfg.per_chain)
        self.vae = HeteroVAE(meta["crop"], self.cfg.zdim, deformer, hidden=self.cfg.hidden)
        self.vae.load_state_dict(state["model"])
        self.vae.to(self.dev).eval()
        self.data = None
        if need_data:
            self.data = load_particles(self.cfg.star, lowpass_A=self.cfg.lowpass_A, project_dir=self.cfg.project_dir,
                                       max_particles=self.cfg.max_particles)
            if self.data.crop != meta["crop"]:
                raise InputError(self.cfg.star, f"particles crop to {self.data.crop} px but the run used "
                                 f"{meta['crop']} px: not the particles this run was trained on")

    @torch.no_grad()
    def encode_all(self, batch: int = 512) -> np.ndarray:
        fw = _Forward(self.vae, self.ref, self.data, self.dev)
        zs = []
        for b0 in range(0, self.data.n, batch):
            idx = np.arange(b0, min(b0 + batch, self.data.n))
            mu, _ = fw.encode(fw.batch(idx)[4])
            zs.append(mu.cpu())
        return torch.cat(zs).numpy()

    @torch.no_grad()
    def decode_atoms(self, z, batch: int = 256) -> np.ndarray:
        """Full-atom models (file frame, Å) ``[K, M, 3]`` for latent rows ``z [K, D]``."""
        z = torch.as_tensor(np.asarray(z), dtype=torch.float32)
        base = self.ref.gaussians.to(self.dev)
        pts = self.ref.atoms_box().to(self.dev)
        owner = torch.as_tensor(self.ref.owner, device=self.dev)
        out = []
        for b0 in range(0, len(z), batch):
            moved = self.vae.deformer.move_points(base, z[b0:b0 + batch].to(self.dev), pts, owner)
            out.append(moved.cpu().double().numpy() + self.ref.center_A)
        return np.concatenate(out) if out else np.zeros((0,) + tuple(pts.shape))


def _read_z(path, zdim: int) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        z = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2)
    except Exception as e:
        raise InputError(path, f"cannot be read as a table of numbers ({str(e).splitlines()[0]})") from None
    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 1:
        z = z[None]
    if z.ndim != 2 or z.shape[1] != zdim:
        raise InputError(path, f"holds rows of {z.shape[-1] if z.ndim else 0} values but the run's latent space "
                         f"has {zdim} dimensions")
    if not np.all(np.isfinite(z)):
        raise InputError(path, "holds NaN or infinite values")
    return z


def decode_hetero(run_dir, z_path, out_pdb, device=None) -> dict:
    """One model per latent row of ``z_path`` (text or .npy, ``[K, zdim]``) into a multi-model PDB."""
    from cryogmm.hetero_truth import write_models

    run = Run(run_dir, device=device, need_data=False)
    z = _read_z(z_path, run.cfg.zdim)
    models = run.decode_atoms(z)
    write_models(out_pdb, run.ref.model, models)
    return {"models": len(models), "out": str(out_pdb)}


# --------------------------------------------------------------------------- analysis
@dataclass
class AnalyzeConfig:
    run: Path
    out: Path | None = None
    pcs: int = 2
    frames: int = 10
    clusters: int = 4
    backproject: bool = True
    truth: Path | None = None
    truth_models: Path | None = None
    star: Path | None = None
    project_dir: Path | None = None
    seed: int = 0
    device: str | None = None


def _pca(z: np.ndarray, k: int):
    mean = z.mean(0)
    zc = z - mean
    _, s, vt = np.linalg.svd(zc, full_matrices=False)
    k = min(k, vt.shape[0])
    var = s**2 / max(1, len(z) - 1)
    return mean, vt[:k], zc @ vt[:k].T, var / var.sum()


def analyze_hetero(cfg: AnalyzeConfig, progress=None) -> dict:
    """Write into ``cfg.out`` (default ``RUN/analyze``): ``z.npy``, ``particles_latent.star``
    (and ``.cs``), ``pcN_trajectory.pdb``, ``pcN_model_XX.mrc`` and ``pcN_backproj_XX.mrc``,
    ``cluster_K.star``/``.cs``, ``latent.png``, ``segments.csv`` and ``segments.pdb``
    (segments decoder), ``report.json`` (with truth figures when ``truth`` is given)."""
    from cryogmm import mapio
    from cryogmm.bridge.fileio import OutputDir
    from cryogmm.bridge.images import ImageSource
    from cryogmm.bridge.io import write_particles
    from cryogmm.bridge.results import with_results
    from cryogmm.gmm import gaussians_from_coords, gaussians_to_map
    from cryogmm.hetero_truth import write_models
    from cryogmm.jobs import Timer, pick_device, write_report
    from cryogmm.reconstruct import reconstruct_table

    timer = Timer()
    progress = progress or (lambda *a: None)
    if cfg.pcs < 1 or cfg.frames < 2 or cfg.clusters < 1:
        raise OptionError("--pcs/--frames/--clusters", f"{cfg.pcs}/{cfg.frames}/{cfg.clusters}; expected >= 1, >= 2, >= 1")
    dev = pick_device(cfg.device)
    run = Run(cfg.run, device=dev, star=cfg.star, project_dir=cfg.project_dir)
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "analyze"
    data, ref = run.data, run.ref
    box, apix = data.box, data.apix
    z = run.encode_all()
    mean, comps, proj, ratio = _pca(z, cfg.pcs)
    rep = {"job": "hetero analyze", "run": str(cfg.run), "epoch": run.epoch, "decoder": run.cfg.decoder,
           "n_particles": data.n, "zdim": run.cfg.zdim, "pca_explained_variance": ratio.tolist(), "outputs": []}
    origin = ref.center_A - (box // 2) * apix
    with OutputDir(out) as od:
        np.save(od.path("z.npy"), z)
        table = with_results(data.table, latent=z)
        write_particles(table, od.path("particles_latent.star"))
        write_particles(table, od.path("particles_latent.cs"))
        rep["outputs"] += ["z.npy", "particles_latent.star", "particles_latent.cs"]
        # ---- trajectories along the principal components
        traj = {}
        for k in range(comps.shape[0]):
            lo, hi = np.percentile(proj[:, k], [5, 95])
            ts = np.linspace(lo, hi, cfg.frames)
            zk = mean[None] + ts[:, None] * comps[k][None]
            models = run.decode_atoms(zk)
            write_models(od.path(f"pc{k + 1}_trajectory.pdb"), ref.model, models)
            np.savetxt(od.path(f"pc{k + 1}_z.txt"), zk, fmt="%.6f")
            rep["outputs"] += [f"pc{k + 1}_trajectory.pdb", f"pc{k + 1}_z.txt"]
            # nearest trajectory point of every particle along this PC
            nearest = np.abs(proj[:, k][:, None] - ts[None]).argmin(1)
            counts = []
            for f, m in enumerate(models):
                g = gaussians_from_coords(ref.model, m, "atoms", resolution_A=2.0 * apix, center_A=ref.center_A)
                mapio.write_map(od.path(f"pc{k + 1}_model_{f:02d}.mrc"), gaussians_to_map(g, box, apix).numpy(),
                                apix, origin_A=origin)
                sel = np.flatnonzero(nearest == f)
                counts.append(int(len(sel)))
                if cfg.backproject and len(sel) >= 2:
                    sub = data.table.subset(sel).with_half_sets(seed=cfg.seed)
                    src = ImageSource.from_table(sub)
                    _, _, vol, _ = reconstruct_table(sub, src, device=dev)
                    src.close()
                    mapio.write_map(od.path(f"pc{k + 1}_backproj_{f:02d}.mrc"), vol.numpy(), apix, origin_A=origin)
                progress(f"maps along PC{k + 1}", f + 1, cfg.frames)
            traj[f"pc{k + 1}"] = {"t": ts.tolist(), "particles_per_frame": counts}
        rep["trajectories"] = traj
        # ---- clusters
        from scipy.cluster.vq import kmeans2

        k = min(cfg.clusters, data.n)
        centers, labels = kmeans2(z, k, seed=cfg.seed, minit="++")
        clusters = []
        for c in range(k):
            sel = np.flatnonzero(labels == c)
            if not len(sel):
                continue
            sub = with_results(data.table.subset(sel), latent=z[sel], labels=np.full(len(sel), c))
            write_particles(sub, od.path(f"cluster_{c}.star"))
            write_particles(sub, od.path(f"cluster_{c}.cs"))
            clusters.append({"cluster": c, "n": int(len(sel)), "star": f"cluster_{c}.star", "cs": f"cluster_{c}.cs"})
        write_models(od.path("cluster_centers.pdb"), ref.model, run.decode_atoms(centers))
        np.savetxt(od.path("cluster_centers_z.txt"), centers, fmt="%.6f")
        rep["clusters"] = clusters
        _latent_plot(od.path("latent.png"), proj, labels, ratio)
        rep["outputs"] += ["cluster_centers.pdb", "latent.png"]
        # ---- segments
        if run.cfg.decoder == "segments":
            rep["segments"] = _write_segments(od, run)
            rep["outputs"] += ["segments.csv", "segments.pdb"]
        # ---- truth
        if cfg.truth:
            rep["truth"] = _truth_report(run, z, proj[:, 0], cfg.truth, cfg.truth_models)
        rep["seconds"] = timer()
        write_report(od.path("report.json"), rep)
    return rep


def _latent_plot(path, proj, labels, ratio):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cryogmm.bridge.fileio import atomic_output

    fig, ax = plt.subplots(1, 2, figsize=(9, 4))
    y = proj[:, 1] if proj.shape[1] > 1 else np.zeros(len(proj))
    ax[0].scatter(proj[:, 0], y, c=labels, s=3, cmap="tab10")
    ax[0].set_xlabel(f"PC1 ({100 * ratio[0]:.0f}%)")
    ax[0].set_ylabel(f"PC2 ({100 * ratio[1]:.0f}%)" if len(ratio) > 1 else "")
    ax[1].hist(proj[:, 0], bins=50)
    ax[1].set_xlabel("PC1")
    ax[1].set_ylabel("particles")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def _write_segments(od, run) -> list:
    from cryogmm.bridge.fileio import atomic_output
    from cryogmm.hetero_truth import write_models

    ref = run.ref
    with torch.no_grad():
        hard = run.vae.deformer.hard_segments().cpu().numpy()
    m = ref.model
    first_atom = {}
    for i, r in enumerate(m.res_id):
        first_atom.setdefault(int(r), i)
    rows = []
    r0 = 0
    R = len(hard)
    for r in range(1, R + 1):
        if r == R or hard[r] != hard[r0] or ref.chain_of_residue[r] != ref.chain_of_residue[r0]:
            a, b = first_atom[r0], first_atom[r - 1]
            rows.append({"segment": int(hard[r0]), "chain": str(m.chain[a]), "first": int(m.seq_id[a]),
                         "last": int(m.seq_id[b]), "residues": r - r0})
            r0 = r
    lines = ["segment,chain,first,last,residues"] + [f"{x['segment']},{x['chain']},{x['first']},{x['last']},"
                                                      f"{x['residues']}" for x in rows]
    with atomic_output(od.path("segments.csv")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    write_models(od.path("segments.pdb"), m, m.coords[:1], bfactors=hard[m.res_id].astype(float))
    return rows


def _truth_report(run, z, pc1, truth_star, truth_models=None) -> dict:
    from cryogmm.bridge.io import read_particles
    from cryogmm.gmm import read_model
    from cryogmm.hetero_truth import atom_keys, match_atoms, truth_figures

    truth_star = Path(truth_star)
    t = read_particles(truth_star)
    if "rlnCryogmmTrueFrame" not in t.particles.columns:
        raise StarError(truth_star, "has no rlnCryogmmTrueFrame column (a truth.star from cryogmm simulate)")
    data = run.data
    names = data.table.particles["rlnImageName"].to_numpy()
    tnames = t.particles["rlnImageName"].to_numpy()
    pos = {n: i for i, n in enumerate(tnames)}
    if not all(n in pos for n in names):
        raise StarError(truth_star, "does not list every particle of the run (matched by rlnImageName)")
    frames = t.particles["rlnCryogmmTrueFrame"].to_numpy()[[pos[n] for n in names]].astype(int)
    tm = Path(truth_models) if truth_models else truth_star.parent / "truth_models.pdb"
    kw = {}
    if tm.is_file():
        truth = read_model(tm)
        ref = run.ref
        ia, ib = match_atoms(atom_keys(ref.model), atom_keys(truth))
        ca = ref.model.atom_name[ia] == "CA"
        ia, ib = ia[ca], ib[ca]
        decoded = np.concatenate([run.decode_atoms(z[i:i + 512])[:, ia] for i in range(0, len(z), 512)])
        kw = {"decoded_ca": decoded, "truth_ca": truth.coords[:, ib], "reference_ca": ref.model.coords[0][ia]}
    fig = truth_figures(z, frames, pc1=pc1, **kw)
    if kw:
        # which residues move: decoded (median model of the first vs the last true frame's
        # particles) against the truth (first vs last frame), per Cα
        lo, hi = frames.min(), frames.max()
        ends = run.decode_atoms(np.stack([np.median(z[frames == lo], 0), np.median(z[frames == hi], 0)]))[:, ia]
        moved = np.linalg.norm(ends[1] - ends[0], axis=1)
        true_moved = np.linalg.norm(truth.coords[hi][ib] - truth.coords[lo][ib], axis=1)
        fig["per_residue_motion_pearson"] = float(np.corrcoef(moved, true_moved)[0, 1])
        fig["end_to_end_ca_rmsd_decoded_A"] = float(np.sqrt((moved**2).mean()))
        fig["end_to_end_ca_rmsd_true_A"] = float(np.sqrt((true_moved**2).mean()))
    fig["truth_star"] = str(truth_star)
    fig["truth_models"] = str(tm) if kw else None
    return fig


# --------------------------------------------------------------------------- demo
def demo_hetero(out_dir, seed: int = 0, progress=None) -> dict:
    """A short heterogeneity run on the bundled adenylate kinase (< 1 min on a CPU): simulate
    open-to-closed particles (CORE-superposed endpoints, box 48, SNR 0.1), train the
    segments decoder from the open model, analyze against the truth. Returns the figures."""
    from importlib import resources

    from cryogmm.hetero_truth import ADK_CORE, superpose_file
    from cryogmm.simulate import SimulateConfig, simulate

    out_dir = Path(out_dir)
    data_dir = resources.files("cryogmm.data")
    open_pdb = Path(str(data_dir / "adk_open.pdb"))
    closed_pdb = Path(str(data_dir / "adk_closed.pdb"))
    out_dir.mkdir(parents=True, exist_ok=True)
    aligned = out_dir / "adk_closed_on_open_core.pdb"
    superpose_file(closed_pdb, open_pdb, aligned, ADK_CORE)
    sim = out_dir / "particles"
    simulate(SimulateConfig(out=sim, endpoints=(open_pdb, aligned), frames=10, n=600, box=48, apix=2.5, snr=0.1,
                            seed=seed, device="cpu"))
    run = out_dir / "run"
    tr = train_hetero(HeteroConfig(star=sim / "particles.star", model=open_pdb, out=run, decoder="segments",
                                   segments=6, zdim=2, epochs=10, batch=32, lowpass_A=10.0, map=sim / "truth_map.mrc",
                                   kl_warmup=3, seed=seed, device="cpu"), progress=progress)
    an = analyze_hetero(AnalyzeConfig(run=run, frames=5, pcs=1, clusters=2, backproject=False,
                                      truth=sim / "truth.star", seed=seed, device="cpu"))
    return {"train_seconds": tr["seconds"], "images_per_s": tr["images_per_s"], **an.get("truth", {})}
