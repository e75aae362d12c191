"""Direct Fourier reconstruction with CTF: the accumulator (kernel) and the ``reconstruct`` job."""
