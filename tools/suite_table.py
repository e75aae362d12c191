"""Maintainer script (outside the package): build ``cryogmm/data/rna_suites.json``, the RNA
backbone suite clusters of Richardson et al. (2008) RNA 14:465-481 as the suitename program
distributes them (version 070328 cluster half-widths), for ``cryogmm.model.suites``.

Run once by a maintainer, in a Python that has cctbx's mmtbx (e.g. the MolProbity judge's
venv: ``../shared/tools/molprobity``), not at run time::

    python tools/suite_table.py engine/data/rna_suites.json

The table holds numbers only (cluster names, dominance, the seven mean angles, widths, the
triage ranges); suitename is Apache-2.0 (Richardson lab); the notice travels inside the JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def build(out: Path) -> None:
    from mmtbx.suitename import suitename as sn
    from mmtbx.suitename import suiteninit as si

    bins = {}
    for key, bin_ in si.buildTheBins().items():
        if not isinstance(key, tuple):
            continue
        rows = []
        for c in bin_.cluster[1:]:
            rows.append({"name": c.name, "status": c.status, "dominance": c.dominance,
                         "angles": [float(a) for a in c.angle[1:8]]})
        bins[f"{key[0]}{key[1]}{key[2]}"] = rows
    sats = {}
    for name, sat_w, dom_w in si.satelliteData:
        sats[name] = {"sat_widths": [float(v) for v in sat_w[1:8]], "dom_widths": [float(v) for v in dom_w[1:8]]}
    table = {
        "source": "suitename (mmtbx.suitename, Richardson lab), cluster half-widths version "
                  f"{si.clusterhalfwidthsversion}; Richardson et al. (2008) RNA 14:465-481",
        "licence": "Apache-2.0 (suitename, Richardson lab, Duke University); numbers only, reformatted",
        "angle_order": ["delta-1", "epsilon-1", "zeta-1", "alpha", "beta", "gamma", "delta"],
        "widths": [float(v) for v in si.normalWidths[1:8]],
        "power": float(sn.power),
        "triage": {"epsilon": [sn.epsilonmin, sn.epsilonmax], "alpha": [sn.alphamin, sn.alphamax],
                   "beta": [sn.betamin, sn.betamax], "zeta": [sn.zetamin, sn.zetamax],
                   "delta3": [sn.delta3min, sn.delta3max], "delta2": [sn.delta2min, sn.delta2max],
                   "gamma_p": [sn.gammapmin, sn.gammapmax], "gamma_t": [sn.gammatmin, sn.gammatmax],
                   "gamma_m": [sn.gammammin, sn.gammammax]},
        "bins": bins,
        "satellites": sats,
    }
    out.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    build(Path(sys.argv[1]))
