"""The command-line jobs of the bridge: convert, subset and info (STAR and .cs, never torch)."""
