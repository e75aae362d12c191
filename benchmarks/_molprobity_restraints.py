"""Run by the MolProbity judge's own Python (``$MOLP/venv/bin/python``, cctbx): every bond and
angle restraint of a model with its target, sigma and model value, as JSON lines on stdout.
Used by ``restraints_vs_molprobity.py``; not part of cryogmm (cctbx is not our dependency).

    $MOLP/venv/bin/python _molprobity_restraints.py MODEL.pdb MOLP_DIR [--cdl]

``--cdl``: with cctbx's conformation-dependent library for the protein backbone (Phenix's and
phenix.molprobity's default; the judge itself runs without it).
"""
import contextlib
import io
import json
import os
import sys
import tempfile

import iotbx.pdb  # noqa: F401  (cctbx before gemmi, as the judge's validate.py does)
import mmtbx.model
from mmtbx.validation import restraints


def main():
    model_path, molp = sys.argv[1], sys.argv[2]
    cdl = "--cdl" in sys.argv[3:]
    sys.path.insert(0, molp)
    import validate as judge  # the judge's own preparation (names, elements, no H)

    with tempfile.TemporaryDirectory() as tmp:
        prep = os.path.join(tmp, "prep.pdb")
        judge.prepare(model_path, prep)
        model = mmtbx.model.manager(model_input=iotbx.pdb.input(file_name=prep))
        p = mmtbx.model.manager.get_default_pdb_interpretation_params()
        p.pdb_interpretation.restraints_library.cdl = cdl  # False as the judge
        with contextlib.redirect_stdout(io.StringIO()):
            model.process(make_restraints=True, pdb_interpretation_params=p)
        grm = model.get_restraints_manager().geometry
        r = restraints.combined(pdb_hierarchy=model.get_hierarchy(), xray_structure=model.get_xray_structure(),
                                geometry_restraints_manager=grm, ignore_hd=True, sigma_cutoff=0.0,
                                outliers_only=False)
    for kind in ("bonds", "angles"):
        for x in getattr(r, kind).results:
            print(json.dumps({"kind": kind[:-1], "atoms": [a.name.strip() for a in x.atoms_info],
                              "resseq": [int(a.resseq) for a in x.atoms_info],
                              "chain": [a.chain_id.strip() for a in x.atoms_info],
                              "resname": [a.resname.strip() for a in x.atoms_info],
                              "target": x.target, "sigma": x.sigma, "model": x.model}))


if __name__ == "__main__":
    main()
