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

@article{Zhong2021,
title = {{CryoDRGN}: reconstruction of heterogeneous cryo-{EM} structures using neural networks},
author = {Zhong, Ellen D. and Bepler, Tristan and Berger, Bonnie and Davis, Joseph H.},
journal = {Nature Methods},
volume = {18},
pages = {176--185},
year = {2021},
doi = {10.1038/s41592-020-01049-4}
}

@article{Zhong2021atomic,
title = {Exploring generative atomic models in cryo-{EM} reconstruction},
author = {Zhong, Ellen D. and Lerer, Adam and Davis, Joseph H. and Berger, Bonnie},
journal = {arXiv preprint arXiv:2107.01331},
year = {2021},
url = {https://arxiv.org/abs/2107.01331}
}

@article{Ducrocq2025,
title = {{cryoSPHERE}: Single-particle heterogeneous reconstruction from cryo {EM}},
author = {Ducrocq, Gabriel and Grunewald, Lukas and Westenhoff, Sebastian and Lindsten, Fredrik},
journal = {International Conference on Learning Representations (ICLR 2025); arXiv:2407.01574},
year = {2025},
url = {https://arxiv.org/abs/2407.01574}
}

@article{Chen2022model,
title = {Integrating molecular models into {CryoEM} heterogeneity analysis using scalable high-resolution deep {Gaussian} mixture models},
author = {Chen, Muyuan and Toader, Bogdan and Lederman, Roy},
journal = {arXiv preprint arXiv:2211.10518},
year = {2022},
url = {https://arxiv.org/abs/2211.10518}
}

@article{Blau2023,
title = {Gentle and fast all-atom model refinement to cryo-{EM} densities via a maximum likelihood approach},
author = {Blau, Christian and Yvonnesdotter, Linnea and Lindahl, Erik},
journal = {PLoS Computational Biology},
year = {2023},
doi = {10.1371/journal.pcbi.1011255}
}
"""
