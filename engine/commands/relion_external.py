"""Run a cryogmm job as a RELION External job (RELION 3.1+), inside RELION's own pipeline.

  cryogmm relion refine-poses|reconstruct|hetero|refine-model --o External/jobNNN/ [RELION's arguments]

or, in the GUI's "External executable" field, one of the console scripts
cryogmm-relion-refine-poses, cryogmm-relion-reconstruct, cryogmm-relion-hetero,
cryogmm-relion-refine-model. RELION's pipeliner calls the program from the project folder
with --o External/jobNNN/, the input nodes (--in_parts, --in_3dref, --in_mask; --in_mics,
--in_movies, --in_coords are refused: no job here takes them), --j THREADS and every
parameter as --<label> <value>. A label is any option of the cryogmm job (`cryogmm
refine-poses --help`), with _ or -: --iterations 3, --low_res_A 20, --sym C2. A flag
takes an empty value (or yes/true/1; no/false/0 leaves it off).

  refine-poses   --in_parts (required) --in_3dref (-> --map) --in_mask (-> --mask)
                 writes refined.star (particles), map.mrc (3D reference), half1.mrc and
                 half2.mrc (half map), composite.mrc with --patches (3D reference)
  reconstruct    --in_parts (required); writes map.mrc (3D reference), half1.mrc/half2.mrc (half map)
  hetero         --in_parts (required) --in_3dref (-> --map) and --model M.pdb; train, then
                 analyze into analyze/: particles_latent.star and cluster_K.star (particles)
  refine-model   --in_3dref (required, -> --map) and --model M.pdb; writes refined.pdb and
                 refined.cif (RELION 3.1 has no node type for atomic models: not listed)

Everything is written into the job folder: the job's own outputs, RELION_OUTPUT_NODES.star
(the outputs with RELION 3.1's node types, which the pipeliner adds to default_pipeline.star)
and RELION_JOB_EXIT_SUCCESS, or RELION_JOB_EXIT_FAILURE with the reason as a line in run.err.
Progress goes to run.out. --j sets the torch (OpenMP) threads. Bad input (no --o, an input
node of the wrong type, a parameter no option matches) is refused before any work: one line
in run.err, RELION_JOB_EXIT_FAILURE, exit code 2, nothing else written.

Example (from a RELION project folder):
  cryogmm relion refine-poses --o External/job012/ --in_parts Extract/job005/particles.star \\
      --in_mask MaskCreate/job011/mask.mrc --iterations 3 --j 4
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from cryogmm.bridge.pipeline import (
    NODE_NAMES,
    NODE_TYPES,
    clear_exit,
    mark_exit,
    pipeline_node_types,
    write_output_nodes,
)
from cryogmm.errors import CryoGMMError

# RELION 3.1's External job: input flag -> what it is (pipeline_jobs.cpp, getCommandsExternalJob)
RELION_INPUTS = {"--in_movies": "movies", "--in_mics": "micrographs", "--in_parts": "particles",
                 "--in_coords": "coordinates", "--in_3dref": "3D reference", "--in_mask": "3D mask"}
# node types each input may have in default_pipeline.star, and the file suffixes it may have
ACCEPTED_TYPES = {"--in_parts": {NODE_TYPES["particles"]},
                  "--in_3dref": {NODE_TYPES["3d_reference"], NODE_TYPES["half_map"], NODE_TYPES["final_map"]},
                  "--in_mask": {NODE_TYPES["mask"]}}
SUFFIXES = {"--in_parts": (".star", ".cs"), "--in_3dref": (".mrc", ".map"), "--in_mask": (".mrc", ".map")}
FALSE_WORDS, TRUE_WORDS = ("no", "false", "0", "off"), ("", "yes", "true", "1", "on")


@dataclass(frozen=True)
class Family:
    """One job family: its engine stages, how RELION's inputs map onto them, its outputs."""

    stages: tuple  # ((command module, argv prefix), ...), run in order
    inputs: dict  # RELION input flag -> our option ("" = the first stage's positional)
    required: tuple = ()
    param_positional: dict = field(default_factory=dict)  # --label given as a parameter -> first positional
    outputs: tuple = ()  # (file name or glob in the job folder, NODE_TYPES key)


