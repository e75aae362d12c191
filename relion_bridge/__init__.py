"""cryogmm.bridge: RELION STAR and cryoSPARC .cs in and out, and every convention.

Pure numpy/pandas: importing the bridge never imports torch.
"""
