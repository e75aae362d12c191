"""The heterogeneity VAE: encoder, deformer, the forward model (projection with CTF and pose),
the data term, restraints between coarse Gaussians, and the per-rank loss shares under
torchrun."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from cryogmm import distributed
from cryogmm.bridge.images import prefetched
from cryogmm.core.gaussians import Gaussians
from cryogmm.core.rotations import random_rotations
from cryogmm.errors import InputError
from cryogmm.hetero.cache import tensor_digest
from cryogmm.hetero.config import HeteroConfig
from cryogmm.hetero.data import ParticleData, project_fourier
from cryogmm.hetero.deform import Deformer, make_deformer, mlp
from cryogmm.hetero.reference import Reference
from cryogmm.io.structures import gaussians_from_coords


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


# --------------------------------------------------------------------------- the zero point
def reference_atoms(ref: Reference, data: ParticleData, resolution_A: float | None = None) -> Gaussians:
    """Every atom of the reference as a Gaussian in the box frame, at ``resolution_A`` (default
    the data's Nyquist, 2 x pixel): the all-atom density the coarse model is calibrated to, and
    what ``draw="atoms"`` draws."""
    res = resolution_A or 2.0 * data.apix
    return gaussians_from_coords(ref.model, ref.model.coords[0], "atoms", resolution_A=res, center_A=ref.center_A)


def calibrate_base(ref: Reference, data: ParticleData, resolution_A: float | None = None, views: int = 64,
                   steps: int = 300, lr: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Offsets ``[N, 3]`` (Å) of the reference's coarse Gaussians fitted to the reference's own
    all-atom density: the coarse model that draws the unmoved reference.

    One Gaussian per residue at its Cα (or backbone and side-chain centroids) is not where the
    residue's density is; a decoder trained from that base learns a constant offset that moves
    every atom by it (about 1 Å for a protein at 10 Å), even on particles of the reference
    itself. Fitting the centres to the all-atom reference first (band-limited projections at
    ``views`` random orientations, on the particles' cropped grid and band, no CTF) makes the
    zero deformation the reference: decoded motion is then motion in the data, not
    coarse-graining. The restraints still act on the Cα (or centroid) centres and atoms are
    moved by the deformation from their own positions: only the drawing is calibrated
    (:meth:`HeteroVAE.drawn`)."""
    atoms = reference_atoms(ref, data, resolution_A)
    R = torch.as_tensor(random_rotations(views, np.random.default_rng(seed)), dtype=torch.float32)
    kx, ky, band = data.kx, data.ky, data.band
    with torch.no_grad():
        target = project_fourier(atoms, R, None, kx, ky)
        norm = float((band * target.abs() ** 2).sum())
    base = ref.gaussians
    delta = torch.zeros_like(base.centers, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        p = project_fourier(base.with_centers(base.centers + delta), R, None, kx, ky)
        loss = (band * (p - target).abs() ** 2).sum() / norm
        opt.zero_grad()
        loss.backward()
        opt.step()
    return delta.detach()


def load_vae_state(vae: "HeteroVAE", state: dict) -> None:
    """Load a checkpoint's network state; runs from before the calibration draw at the Cα."""
    state = dict(state)
    state.setdefault("draw_offsets", torch.zeros_like(vae.draw_offsets))
    for name in ("atom_centers", "atom_amplitudes", "atom_sigmas", "atom_owner"):
        if name not in state:  # runs from before draw="atoms" draw the coarse model
            state[name] = torch.zeros_like(getattr(vae, name))
        elif state[name].shape != getattr(vae, name).shape:  # the run's atoms, whatever the model was built with
            vae.register_buffer(name, torch.empty_like(state[name]))
    vae.load_state_dict(state)


# --------------------------------------------------------------------------- the VAE
class HeteroVAE(nn.Module):
    """Encoder (image and reference projection -> posterior over ``z``), deformer, scale."""

    def __init__(self, crop: int, zdim: int, deformer: Deformer, hidden: int = 256, init_log_scale: float = 0.0,
                 n_gaussians: int | None = None, atoms: Gaussians | None = None, owner=None):
        super().__init__()
        self.crop, self.zdim = int(crop), int(zdim)
        self.encoder = mlp(2 * crop * crop, 2 * zdim, hidden, 3, zero_last=False)
        self.deformer = deformer
        self.log_scale = nn.Parameter(torch.tensor(float(init_log_scale)))
        # where each coarse Gaussian is drawn, relative to its restrained centre (Cα or
        # centroid): the calibration of :func:`calibrate_base`; zero for runs without it
        self.register_buffer("draw_offsets", torch.zeros(int(n_gaussians or 0), 3))
        # ``draw="atoms"``: the forward model draws every atom as a Gaussian (box-frame centres,
        # amplitudes, widths), moved by the deformation of the Gaussian that owns it; empty else
        m = 0 if atoms is None else atoms.n
        self.register_buffer("atom_centers", torch.zeros(m, 3) if atoms is None else atoms.centers.clone())
        self.register_buffer("atom_amplitudes", torch.zeros(m) if atoms is None else atoms.amplitudes.clone())
        self.register_buffer("atom_sigmas", torch.zeros(m) if atoms is None else atoms.sigmas.clone())
        self.register_buffer("atom_owner", torch.zeros(m, dtype=torch.long) if owner is None
                             else torch.as_tensor(owner, dtype=torch.long).clone())
        yy, xx = torch.meshgrid(torch.arange(crop) - crop // 2, torch.arange(crop) - crop // 2, indexing="ij")
        self.register_buffer("mask", (torch.hypot(yy.float(), xx.float()) < crop // 2).float())

    def drawn(self, base: Gaussians, z: torch.Tensor, g: Gaussians) -> Gaussians:
        """The mixture the forward model draws for deformed ``g`` (``deformer(base, z)``): the
        calibrated centres ``base + draw_offsets`` moved by the same deformation (``g`` itself
        when the run has no calibration), or with ``draw="atoms"`` every atom moved by it."""
        if len(self.atom_owner):
            return Gaussians(self.deformer.move_points(base, z, self.atom_centers, self.atom_owner),
                             self.atom_amplitudes, self.atom_sigmas)
        if not len(self.draw_offsets) or not bool(self.draw_offsets.any()):
            return g
        own = torch.arange(base.n, device=base.centers.device)
        return g.with_centers(self.deformer.move_points(base, z, base.centers + self.draw_offsets, own))

    def encode(self, img: torch.Tensor, ref_img: torch.Tensor):
        """Real cropped images ``[B, crop, crop]`` (noise-whitened) -> ``(mu, logvar)`` ``[B, zdim]``."""
        x = torch.cat([(img * self.mask).flatten(1), (ref_img * self.mask).flatten(1)], 1)
        h = self.encoder(x)
        return h[:, : self.zdim], h[:, self.zdim:].clamp(-12, 6)


class ForwardModel:
    """The per-batch computation shared by training, encoding and evaluation.

    The encoder's inputs (the band-limited image and the reference's CTF-modulated
    projection at the particle's pose, both whitened) and the CTFs are computed once for the
    particles held in memory (the reference does not change during training); for streamed
    particles (:class:`~cryogmm.hetero.data.ParticleData` not ``resident``) they are written
    once to the particles' on-disk cache (:mod:`cryogmm.hetero.cache`) with the same functions
    and chunks, and read back per batch, or (without a cache) computed per batch; the next batch
    is prepared in a background thread (:meth:`prefetch`).
    """

    def __init__(self, vae: HeteroVAE, ref: Reference, data: ParticleData, device, chunk: int = 512):
        self.vae, self.data, self.dev = vae, data, device
        self.base = ref.gaussians.to(device)
        off = vae.draw_offsets.to(device)
        # the unmoved reference as drawn (calibrated centres when the run has them)
        if len(vae.atom_owner):  # draw="atoms": the reference's own atoms
            self.base_drawn = Gaussians(vae.atom_centers, vae.atom_amplitudes, vae.atom_sigmas).to(device)
        else:
            self.base_drawn = self.base.with_centers(self.base.centers + off) if len(off) else self.base
        self.kx, self.ky = data.kx.to(device), data.ky.to(device)
        self.band = data.band.to(device)
        self._band_full, self._k2 = self.band, data.k2.to(device)
        self.sd = math.sqrt(data.noise_var)
        self.apix3 = data.apix**3
        self.ctf_all = self.enc_all = None
        self._ready = None
        rows = data.rows
        parts = [rows[b0:b0 + chunk] for b0 in range(0, len(rows), chunk)]
        if data.resident:
            self.ctf_all = torch.cat([data.ctf(idx) for idx in parts]) if parts else None
        # the image scale: least squares of the reference against the first (up to) 256 particles
        # (summed over the ranks that hold them)
        with torch.no_grad():
            first = rows[rows < min(data.n, 256)]
            num = torch.zeros(2)
            if len(first):
                x, R, sh, ctf = self._batch(first)
                p = self.project(self.base_drawn, R, sh, ctf)
                num[0] = (self.band * (x.conj() * p).real).sum().cpu()
                num[1] = (self.band * (p.abs() ** 2)).sum().cpu()
            distributed.all_reduce_sum(num)
            self.ref_scale = float(num[0] / num[1])
        if not self.ref_scale > 0:
            raise InputError(data.table.source, "the images do not correlate positively with the reference model's "
                             "projections: check the poses, the CTF sign or the model's position (--map)")
        if data.resident:
            with torch.no_grad():
                self.enc_all = torch.cat([self.encoder_inputs(*self._batch(idx)).cpu() for idx in parts])
        elif data.cache is not None:  # streamed through the cache: its encoder inputs written once
            key = tensor_digest(data.cache.key, self.base_drawn.centers, self.base_drawn.amplitudes,
                                self.base_drawn.sigmas, self.ref_scale, self.sd, self._band_full > 0, self.kx, self.ky,
                                self.apix3, data.box)
            if not data.cache.encoder_ready(key):
                with torch.no_grad():
                    data.cache.write_encoder(key, (self.encoder_inputs(*self._batch(idx)).cpu() for idx in parts))

    def encoder_inputs(self, x, R, sh, ctf) -> torch.Tensor:
        """``[B, 2, crop, crop]``: the whitened band-limited images and reference projections."""
        ref_ft = self.project(self.base_drawn, R, sh, ctf) * self.ref_scale
        inside = self._band_full > 0  # the whole band, whatever the loss band (annealing)
        img = self.data.images_real(x * inside) / self.sd
        rimg = self.data.images_real(ref_ft * inside) / self.sd
        return torch.stack([img, rimg], 1)

    def set_band(self, resolution_A: float | None) -> None:
        """Restrict the loss band to frequencies up to ``1/resolution_A`` (resolution annealing);
        None: the particles' whole band (``lowpass_A``). The encoder's inputs keep the whole band."""
        if resolution_A is None:
            self.band = self._band_full
        else:
            self.band = self._band_full * (self._k2 <= 1.0 / float(resolution_A) ** 2)

    def _batch(self, idx):
        d = self.data
        idx_t = torch.as_tensor(idx)
        if self.ctf_all is not None:
            x, ctf = d.fourier(idx), self.ctf_all[d.local(idx)]
        else:
            x, ctf = d.fourier_ctf(idx)
        return (x.to(self.dev), d.rotmat[idx_t].to(self.dev), d.shift_A[idx_t].to(self.dev), ctf.to(self.dev))

    @torch.no_grad()
    def _compute(self, idx):
        x, R, sh, ctf = self._batch(idx)
        if self.enc_all is not None:
            enc = self.enc_all[self.data.local(idx)].to(self.dev)
        elif self.data.cache is not None and self.data.cache.has_encoder:
            enc = self.data.cache.encoder(self.data.local(idx)).to(self.dev)
        else:
            enc = self.encoder_inputs(x, R, sh, ctf)
        return x, R, sh, ctf, enc

    def batch(self, idx):
        """``(x, R, shift, ctf, encoder inputs)`` of particles ``idx`` (this process's own)."""
        if self._ready is not None and np.array_equal(self._ready[0], idx):
            return self._ready[1]
        return self._compute(idx)

    def prefetch(self, parts, depth: int = 1):
        """Iterate over ``parts`` (index arrays); inside the loop ``batch(part)`` returns the batch
        computed ahead by a background thread (streamed particles: read, cropped, CTF and encoder
        inputs), up to ``depth`` batches ahead. Particles in memory need no thread."""
        if self.data.resident or depth < 1:
            yield from parts
            return
        try:
            for idx, b in prefetched(self._compute, parts, depth):
                self._ready = (idx, b)
                yield idx
        finally:
            self._ready = None

    def project(self, g, R, sh, ctf):
        # orthonormal DFT of a box-px image drawn by `project` = P / (apix^3 * box)
        return project_fourier(g, R, sh, self.kx, self.ky) * ctf / (self.apix3 * self.data.box)

    def predict(self, g, R, sh, ctf):
        return self.project(g, R, sh, ctf) * torch.exp(self.vae.log_scale)

    def encode(self, enc):
        return self.vae.encode(enc[:, 0], enc[:, 1])

    @torch.no_grad()
    def encoder_means(self, rows, batch: int = 512) -> np.ndarray:
        """The encoder's posterior mean of the particles ``rows``: ``[len(rows), zdim]``."""
        rows = np.asarray(rows)
        zs = [self.encode(self.batch(rows[b0:b0 + batch])[4])[0].cpu() for b0 in range(0, len(rows), batch)]
        return torch.cat(zs).numpy() if zs else np.zeros((0, self.vae.zdim), np.float32)


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


class TrainStep(nn.Module):
    """One training batch as a module (so ``DistributedDataParallel`` can wrap it): per-image
    loss, data, KL and restraint terms for particles ``idx`` with latent noise ``eps``."""

    def __init__(self, vae: HeteroVAE, fw: "ForwardModel", pairs: dict, cfg: HeteroConfig, elastic_weight: float):
        super().__init__()
        self.vae = vae
        self._fw, self._pairs, self._cfg = fw, pairs, cfg
        self._w = {"bond": cfg.bond_weight, "sidechain": cfg.sidechain_weight, "clash": cfg.clash_weight,
                   "elastic": elastic_weight}

    def objective(self, batch, z):
        """Per image: data term and restraint terms of latent ``z`` for a ``fw.batch`` tuple."""
        fw = self._fw
        x, R, sh, ctf = batch[:4]
        g = self.vae.deformer(fw.base, z)
        p = fw.predict(self.vae.drawn(fw.base, z, g), R, sh, ctf)
        dterm = _data_term(x, p, fw.band, fw.data.noise_var, self._cfg.loss)
        terms = restraint_terms(g.centers, self._pairs)
        rterm = sum(self._w[k] * v for k, v in terms.items()) if terms else torch.zeros_like(dterm)
        return dterm, rterm, terms

    def forward(self, idx, eps, beta: float):
        fw = self._fw
        batch = fw.batch(idx)
        mu, logvar = fw.encode(batch[4])
        z = mu + eps * torch.exp(0.5 * logvar)
        dterm, rterm, terms = self.objective(batch, z)
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)
        return dterm + beta * kl + rterm, dterm, kl, terms


def polish_latents(step: TrainStep, rows, steps: int = 40, lr: float = 0.02, batch: int = 256) -> np.ndarray:
    """Per-particle latent polish after training: starting from the encoder's posterior mean,
    each particle's ``z`` is moved to the maximum of its own posterior under the trained decoder
    (data term + restraints + the standard normal prior ``|z|^2 / 2``; network frozen, Adam,
    ``steps`` steps, independent per particle). The amortised encoder averages over particles;
    the polish fits every image itself. ``rows``: the table rows this process holds or reads.
    Returns ``[len(rows), zdim]``."""
    vae, fw = step.vae, step._fw
    frozen = [(p, p.requires_grad) for p in vae.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    out = []
    try:
        rows = np.asarray(rows)
        for b0 in range(0, len(rows), batch):
            idx = rows[b0:b0 + batch]
            bt = fw.batch(idx)
            with torch.no_grad():
                z0, _ = fw.encode(bt[4])
            z = z0.clone().requires_grad_(True)
            opt = torch.optim.Adam([z], lr=lr)
            for _ in range(steps):
                dterm, rterm, _ = step.objective(bt, z)
                loss = (dterm + rterm + 0.5 * (z**2).sum(1)).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            out.append(z.detach().cpu())
    finally:
        for p, g in frozen:
            p.requires_grad_(g)
    return torch.cat(out).numpy()


@torch.no_grad()
def posterior_mean_latents(step: TrainStep, rows, candidates, batch: int = 256):
    """Per particle, the posterior mean of its latent over a set of candidate latents (the
    population's own, e.g. k-means centres of every particle's latent: an empirical prior):
    ``E[z | x] = sum_j w_j z_j`` with ``w_j`` proportional to the likelihood of the image under
    the decoded model of ``z_j`` (the training's data term, at the particle's pose and CTF, over
    the full band). Where one image cannot tell neighbouring states apart, the MAP latent (the
    polish) lands on one of them at random; the posterior mean weighs them, so particles are
    ordered along a path by what their images support (the Bayes estimate under squared error).
    Each candidate is decoded once. Returns ``(z [len(rows), D], effective number of
    candidates [len(rows)])``, the latter ``1 / sum_j w_j^2`` (1: one candidate explains the
    image; ``K``: the image tells none apart)."""
    vae, fw = step.vae, step._fw
    cand = torch.as_tensor(np.asarray(candidates), dtype=torch.float32, device=fw.dev)
    drawn = []
    for j in range(len(cand)):
        zj = cand[j:j + 1]
        drawn.append(vae.drawn(fw.base, zj, vae.deformer(fw.base, zj)))
    rows = np.asarray(rows)
    zs, eff = [], []
    for b0 in range(0, len(rows), batch):
        idx = rows[b0:b0 + batch]
        x, R, sh, ctf = fw.batch(idx)[:4]
        ll = torch.empty(len(idx), len(drawn), dtype=torch.float64, device=fw.dev)
        for j, g in enumerate(drawn):
            p = fw.predict(g, R, sh, ctf)
            ll[:, j] = -_data_term(x, p, fw.band, fw.data.noise_var, step._cfg.loss).double()
        w = torch.softmax(ll, 1)
        zs.append((w @ cand.double()).float().cpu())
        eff.append((1.0 / (w * w).sum(1)).float().cpu())
    if not zs:
        return np.zeros((0, cand.shape[1]), np.float32), np.zeros(0, np.float32)
    return torch.cat(zs).numpy(), torch.cat(eff).numpy()


def rank_loss(per: torch.Tensor, weight: float, n_all: int, w: int) -> torch.Tensor:
    """The loss whose gradient, averaged by DDP over ``w`` ranks, is the gradient of the mean of
    ``per`` over the whole global batch of ``n_all`` particles (one process: that mean)."""
    return per.mean() if w == 1 else per.sum() * (weight * w / n_all)


def build_vae(cfg: HeteroConfig, ref: Reference, data: ParticleData) -> HeteroVAE:
    deformer = make_deformer(cfg.decoder, n=ref.gaussians.n, zdim=cfg.zdim, residue_of=ref.residue_of,
                             chain_of_residue=ref.chain_of_residue, segments=cfg.segments, hidden=cfg.hidden,
                             temperature=cfg.temperature, per_chain=cfg.per_chain)
    atoms = reference_atoms(ref, data, cfg.resolution_A) if cfg.draw == "atoms" else None
    return HeteroVAE(data.crop, cfg.zdim, deformer, hidden=cfg.hidden, n_gaussians=ref.gaussians.n, atoms=atoms,
                     owner=ref.owner if atoms is not None else None)
