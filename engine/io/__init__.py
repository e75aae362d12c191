"""Input and output: maps (MRC), atomic structures (gemmi), atomic writes and report.json,
plots. Above ``cryogmm.core``; below every job family."""