FAMILIES = {
    "refine-poses": Family(
        stages=(("cryogmm.commands.refine_poses", ()),),
        inputs={"--in_parts": "", "--in_3dref": "--map", "--in_mask": "--mask"}, required=("--in_parts",),
        outputs=(("refined.star", "particles"), ("map.mrc", "3d_reference"), ("half1.mrc", "half_map"),
                 ("composite.mrc", "3d_reference"))),
    "reconstruct": Family(
        stages=(("cryogmm.commands.reconstruct", ()),),
        inputs={"--in_parts": ""}, required=("--in_parts",),
        outputs=(("map.mrc", "3d_reference"), ("half1.mrc", "half_map"))),
    "hetero": Family(
        stages=(("cryogmm.commands.hetero", ("train",)), ("cryogmm.commands.hetero", ("analyze",))),
        inputs={"--in_parts": "", "--in_3dref": "--map"}, required=("--in_parts",),
        outputs=(("analyze/particles_latent.star", "particles"), ("analyze/cluster_*.star", "particles"))),
    "refine-model": Family(
        stages=(("cryogmm.commands.refine_model", ()),),
        inputs={"--in_3dref": "--map"}, required=("--in_3dref",), param_positional={"--model": 0}),
}
# what the wrapper sets itself: never a RELION parameter
RESERVED = ("--out", "--project-dir", "--force", "--map", "--mask", "--resume", "--star", "--half-maps")


class RaisingParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message):
        raise CryoGMMError(" ".join(str(message).split()))


def add_args(p):
    p.add_argument("family", choices=sorted(FAMILIES), help="the cryogmm job to run")
    p.add_argument("relion_args", nargs=argparse.REMAINDER,
                   help="RELION's arguments: --o JOBDIR --in_parts ... --j N --<label> <value> ...")


def main(args) -> int:
    return run_external(args.family, args.relion_args)


def split_relion_args(argv) -> tuple[dict, list]:
    """RELION's own arguments ({flag: value}) and the ``--label value`` parameters (a list)."""
    own, params, i = {}, [], 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            raise CryoGMMError(f"unexpected argument {tok!r}: RELION passes --<label> <value> pairs")
        vals = []
        while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            vals.append(argv[i + 1])
            i += 1
        i += 1
        if tok in ("--o", "--j", "--pipeline_control") or tok in RELION_INPUTS:
            if len(vals) != 1:
                raise CryoGMMError(f"{tok} takes one value, got {len(vals)}")
            own[tok] = vals[0]
        else:
            params.append((tok, vals))
    return own, params


