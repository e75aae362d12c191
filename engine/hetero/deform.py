"""Deformers: one interface, ``deform(base, z) -> Gaussians``, for every way a latent
coordinate moves a Gaussian mixture.

A deformer is a ``torch.nn.Module`` mapping a base mixture (centres ``[N, 3]`` Å from the
box centre) and latent coordinates ``z [B, D]`` to a batch of mixtures whose centres are
``[B, N, 3]`` (amplitudes and widths unchanged). The same deformer moves the atoms of an
atomic model (:meth:`Deformer.move_points`), so a decoded conformation is written as a
full-atom model, not only as Gaussians. Heterogeneity training, model series and
conformation-to-orientation all use this interface.

- :class:`DisplacementDeformer` (e2gmm, atomic VAE of Zhong et al.): an MLP gives every
  Gaussian its own offset; atoms follow the offset of the Gaussian they belong to and, with
  one Gaussian per residue, turn with the local frame of that residue's chain.
- :class:`SegmentDeformer` (cryoSPHERE): a 1D Gaussian mixture over the residue index
  (means, widths, weights, a temperature) gives each residue a soft membership in ``K``
  segments; an MLP gives every segment a rotation (rotation vector, about the segment's
  centre of mass in the base) and a translation; a point moves by the membership-weighted
  blend of its segments' rigid motions. Per-chain segmentation keeps segments within one
  chain.

Pure functions (:func:`segment_membership`, :func:`blend_rigid`) carry the numerics;
modules only hold parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cryogmm.core.gaussians import Gaussians
from cryogmm.core.rotations import rotvec_to_rotmat


def mlp(n_in: int, n_out: int, hidden: int = 256, layers: int = 2, zero_last: bool = True) -> nn.Sequential:
    """``layers`` hidden ReLU layers of width ``hidden``; the last linear layer starts at zero
    (so a new deformer starts at the base model) when ``zero_last``."""
    mods, d = [], n_in
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    last = nn.Linear(d, n_out)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    mods.append(last)
    return nn.Sequential(*mods)


class Deformer(nn.Module):
    """Base class. Subclasses implement :meth:`forward` and :meth:`move_points`."""

    zdim: int

    def forward(self, base: Gaussians, z: torch.Tensor) -> Gaussians:  # pragma: no cover - interface
        raise NotImplementedError

    def deform(self, base: Gaussians, z: torch.Tensor) -> Gaussians:
        """``base`` (centres ``[N, 3]``) and ``z [B, D]`` -> mixtures with centres ``[B, N, 3]``."""
        return self(base, z)

    def move_points(self, base: Gaussians, z: torch.Tensor, points: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """Move other points (atoms) ``[M, 3]`` (Å, box frame) with the deformation at ``z [B, D]``;
        ``owner [M]`` is the index of the Gaussian each point belongs to. Returns ``[B, M, 3]``."""
        raise NotImplementedError  # pragma: no cover - interface


def frame_triples(residue_of, chain_of_residue) -> torch.Tensor | None:
    """``[N, 3]``: for one Gaussian per residue, the three consecutive Gaussians of the same
    chain whose centres give each Gaussian its local frame (``[n-1, n, n+1]``, shifted inward
    at a chain's ends; a Gaussian of a chain of fewer than three has ``[n, n, n]``: no frame).
    None when some residue has several Gaussians (``residue2``)."""
    res = torch.as_tensor(residue_of, dtype=torch.long)
    if res.numel() == 0 or len(torch.unique(res)) != len(res):
        return None
    chain = torch.as_tensor(chain_of_residue, dtype=torch.long)[res]
    n = len(res)
    idx = torch.arange(n)
    out = torch.stack([idx, idx, idx], 1)
    for c in torch.unique(chain):
        members = idx[chain == c]
        members = members[torch.argsort(res[members])]
        if len(members) < 3:
            continue
        mid = torch.arange(len(members)).clamp(1, len(members) - 2)
        out[members] = torch.stack([members[mid - 1], members[mid], members[mid + 1]], 1)
    return out


def local_frames(c: torch.Tensor, triples: torch.Tensor) -> torch.Tensor:
    """Orthonormal frames ``[..., N, 3, 3]`` (columns) from centres ``c [..., N, 3]``: the first
    axis along ``c[next] - c[prev]``, the second towards ``c[mid]`` from the midpoint of the two,
    the third their cross product (a chain's local backbone direction and bend)."""
    a, b, d = c[..., triples[:, 0], :], c[..., triples[:, 1], :], c[..., triples[:, 2], :]
    e1 = torch.nn.functional.normalize(d - a, dim=-1)
    u = b - 0.5 * (a + d)
    e2 = torch.nn.functional.normalize(u - (u * e1).sum(-1, keepdim=True) * e1, dim=-1)
    return torch.stack([e1, e2, torch.cross(e1, e2, dim=-1)], -1)


class DisplacementDeformer(Deformer):
    """Per-Gaussian offsets from an MLP: ``c_n(z) = c_n + scale_A * f_n(z)``.

    ``n``: number of Gaussians; ``scale_A`` sets the size of an offset per unit of network
    output (the last layer starts at zero, so training starts from the base). ``triples``
    (:func:`frame_triples`, one Gaussian per residue): atoms turn with their residue's local
    frame (from the moved centres of the residue and its chain neighbours) as well as follow
    its offset, so side chains keep their place on a backbone that bends or rotates; without
    it they only follow the offset.
    """

    def __init__(self, n: int, zdim: int, hidden: int = 256, layers: int = 2, scale_A: float = 1.0,
                 triples: torch.Tensor | None = None):
        super().__init__()
        self.n, self.zdim, self.scale_A = int(n), int(zdim), float(scale_A)
        self.net = mlp(zdim, 3 * self.n, hidden, layers)
        # not a buffer: derived from the reference, so checkpoints stay as they were
        self.triples = None if triples is None or not bool((triples != triples[:, :1]).any()) else triples

    def offsets(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, N, 3]`` offsets in Å."""
        return self.net(z).reshape(z.shape[0], self.n, 3) * self.scale_A

    def forward(self, base: Gaussians, z: torch.Tensor) -> Gaussians:
        return base.with_centers(base.centers + self.offsets(z))

    def move_points(self, base, z, points, owner):
        off = self.offsets(z)
        if self.triples is None:
            return points + off[:, owner]
        tri = self.triples.to(points.device)
        c0 = base.centers
        f0 = local_frames(c0, tri)  # [N, 3, 3]
        f1 = local_frames(c0 + off, tri)  # [B, N, 3, 3]
        rot = f1 @ f0.transpose(-1, -2)  # [B, N, 3, 3]: the frame's turn
        rel = points - c0[owner]  # [M, 3]
        return c0[owner] + off[:, owner] + torch.einsum("bmij,mj->bmi", rot[:, owner], rel)


def segment_membership(t: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor, logit_w: torch.Tensor,
                       temperature: float | torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Soft membership of residues in segments: ``[R, K]``, rows summing to one.

    ``t [R]``: residue positions along the chain (0..1); ``mu``, ``log_sigma``, ``logit_w``
    ``[K]``: the 1D mixture over residue position; ``temperature``: sharper for smaller
    values (cryoSPHERE's annealed softmax); ``allowed [R, K]`` (bool): memberships that may
    be non-zero (per-chain segmentation).
    """
    s = torch.exp(log_sigma)
    logp = torch.log_softmax(logit_w, 0) - 0.5 * ((t[:, None] - mu) / s) ** 2 - log_sigma
    if allowed is not None:
        logp = logp.masked_fill(~allowed, -1e4)
    return torch.softmax(logp / temperature, dim=1)


def blend_rigid(points: torch.Tensor, member: torch.Tensor, rotvec: torch.Tensor, trans: torch.Tensor,
                pivots: torch.Tensor) -> torch.Tensor:
    """Move ``points [M, 3]`` by the membership-weighted blend of ``K`` rigid motions.

    ``member [M, K]``; ``rotvec``, ``trans`` ``[B, K, 3]`` (radians, Å); ``pivots [K, 3]``:
    each segment rotates about its pivot: ``x -> R_k (x - p_k) + p_k + t_k``. Returns ``[B, M, 3]``.
    """
    R = rotvec_to_rotmat(rotvec)  # [B, K, 3, 3]
    rel = points[None, :, None, :] - pivots[None, None]  # [1, M, K, 3]
    moved = torch.einsum("bkij,bmkj->bmki", R, rel.expand(R.shape[0], -1, -1, -1))
    moved = moved + pivots[None, None] + trans[:, None]
    return (member[None, :, :, None] * moved).sum(2)


class SegmentDeformer(Deformer):
    """Learned segments moved as rigid bodies (cryoSPHERE).

    ``residue_of [N]``: residue number (0-based, chain order) of each Gaussian;
    ``chain_of_residue [R]``: chain number of each residue (for ``per_chain``);
    ``segments``: K; ``temperature``: softmax temperature of the membership;
    ``rot_scale`` (radians) and ``trans_scale_A`` scale the network's outputs.
    """

    def __init__(self, residue_of, chain_of_residue, segments: int, zdim: int, hidden: int = 256, layers: int = 2,
                 temperature: float = 0.1, per_chain: bool = False, rot_scale: float = 0.1,
                 trans_scale_A: float = 1.0):
        super().__init__()
        residue_of = torch.as_tensor(residue_of, dtype=torch.long)
        chain = torch.as_tensor(chain_of_residue, dtype=torch.long)
        R, K = int(chain.numel()), int(segments)
        self.zdim, self.K, self.temperature = int(zdim), K, float(temperature)
        self.rot_scale, self.trans_scale_A = float(rot_scale), float(trans_scale_A)
        self.register_buffer("residue_of", residue_of)
        # residue positions in 0..1; per chain each chain spans its own 0..1 and gets its
        # share of the segments
        t = torch.zeros(R, dtype=torch.float32)
        mu = torch.zeros(K)
        allowed = torch.ones(R, K, dtype=torch.bool)
        chains = torch.unique(chain)
        if per_chain and len(chains) > 1:
            if K < len(chains):
                raise ValueError(f"{K} segments for {len(chains)} chains: need at least one per chain")
            share = [K // len(chains) + (1 if i < K % len(chains) else 0) for i in range(len(chains))]
            k0 = 0
            allowed[:] = False
            for c, kc in zip(chains.tolist(), share):
                rows = torch.nonzero(chain == c).squeeze(1)
                t[rows] = torch.linspace(0, 1, len(rows)) if len(rows) > 1 else torch.zeros(1)
                mu[k0:k0 + kc] = (torch.arange(kc) + 0.5) / kc
                allowed[rows, k0:k0 + kc] = True
                k0 += kc
            width = 1.0 / max(share)
        else:
            t = torch.linspace(0, 1, R) if R > 1 else torch.zeros(1)
            mu = (torch.arange(K) + 0.5) / K
            width = 1.0 / K
        self.register_buffer("t", t)
        self.register_buffer("allowed", allowed)
        self.per_chain = bool(per_chain and len(chains) > 1)
        self.mu = nn.Parameter(mu.clone())
        self.log_sigma = nn.Parameter(torch.full((K,), math.log(0.5 * width)))
        self.logit_w = nn.Parameter(torch.zeros(K))
        self.net = mlp(zdim, 6 * K, hidden, layers)

    def residue_membership(self) -> torch.Tensor:
        """``[R, K]`` soft membership of each residue."""
        return segment_membership(self.t.to(self.mu.dtype), self.mu, self.log_sigma, self.logit_w,
                                  self.temperature, self.allowed if self.per_chain else None)

    def membership(self) -> torch.Tensor:
        """``[N, K]`` membership of each Gaussian (that of its residue)."""
        return self.residue_membership()[self.residue_of]

    def pivots(self, base: Gaussians, member: torch.Tensor) -> torch.Tensor:
        """Segment centres ``[K, 3]``: membership- and mass-weighted mean of the base centres."""
        w = member * base.amplitudes[:, None]
        return (w.T @ base.centers) / w.sum(0)[:, None].clamp_min(1e-12)

    def motions(self, z: torch.Tensor):
        """Rotation vectors (radians) and translations (Å) ``[B, K, 3]`` at ``z``."""
        out = self.net(z).reshape(z.shape[0], self.K, 6)
        return out[..., :3] * self.rot_scale, out[..., 3:] * self.trans_scale_A

    def forward(self, base: Gaussians, z: torch.Tensor) -> Gaussians:
        m = self.membership()
        rv, tr = self.motions(z)
        return base.with_centers(blend_rigid(base.centers, m, rv, tr, self.pivots(base, m)))

    def move_points(self, base, z, points, owner):
        m = self.membership()
        rv, tr = self.motions(z)
        return blend_rigid(points, m[owner], rv, tr, self.pivots(base, m))

    def hard_segments(self) -> torch.Tensor:
        """``[R]`` most likely segment of every residue."""
        return self.residue_membership().argmax(1)


def make_deformer(kind: str, *, n: int, zdim: int, residue_of=None, chain_of_residue=None, segments: int = 20,
                  hidden: int = 256, layers: int = 2, temperature: float = 0.1, per_chain: bool = False,
                  scale_A: float = 1.0) -> Deformer:
    """``kind``: ``displacement`` or ``segments`` (see the classes)."""
    if kind == "displacement":
        triples = None if residue_of is None or chain_of_residue is None else frame_triples(residue_of, chain_of_residue)
        return DisplacementDeformer(n, zdim, hidden, layers, scale_A=scale_A, triples=triples)
    if kind == "segments":
        return SegmentDeformer(residue_of, chain_of_residue, segments, zdim, hidden, layers, temperature=temperature,
                               per_chain=per_chain, trans_scale_A=scale_A)
    raise ValueError(f"unknown deformer {kind!r}; expected displacement or segments")
