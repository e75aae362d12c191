"""ChimeraX `cryogmm fit` far from the map (issue 17 doors): closed adenylate kinase (1AKE) into a 4 Å
map of the open one (4AKE) simulated in ChimeraX, with the default motion (auto -> motion domains)
or the given fit options. Runs in the bundle's headless ChimeraX venv:

  cd chimerax_bundle/tests && ../.venv-chimerax/bin/python ../../benchmarks/chimerax_fit_far.py [motion local]

Prints one JSON line: Cα RMSD to 4AKE before and after, seconds, the motion used."""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chimerax_bundle" / "tests"))
import numpy as np
import cxharness
from chimerax.core.commands import run
s = cxharness.start_session()
DATA = Path(__file__).resolve().parents[1] / "engine" / "data"
closed, opn = DATA / "adk_closed.pdb", DATA / "adk_open.pdb"
m1 = run(s, f"open {closed}")[0]
m2 = run(s, f"open {opn}")[0]
v = run(s, "cryogmm simulate #2 resolution 4 noise 0.1")
run(s, "close #2")
ca1 = m1.atoms.names == "CA"
truth = {}
import gemmi
for c in gemmi.read_structure(str(opn))[0].all():
    if c.atom.name == "CA":
        truth[(c.residue.seqid.num)] = np.array(c.atom.pos.tolist())
def rmsd():
    xyz = m1.atoms.scene_coords[ca1]; nums = m1.atoms.residues.numbers[ca1]
    return float(np.sqrt(np.mean([((xyz[k] - truth[n]) ** 2).sum() for k, n in enumerate(nums) if n in truth])))
r0 = rmsd(); t0 = time.time()
job = run(s, f"cryogmm fit #1 #3 resolution 4 {' '.join(sys.argv[1:])}")
print(json.dumps({"args": sys.argv[1:], "ca_rmsd_before": r0, "ca_rmsd_after": rmsd(), "seconds": time.time() - t0,
                  "motion": job.result.motion if job.result else None, "error": repr(job.error)}))
