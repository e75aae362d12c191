"""Simulated data with known truth: particle sets (``cryogmm simulate``) and maps."""
