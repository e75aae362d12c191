"""Atomic models: topology and restraints from the monomer library, density on grids,
rotamers, validation, and the jobs refine-model and refine-series."""
