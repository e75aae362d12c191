"""RELION's pipeline files: node types, ``RELION_OUTPUT_NODES.star``, exit markers.

What a program run as a RELION **External** job (RELION 3.1+) owes the pipeliner, as read
from RELION 3.1's ``pipeline_jobs.h``, ``pipeliner.cpp`` and ``pipeline_control.h``:

- everything it writes goes into the job folder given with ``--o`` (``External/jobNNN/``);
- ``RELION_OUTPUT_NODES.star`` in that folder, a loop ``data_output_nodes`` with
  ``_rlnPipeLineNodeName`` (a path relative to the project folder) and
  ``_rlnPipeLineNodeType`` (the integer node types below); the pipeliner adds these nodes
  to ``default_pipeline.star`` when the job succeeds, so the next job can take them;
- an empty file ``RELION_JOB_EXIT_SUCCESS`` or ``RELION_JOB_EXIT_FAILURE`` at the end: the
  pipeliner waits for one of them (it never looks at the exit status).

Node types are RELION 3.1's integers (RELION 4 replaced them with names).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cryogmm.bridge.star import read_star_blocks, write_star_blocks

__all__ = [
    "EXIT_FAILURE",
    "EXIT_SUCCESS",
    "NODE_NAMES",
    "NODE_TYPES",
    "OUTPUT_NODES_FILE",
    "clear_exit",
    "mark_exit",
    "pipeline_node_types",
    "read_output_nodes",
    "write_output_nodes",
]

# RELION 3.1 src/pipeline_jobs.h, NODE_*
NODE_TYPES = {
    "movies": 0,
    "micrographs": 1,
    "coordinates": 2,
    "particles": 3,
    "2d_references": 5,
    "3d_reference": 6,
    "mask": 7,
    "model": 8,
    "optimiser": 9,
    "half_map": 10,
    "final_map": 11,
    "local_resolution_map": 12,
    "pdf_logfile": 13,
    "postprocess": 14,
    "polish_parameters": 15,
}
NODE_NAMES = {v: k.replace("_", " ") for k, v in NODE_TYPES.items()}

OUTPUT_NODES_FILE = "RELION_OUTPUT_NODES.star"
EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"


def write_output_nodes(job_dir, nodes) -> Path:
    """Write ``job_dir/RELION_OUTPUT_NODES.star`` from ``[(name, type), ...]``; ``name`` is
    project-relative as RELION names nodes, ``type`` an int or a :data:`NODE_TYPES` key."""
    names, types = [], []
    for name, kind in nodes:
        names.append(str(name))
        types.append(int(NODE_TYPES[kind]) if isinstance(kind, str) else int(kind))
    df = pd.DataFrame({"rlnPipeLineNodeName": pd.Series(names, dtype=object),
                       "rlnPipeLineNodeType": pd.Series(types, dtype="int64")})
    path = Path(job_dir) / OUTPUT_NODES_FILE
    write_star_blocks({"output_nodes": df}, path, comment="output nodes for RELION's pipeliner, written by cryogmm")
    return path


def read_output_nodes(path) -> list[tuple[str, int]]:
    """``[(name, type), ...]`` from a ``RELION_OUTPUT_NODES.star``."""
    df = read_star_blocks(path)["output_nodes"]
    return [(str(n), int(t)) for n, t in zip(df["rlnPipeLineNodeName"], df["rlnPipeLineNodeType"])]


def pipeline_node_types(pipeline_star) -> dict[str, int]:
    """``{node name: type}`` of a RELION ``default_pipeline.star`` (empty if it has none)."""
    path = Path(pipeline_star)
    if not path.is_file():
        return {}
    nodes = read_star_blocks(path).get("pipeline_nodes")
    if not isinstance(nodes, pd.DataFrame) or "rlnPipeLineNodeName" not in nodes.columns:
        return {}
    return {str(n): int(t) for n, t in zip(nodes["rlnPipeLineNodeName"], nodes["rlnPipeLineNodeType"])}


def clear_exit(job_dir) -> None:
    """Remove old exit markers (a job run again must not look finished)."""
    for name in (EXIT_SUCCESS, EXIT_FAILURE):
        (Path(job_dir) / name).unlink(missing_ok=True)


def mark_exit(job_dir, success: bool) -> Path:
    """Touch ``RELION_JOB_EXIT_SUCCESS`` or ``RELION_JOB_EXIT_FAILURE`` in ``job_dir``."""
    path = Path(job_dir) / (EXIT_SUCCESS if success else EXIT_FAILURE)
    path.touch()
    return path
