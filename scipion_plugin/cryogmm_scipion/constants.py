"""Names shared by the plugin's modules (variables, versions, output names)."""

# Shell command that makes the engine's `cryogmm` the first on PATH, e.g.
# ". /opt/cryogmm/venv/bin/activate" or "conda activate cryogmm". Empty: `cryogmm` is
# already on PATH.
CRYOGMM_ENV_ACTIVATION = "CRYOGMM_ENV_ACTIVATION"
# What `scipion installb cryogmm` gives to pip (a path, a wheel or a VCS URL).
CRYOGMM_PIP_SPEC = "CRYOGMM_PIP_SPEC"
# Extra pip arguments for torch, e.g. "--index-url https://download.pytorch.org/whl/cu121".
CRYOGMM_TORCH_SPEC = "CRYOGMM_TORCH_SPEC"

CRYOGMM_VERSION = "0.1.0"
CRYOGMM_ENV_DIR = "cryogmm-%s" % CRYOGMM_VERSION

# Per-particle attributes the protocols add to their output particles.
ATTR_FRC = "_cryogmm_frc"
ATTR_HALF = "_rlnRandomSubset"
ATTR_ORIG_ID = "_cryogmm_inputId"  # symmetry-expanded copies: the input particle's id
ATTR_CLUSTER = "_cryogmmCluster"  # heterogeneity: the particle's k-means cluster in z
FLEX_PROGRAM = "cryogmm"  # FlexInfo program name of the heterogeneity outputs
