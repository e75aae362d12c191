from .protocol_refine_poses import CryoGmmProtRefinePoses
from .protocol_reconstruct import CryoGmmProtReconstruct
from .protocol_simulate import CryoGmmProtSimulate
from .protocol_fit_gmm import CryoGmmProtFitGmm

__all__ = ["CryoGmmProtRefinePoses", "CryoGmmProtReconstruct", "CryoGmmProtSimulate",
           "CryoGmmProtFitGmm"]
