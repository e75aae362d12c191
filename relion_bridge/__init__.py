"""cryogmm.bridge: RELION STAR and cryoSPARC .cs in and out, and every convention.

Pure numpy/pandas: importing the bridge never imports torch.

- :mod:`~cryogmm.bridge.conventions`: every sign and unit (Euler, rotvec, origins).
- :mod:`~cryogmm.bridge.table`: :class:`ParticleTable`, the canonical per-particle table.
- :mod:`~cryogmm.bridge.io`: ``read_particles(path)`` / ``write_particles(table, path)``.
- :mod:`~cryogmm.bridge.images`: :class:`ImageSource`, particle stacks read lazily (positioned reads, background prefetch).
- :mod:`~cryogmm.bridge.results`: merge results into the user's file; subsets.
- :mod:`~cryogmm.bridge.star`, :mod:`~cryogmm.bridge.csfile`: the two file formats.
- :mod:`~cryogmm.bridge.fileio`: atomic writes.
"""
