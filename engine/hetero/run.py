"""A trained heterogeneity run read back (config, network, latents) and decoding latent
coordinates into atomic models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cryogmm.errors import InputError
from cryogmm.hetero.config import CHECKPOINT, LATENTS, POSTERIOR, HeteroConfig
from cryogmm.hetero.data import load_particles
from cryogmm.hetero.deform import make_deformer
from cryogmm.hetero.reference import load_reference
from cryogmm.hetero.train import load_checkpoint
from cryogmm.hetero.vae import ForwardModel, HeteroVAE, load_vae_state
from cryogmm.io.structures import write_models


# --------------------------------------------------------------------------- loading a run
class Run:
    """A trained run: config, reference, VAE (eval mode) and, on demand, the particles."""

    def __init__(self, run_dir, device=None, need_data: bool = True, star=None, project_dir=None):
        self.dir = Path(run_dir)
        state = load_checkpoint(self.dir / CHECKPOINT)
        cfgd = json.loads(state["config"])
        meta = json.loads(state["meta"])
        for k in ("star", "model", "out", "map", "project_dir", "cache_dir"):
            cfgd[k] = Path(cfgd[k]) if cfgd.get(k) else None
        self.cfg = HeteroConfig(**cfgd)
        self.trained_particles = star is None or (self.cfg.star is not None
                                                  and Path(star).resolve() == self.cfg.star.resolve())
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
        self.vae = HeteroVAE(meta["crop"], self.cfg.zdim, deformer, hidden=self.cfg.hidden,
                             n_gaussians=self.ref.gaussians.n)
        load_vae_state(self.vae, state["model"])
        self.vae.to(self.dev).eval()
        self.data = None
        self._fw = None
        if need_data:
            self.data = load_particles(self.cfg.star, lowpass_A=self.cfg.lowpass_A, project_dir=self.cfg.project_dir,
                                       max_particles=self.cfg.max_particles, load=self.cfg.load,
                                       max_memory_gb=self.cfg.max_memory_gb,
                                       # a cache the run kept (--cache-dir): streamed particles read from it
                                       cache_dir=self.cfg.cache_dir if self.cfg.cache and self.cfg.cache_dir is not None
                                       and self.cfg.cache_dir.is_dir() else None,
                                       cache_option="the run's --cache-dir")
            if self.data.crop != meta["crop"]:
                raise InputError(self.cfg.star, f"particles crop to {self.data.crop} px but the run used "
                                 f"{meta['crop']} px: not the particles this run was trained on")

    def forward_model(self) -> ForwardModel:
        """The run's forward model on its particles (built once)."""
        if getattr(self, "_fw", None) is None:
            self._fw = ForwardModel(self.vae, self.ref, self.data, self.dev)
        return self._fw

    @torch.no_grad()
    def encode_all(self, batch: int = 512, polished: bool = True) -> np.ndarray:
        """Every particle's latent, when these are the particles the run was trained on: the
        posterior-mean latents training wrote (``latents_posterior.npy``,
        ``posterior_candidates`` > 0), else its polished latents (``latents_polished.npy``,
        ``polish_steps`` > 0); otherwise (or with ``polished=False``) the encoder's mean."""
        for name in (POSTERIOR, LATENTS):
            lat = self.dir / name
            if polished and self.trained_particles and lat.is_file():
                z = np.load(lat)
                if z.shape == (self.data.n, self.cfg.zdim):
                    self.latent_source = name
                    return z.astype(np.float32)
        self.latent_source = "encoder mean"
        return self.forward_model().encoder_means(np.arange(self.data.n), batch)

    @torch.no_grad()
    def fit_scores(self, z, batch: int = 512) -> dict:
        """Per particle, how its image ``x`` agrees with its decoded model ``p`` (at latent row
        ``z[i]``, projected at its pose with its CTF and the run's scale), over the training band
        with the run's white-noise variance ``sigma^2``; arrays keyed:

        - ``gain``: the log-likelihood gain over an empty image, ``(|x|^2 - |x - p|^2) / (2
          sigma^2)`` nats. A particle of the molecule scores about its signal energy; noise,
          ice or another molecule about zero or below.
        - ``t``: the standardised gain, ``(<x, p> - |p|^2) / (sigma |p|)``: the residual's
          component along the model, in noise SDs; about N(0, 1) for a particle of the molecule
          whatever its signal energy (orientation, defocus), negative where the image holds
          less of the model than a particle would (another molecule, noise).
        - ``residual``: ``|x - p|^2 / sigma^2``, the residual's energy in noise units (a
          chi-square over the band for a particle of the molecule); larger where the image holds
          signal the model does not explain (another molecule). The part along ``p`` and the
          rest are the two independent halves of one likelihood-ratio test; ``analyze`` combines
          their robust z-scores (:func:`cryogmm.hetero.landscape.fit_z`)."""
        fw = self.forward_model()
        z = torch.as_tensor(np.asarray(z), dtype=torch.float32)
        s2 = float(self.data.noise_var)
        out = {"gain": [], "t": [], "residual": []}
        for b0 in range(0, self.data.n, batch):
            idx = np.arange(b0, min(b0 + batch, self.data.n))
            x, R, sh, ctf, _ = fw.batch(idx)
            zz = z[idx].to(self.dev)
            g = self.vae.drawn(fw.base, zz, self.vae.deformer(fw.base, zz))
            p = fw.predict(g, R, sh, ctf)
            pp = (fw.band * p.abs() ** 2).sum((-2, -1)).double()
            xp = (fw.band * (x * p.conj()).real).sum((-2, -1)).double()
            rr = (fw.band * (x - p).abs() ** 2).sum((-2, -1)).double()
            out["gain"].append(((2.0 * xp - pp) / (2.0 * s2)).cpu())
            out["t"].append(((xp - pp) / torch.sqrt(s2 * pp.clamp_min(1e-30))).cpu())
            out["residual"].append((rr / s2).cpu())
        return {k: torch.cat(v).numpy() for k, v in out.items()}

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

    run = Run(run_dir, device=device, need_data=False)
    z = _read_z(z_path, run.cfg.zdim)
    models = run.decode_atoms(z)
    write_models(out_pdb, run.ref.model, models)
    return {"models": len(models), "out": str(out_pdb)}
