from .protocol_refine_poses import CryoGmmProtRefinePoses
from .protocol_reconstruct import CryoGmmProtReconstruct
from .protocol_simulate import CryoGmmProtSimulate
from .protocol_fit_gmm import CryoGmmProtFitGmm
from .protocol_hetero import CryoGmmProtHetero
from .protocol_refine_model import CryoGmmProtRefineModel
from .protocol_model_series import CryoGmmProtModelSeries

__all__ = ["CryoGmmProtRefinePoses", "CryoGmmProtReconstruct", "CryoGmmProtSimulate",
           "CryoGmmProtFitGmm", "CryoGmmProtHetero", "CryoGmmProtRefineModel",
           "CryoGmmProtModelSeries"]
