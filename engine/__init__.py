"""cryogmm: Gaussian-mixture methods for cryo-EM.

Importing ``cryogmm`` is cheap and does not import torch: the numerical modules
(``cryogmm.gmm``, ``cryogmm.project``, ...) import it themselves, and the bridge
(``cryogmm.bridge``) never does.
"""

__version__ = "0.1.0"