def _stage_parser(modname: str, prefix) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The whole parser of a command, and the (sub)parser that ``prefix`` selects."""
    top = RaisingParser(prog=f"cryogmm {modname.rsplit('.', 1)[-1].replace('_', '-')}")
    importlib.import_module(modname).add_args(top)
    p = top
    for word in prefix:
        sub = next(a for a in p._actions if isinstance(getattr(a, "choices", None), dict))
        p = sub.choices[word]
    return top, p


def _options(parser) -> dict:
    """``{option string: takes a value}`` of a parser."""
    return {s: a.nargs != 0 for a in parser._actions for s in a.option_strings}


def _option_for(label: str, opts: dict) -> str | None:
    for cand in (label, "--" + label[2:].replace("_", "-")):
        if cand in opts:
            return cand
    return None


def build_stage_argvs(name: str, family: Family, own: dict, params: list, job_dir: Path) -> list:
    """``[(module, parsed args), ...]`` for every stage, or a :class:`CryoGMMError` for bad input."""
    for flag in own:
        if flag in RELION_INPUTS and flag not in family.inputs:
            raise CryoGMMError(f"{name} takes no {flag} ({RELION_INPUTS[flag]}); it takes "
                               + ", ".join(family.inputs))
    for flag in family.required:
        if flag not in own:
            raise CryoGMMError(f"{name} needs {flag} ({RELION_INPUTS[flag]})")
    known = pipeline_node_types("default_pipeline.star")
    for flag in family.inputs:
        if flag not in own:
            continue
        path = own[flag]
        if not path.lower().endswith(SUFFIXES[flag]):
            raise CryoGMMError(f"{flag} {path}: expected a {RELION_INPUTS[flag]} ({' or '.join(SUFFIXES[flag])} file)")
        t = known.get(path)
        if t is not None and t not in ACCEPTED_TYPES[flag]:
            want = " or ".join(f"{NODE_NAMES[k]} ({k})" for k in sorted(ACCEPTED_TYPES[flag]))
            raise CryoGMMError(f"{flag} {path}: a RELION node of type {NODE_NAMES.get(t, '?')} ({t}) in "
                               f"default_pipeline.star; {name} needs {want}")
        if not Path(path).exists():
            raise CryoGMMError(f"{flag} {path}: file not found (paths are relative to the project folder, {os.getcwd()})")
    parsers = [(mod, prefix, *_stage_parser(mod, prefix)) for mod, prefix in family.stages]
    extra = [[] for _ in parsers]
    positional = {}
    for label, vals in params:
        if label in family.param_positional:
            if len(vals) != 1:
                raise CryoGMMError(f"parameter {label} takes one value")
            positional[family.param_positional[label]] = vals[0]
            continue
        hits = []
        for k, (_, _, _, p) in enumerate(parsers):
            opts = _options(p)
            opt = _option_for(label, opts)
            if opt is None:
                continue
            if opt in RESERVED:
                raise CryoGMMError(f"parameter {label}: set by RELION's job itself (--o and the input nodes), not a parameter")
            if opts[opt]:
                extra[k] += [opt, *vals]
            elif len(vals) > 1 or (vals and vals[0].lower() not in TRUE_WORDS + FALSE_WORDS):
                raise CryoGMMError(f"parameter {label} is a flag: give it an empty value (or yes/no), got {' '.join(vals)!r}")
            elif not vals or vals[0].lower() in TRUE_WORDS:
                extra[k].append(opt)
            hits.append(k)
        if not hits:
            raise CryoGMMError(f"unknown parameter {label}: not an option of cryogmm {name} (see cryogmm {name} --help)")
    out = []
    for k, (mod, prefix, top, p) in enumerate(parsers):
        opts = _options(p)
        argv = list(prefix)
        if k == 0:
            if "" in family.inputs.values():
                flag = next(f for f, o in family.inputs.items() if o == "")
                argv.append(own[flag])
            if 0 in positional:
                argv.append(positional[0])
            elif family.param_positional:
                raise CryoGMMError(f"{name} needs the parameter {next(iter(family.param_positional))}")
            for flag, opt in family.inputs.items():
                if opt and flag in own:
                    argv += [opt, own[flag]]
            argv += ["--out", str(job_dir)]
        else:
            argv.append(str(job_dir))  # later stages read the first stage's run folder
        if "--project-dir" in opts:
            argv += ["--project-dir", "."]
        if "--force" in opts:
            argv.append("--force")  # the job folder already holds RELION's job.star, note.txt, run.out
        try:
            args = top.parse_args(argv + extra[k])
        except CryoGMMError as e:
            raise CryoGMMError(f"parameters: {e}") from None
        out.append((mod, args))
    return out


def _same_file(stream, path: Path) -> bool:
    try:
        a, b = os.fstat(stream.fileno()), os.stat(path)
    except (OSError, ValueError, AttributeError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class Tee:
    """Write to a stream and append to a log file (run.out / run.err when RELION did not
    redirect there already)."""

    def __init__(self, stream, path: Path):
        self.stream, self.path = stream, path

    def write(self, s):
        self.stream.write(s)
        with open(self.path, "a") as f:
            f.write(s)
        return len(s)

    def flush(self):
        self.stream.flush()

    def isatty(self):
        return False


def _log_streams(job_dir: Path):
    out = sys.stdout if _same_file(sys.stdout, job_dir / "run.out") else Tee(sys.stdout, job_dir / "run.out")
    err = sys.stderr if _same_file(sys.stderr, job_dir / "run.err") else Tee(sys.stderr, job_dir / "run.err")
    return out, err


def _set_threads(j: str) -> int:
    try:
        n = int(j)
    except ValueError:
        raise CryoGMMError(f"--j {j!r}: expected a number of threads") from None
    if n < 1:
        raise CryoGMMError(f"--j {n}: expected at least 1 thread")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    return n


def output_nodes(family: Family, job_dir: Path) -> list:
    """``[(node name, type)]`` of the outputs the job wrote (names as RELION gave --o)."""
    nodes = []
    for pattern, kind in family.outputs:
        for f in sorted(job_dir.glob(pattern)):
            rel = f.relative_to(job_dir).as_posix()
            nodes.append((job_dir.as_posix().rstrip("/") + "/" + rel, kind))
    return nodes


def run_external(name: str, argv) -> int:
    """Run job family ``name`` with RELION's External-job arguments ``argv``; the exit code."""
    prog = f"cryogmm relion {name}"
    argv = list(argv)
    if name not in FAMILIES:
        print(f"{prog}: error: unknown job family (one of {', '.join(sorted(FAMILIES))})", file=sys.stderr)
        return 2
    family = FAMILIES[name]
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        for mod, prefix in family.stages:
            print(f"Parameters of {' '.join(['cryogmm', mod.rsplit('.', 1)[-1].replace('_', '-'), *prefix])}:")
            print(_stage_parser(mod, prefix)[1].format_help())
        return 0
    try:
        own, params = split_relion_args(argv)
    except CryoGMMError as e:
        own, params = None, str(e)
    o = None
    if own is not None:
        o = own.get("--o") or own.get("--pipeline_control")
    if not o:
        why = params if own is None else "--o JOBDIR (the job folder RELION gives) is required"
        print(f"{prog}: error: {why}", file=sys.stderr)
        return 2
    job_dir = Path(o)
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"{prog}: error: --o {o}: cannot create the job folder ({e.strerror})", file=sys.stderr)
        return 2
    clear_exit(job_dir)
    out, err = _log_streams(job_dir)
    try:
        if own is None:
            raise CryoGMMError(params)
        stages = build_stage_argvs(name, family, own, params, job_dir)
        threads = _set_threads(own.get("--j", "1"))
    except CryoGMMError as e:
        err.write(f"{prog}: error: {e}\n")
        err.flush()
        mark_exit(job_dir, success=False)
        return e.exit_code
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            print(f"{prog}: {len(stages)} stage(s), {threads} thread(s), job folder {job_dir}")
            for mod, args in stages:
                rc = int(importlib.import_module(mod).main(args) or 0)
                if rc != 0:
                    raise CryoGMMError(f"{mod.rsplit('.', 1)[-1]} ended with exit code {rc}")
            nodes = output_nodes(family, job_dir)
            if nodes:
                write_output_nodes(job_dir, nodes)
            for n, t in nodes:
                print(f"output node {n} (type {NODE_TYPES[t]}, {t.replace('_', ' ')})")
    except CryoGMMError as e:
        err.write(f"{prog}: error: {e}\n")
        err.flush()
        mark_exit(job_dir, success=False)
        return e.exit_code
    except BaseException as e:  # noqa: BLE001 - anything at all: RELION's pipeliner waits for an exit file
        err.write(f"{prog}: error: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        err.flush()
        mark_exit(job_dir, success=False)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    mark_exit(job_dir, success=True)
    return 0


def entry(name: str):
    """Console-script entry point for one family (``cryogmm-relion-<name>``)."""

    def run() -> int:
        return run_external(name, sys.argv[1:])

    return run


refine_poses_entry = entry("refine-poses")
reconstruct_entry = entry("reconstruct")
hetero_entry = entry("hetero")
refine_model_entry = entry("refine-model")
