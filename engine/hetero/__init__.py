"""Heterogeneity: per-particle conformations of an atomic model (learned rigid segments or
per-Gaussian displacement) trained as a VAE on particle images; analysis and decoding."""
