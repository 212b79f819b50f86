"""Where ONNX Runtime really ran each node.

Placement comes from ORT's own profiler: one profiled run records, for every kernel, the node,
its op type and the provider that executed it. Nodes of a GPU session that ran on the CPU
provider are the fallback; Memcpy nodes are the copies ORT inserted between the two.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from onnxopt.measure import runtime

__all__ = ["Placement", "node_placement", "placement_from_profile"]

_SHORT = {name: short for short, (name, _) in runtime.PROVIDERS.items()}


@dataclasses.dataclass
class Placement:
    ep: str  # the provider asked for
    nodes: dict[str, int]  # provider short name -> nodes it ran
    fallback: dict[str, int]  # op type -> nodes that ran on the CPU although `ep` was asked for
    copies: int = 0  # MemcpyToHost / MemcpyFromHost nodes between providers
    cpu_nodes: tuple[str, ...] = ()  # names of the nodes that fell back (ORT's names after fusion)

    def summary(self) -> str:
        taken = ", ".join(f"{ep} {n}" for ep, n in sorted(self.nodes.items()))
        if not self.fallback:
            return taken
        ops = ", ".join(f"{op} {n}" for op, n in sorted(self.fallback.items(), key=lambda kv: -kv[1]))
        return f"{taken}; fell back to cpu: {ops}; {self.copies} copies"


def node_placement(
    model: str | os.PathLike | bytes, feeds: Mapping[str, np.ndarray], *, ep: str, threads: int = 0,
    tf32: bool | None = None,
) -> Placement:
    """Profile one run of `model` on `ep` (made as the timed session was, `tf32` included) and
    count the nodes each provider executed."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-profile-") as tmp:
        session = runtime.make_session(model, ep=ep, threads=threads, tf32=tf32,
                                       profile_prefix=str(Path(tmp) / "profile"))
        runtime.run(session, feeds)
        with open(session.end_profiling()) as handle:
            events = json.load(handle)
    return placement_from_profile(events, ep)


def placement_from_profile(events: list[dict], ep: str) -> Placement:
    """Count, from ORT profiler events, the nodes each provider executed in one run."""
    providers: dict[str, str] = {}
    op_types: dict[str, str] = {}
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") != "Node" or "provider" not in args:
            continue
        node = event["name"].removesuffix("_kernel_time")
        providers[node] = _SHORT.get(args["provider"], args["provider"])
        op_types[node] = args.get("op_name", "?")
    nodes = Counter(providers.values())
    copies = sum(1 for op in op_types.values() if op.startswith("Memcpy"))
    fell = [] if ep == "cpu" else [n for n, p in providers.items()
                                   if p == "cpu" and not op_types[n].startswith("Memcpy")]
    fallback = Counter(op_types[n] for n in fell)
    return Placement(ep, dict(nodes), dict(fallback), copies, tuple(fell))
