# -*- coding: utf-8 -*-
"""
@article{Chen2024,
title = {Improving resolution and resolvability of single-particle cryoEM structures using Gaussian mixture models},
author = {Chen, Muyuan and Schmid, Michael F. and Chiu, Wah},
journal = {Nature Methods},
volume = {21},
pages = {37--40},
year = {2024},
doi = {10.1038/s41592-023-02082-9}
}

@article{Chen2021,
title = {Deep learning-based mixed-dimensional Gaussian mixture model for characterizing variability in cryo-EM},
author = {Chen, Muyuan and Ludtke, Steven J.},
journal = {Nature Methods},
volume = {18},
pages = {930--936},
year = {2021},
doi = {10.1038/s41592-021-01220-5}
}

@article{Scheres2012,
title = {RELION: implementation of a Bayesian approach to cryo-EM structure determination},
author = {Scheres, Sjors H. W.},
journal = {Journal of Structural Biology},
volume = {180},
pages = {519--530},
year = {2012},
doi = {10.1016/j.jsb.2012.09.006}
}
"""
