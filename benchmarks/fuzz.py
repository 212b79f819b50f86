"""Fuzz campaign: mutated models through every command; each must end in a one-line error
(exit 2) or a valid model, and never touch its input.

    python benchmarks/fuzz.py                      # 1,000 cases, 2 workers, ~25 s on 2 cores
    python benchmarks/fuzz.py --cases 50 --seed 7  # a quick look

Seeds: the embedded default and every model in models/. Each case draws a seed model, a
mutation (MUTATIONS: truncated files, flipped bytes in the protobuf and in tensors, dropped or
duplicated nodes, renamed or retyped inputs, shape lies, cycles, wrong opsets and IR versions,
huge dims, external data pointing outside the folder or truncated, ...) and one command
(COMMANDS: optimize, --int8, --sparsity, --fp16, validate, inspect, transfer), all from one fixed seed
(random data, announced). A case fails when it
  - exits with anything but 0, 1 (a check over tolerance) or 2 (bad input), e.g. 3 (our bug),
    or dies (a signal: ONNX Runtime or protobuf crashed the process);
  - prints a traceback, or an exit-2 error longer than one line;
  - writes an output that fails onnx.checker or that ONNX Runtime cannot load where the
    mutated input loads, or writes anything on exit 2;
  - changes its input file (or its external data).
Commands run in-process in worker subprocesses (a crash costs one case, not the campaign);
results go to benchmarks/results/fuzz-DATE.json. tests/test_fuzz.py runs a fast slice.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
SEED_MODELS = [ROOT / "onnxopt" / "data" / "digits_resnet.onnx",
               *sorted((ROOT / "models").glob("*.onnx"))]
ALLOWED_EXITS = {0, 1, 2}


# --- mutations: (proto or bytes, rng) -> bytes of the mutated file, plus extra files ----------

@dataclasses.dataclass
class Mutated:
    data: bytes
    external: dict[str, bytes] = dataclasses.field(default_factory=dict)  # file name -> bytes
    what: str = ""


def _proto(data: bytes) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(data)


def _pick(rng, items):
    return items[int(rng.integers(len(items)))] if len(items) else None


def truncate(data, rng):
    cut = int(rng.integers(1, max(2, len(data))))
    return Mutated(data[:cut], what=f"truncated at {cut} of {len(data)} bytes")


def flip_bytes(data, rng):
    raw = bytearray(data)
    count = int(rng.integers(1, 9))
    for _ in range(count):
        raw[int(rng.integers(len(raw)))] ^= int(rng.integers(1, 256))
    return Mutated(bytes(raw), what=f"{count} random bytes flipped")


def flip_tensor(data, rng):
    model = _proto(data)
    raw = [t for t in model.graph.initializer if t.raw_data]
    tensor = _pick(rng, raw)
    if tensor is None:
        return flip_bytes(data, rng)
    buf = bytearray(tensor.raw_data)
    for _ in range(int(rng.integers(1, 17))):
        buf[int(rng.integers(len(buf)))] ^= int(rng.integers(1, 256))
    tensor.raw_data = bytes(buf)
    return Mutated(model.SerializeToString(), what=f"bytes flipped in tensor {tensor.name!r}")


def nonfinite_weights(data, rng):
    model = _proto(data)
    floats = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT]
    tensor = _pick(rng, floats)
    if tensor is None:
        return flip_bytes(data, rng)
    array = numpy_helper.to_array(tensor).copy()
    flat = array.reshape(-1)
    flat[int(rng.integers(flat.size))] = _pick(rng, [np.nan, np.inf, -np.inf, 3e38])
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return Mutated(model.SerializeToString(), what=f"NaN/Inf/huge value in {tensor.name!r}")


def drop_node(data, rng):
    model = _proto(data)
    index = int(rng.integers(len(model.graph.node)))
    name = model.graph.node[index].op_type
    del model.graph.node[index]
    return Mutated(model.SerializeToString(), what=f"node {index} ({name}) dropped")


def duplicate_node(data, rng):
    model = _proto(data)
    index = int(rng.integers(len(model.graph.node)))
    model.graph.node.insert(index, model.graph.node[index])
    return Mutated(model.SerializeToString(), what=f"node {index} duplicated")


def cycle(data, rng):
    model = _proto(data)
    nodes = model.graph.node
    if len(nodes) < 2:
        return drop_node(data, rng)
    first, last = int(rng.integers(len(nodes) - 1)), len(nodes) - 1
    late = nodes[int(rng.integers(first + 1, last + 1))]
    if nodes[first].input:
        nodes[first].input[0] = late.output[0]
    return Mutated(model.SerializeToString(), what=f"node {first} reads a later node's output")


def rename_input(data, rng):
    model = _proto(data)
    value = _pick(rng, list(model.graph.input))
    value.name = value.name + "_renamed"
    return Mutated(model.SerializeToString(), what="graph input renamed, its readers not")


def retype_input(data, rng):
    model = _proto(data)
    value = _pick(rng, list(model.graph.input))
    new = _pick(rng, [TensorProto.INT64, TensorProto.STRING, TensorProto.BOOL, TensorProto.DOUBLE,
                      TensorProto.FLOAT16, TensorProto.UINT8, 0])
    value.type.tensor_type.elem_type = new
    return Mutated(model.SerializeToString(), what=f"input {value.name!r} retyped to {new}")


def shape_lie(data, rng):
    model = _proto(data)
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    value = _pick(rng, [v for v in values if v.type.tensor_type.shape.dim])
    if value is None:
        return retype_input(data, rng)
    dims = value.type.tensor_type.shape.dim
    dim = dims[int(rng.integers(len(dims)))]
    dim.dim_value = int(_pick(rng, [0, 1, 2, 7, 1000]))
    if rng.random() < 0.3:
        dims.add().dim_value = 3  # and a rank lie
    return Mutated(model.SerializeToString(), what=f"shape of {value.name!r} lies")


def huge_dims(data, rng):
    model = _proto(data)
    value = _pick(rng, list(model.graph.input))
    for dim in value.type.tensor_type.shape.dim:
        dim.dim_value = int(_pick(rng, [2**31, 2**40, 10**6]))
    return Mutated(model.SerializeToString(), what=f"input {value.name!r} declared huge")


def wrong_opset(data, rng):
    model = _proto(data)
    version = int(_pick(rng, [1, 5, 6, 8, 10, 26, 99]))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = version
    return Mutated(model.SerializeToString(), what=f"opset set to {version}")


def wrong_ir(data, rng):
    model = _proto(data)
    model.ir_version = int(_pick(rng, [0, 1, 2, 3, 99]))
    return Mutated(model.SerializeToString(), what=f"IR version {model.ir_version}")


def drop_initializer(data, rng):
    model = _proto(data)
    if not model.graph.initializer:
        return drop_node(data, rng)
    index = int(rng.integers(len(model.graph.initializer)))
    del model.graph.initializer[index]
    return Mutated(model.SerializeToString(), what="an initializer dropped")


def initializer_dims(data, rng):
    model = _proto(data)
    tensor = _pick(rng, list(model.graph.initializer))
    if tensor is None or not tensor.dims:
        return drop_node(data, rng)
    tensor.dims[int(rng.integers(len(tensor.dims)))] += int(_pick(rng, [-1, 1, 5]))
    return Mutated(model.SerializeToString(), what=f"dims of {tensor.name!r} do not match its data")


def mangle_attribute(data, rng):
    model = _proto(data)
    nodes = [n for n in model.graph.node if n.attribute]
    node = _pick(rng, nodes)
    if node is None:
        return drop_node(data, rng)
    attribute = node.attribute[int(rng.integers(len(node.attribute)))]
    if rng.random() < 0.5:
        node.attribute.remove(attribute)
        return Mutated(model.SerializeToString(), what=f"attribute {attribute.name} removed")
    if attribute.ints:
        attribute.ints[0] = int(_pick(rng, [0, -1, 100]))
    elif attribute.type == onnx.AttributeProto.INT:
        attribute.i = int(_pick(rng, [-5, 0, 99]))
    elif attribute.type == onnx.AttributeProto.FLOAT:
        attribute.f = float(_pick(rng, [-1.0, 0.0, np.nan]))
    else:
        attribute.name = attribute.name + "_x"
    return Mutated(model.SerializeToString(), what=f"attribute {attribute.name} altered")


def empty_graph(data, rng):
    model = _proto(data)
    del model.graph.node[:]
    return Mutated(model.SerializeToString(), what="every node removed")


def _as_external(model: onnx.ModelProto, location) -> onnx.TensorProto | None:
    tensors = [t for t in model.graph.initializer if len(t.raw_data) > 64]
    if not tensors:
        return None
    tensor = max(tensors, key=lambda t: len(t.raw_data))
    size = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def external_outside(data, rng):
    model = _proto(data)
    location = _pick(rng, ["../outside.bin", "/etc/hostname", "sub/../../x.bin", "missing.bin"])
    if _as_external(model, location) is None:
        return drop_node(data, rng)
    return Mutated(model.SerializeToString(), what=f"external data at {location!r}")


def external_truncated(data, rng):
    model = _proto(data)
    tensors = [t for t in model.graph.initializer if len(t.raw_data) > 64]
    if not tensors:
        return drop_node(data, rng)
    tensor = max(tensors, key=lambda t: len(t.raw_data))
    blob = tensor.raw_data
    _as_external(model, "weights.bin")
    keep = int(rng.integers(0, len(blob)))
    return Mutated(model.SerializeToString(), {"weights.bin": blob[:keep]},
                   what=f"external data truncated to {keep} of {len(blob)} bytes")


def rename_op(data, rng):
    model = _proto(data)
    node = _pick(rng, list(model.graph.node))
    old = node.op_type
    node.op_type = _pick(rng, ["Foo", "Relu", "Add", "Conv", "Sigmoid", "Softmax", "Identity"])
    if rng.random() < 0.3:
        node.domain = "com.example"
    return Mutated(model.SerializeToString(), what=f"{old} became {node.domain}::{node.op_type}")


def swap_inputs(data, rng):
    model = _proto(data)
    node = _pick(rng, [n for n in model.graph.node if len(n.input) >= 2])
    if node is None:
        return rename_op(data, rng)
    inputs = list(node.input)
    rng.shuffle(inputs)
    del node.input[:]
    node.input.extend(inputs)
    return Mutated(model.SerializeToString(), what=f"inputs of a {node.op_type} shuffled")


def break_output(data, rng):
    model = _proto(data)
    output = model.graph.output[0]
    if rng.random() < 0.5:
        output.name = output.name + "_missing"
        return Mutated(model.SerializeToString(), what="graph output names no value")
    model.graph.output.append(model.graph.output[0])
    return Mutated(model.SerializeToString(), what="graph output listed twice")


MUTATIONS = {f.__name__.replace("_", "-"): f for f in (
    truncate, flip_bytes, flip_tensor, nonfinite_weights, drop_node, duplicate_node, cycle,
    rename_input, retype_input, shape_lie, huge_dims, wrong_opset, wrong_ir, drop_initializer,
    initializer_dims, mangle_attribute, empty_graph, external_outside, external_truncated,
    rename_op, swap_inputs, break_output)}

# --- commands ---------------------------------------------------------------------------------

COMMANDS = {
    "optimize": lambda m, orig, out: ["optimize", m, "-o", out, "--bench", "none", "--batches",
                                      "1", "-q"],
    "int8": lambda m, orig, out: ["optimize", m, "-o", out, "--int8", "--bench", "none",
                                  "--batches", "1", "-q"],
    "sparsity": lambda m, orig, out: ["optimize", m, "-o", out, "--sparsity", "0.5", "--bench",
                                      "none", "--batches", "1", "-q"],
    "fp16": lambda m, orig, out: ["optimize", m, "-o", out, "--fp16", "--bench", "none",
                                  "--batches", "1", "-q"],
    "validate": lambda m, orig, out: ["validate", orig, m, "--batches", "1"],
    "inspect": lambda m, orig, out: ["inspect", m],
    "transfer": lambda m, orig, out: ["transfer", orig, m, "-o", out, "--batches", "1"],
}


@dataclasses.dataclass
class Case:
    index: int
    seed_model: str
    mutation: str
    command: str
    seed: int


def plan(cases: int, seed: int, models=None, mutations=None, commands=None) -> list[Case]:
    rng = np.random.default_rng(seed)
    models = models or [str(p) for p in SEED_MODELS]
    mutations = mutations or list(MUTATIONS)
    commands = commands or list(COMMANDS)
    return [Case(i, _pick(rng, models), mutations[i % len(mutations)], _pick(rng, commands),
                 int(rng.integers(2**31))) for i in range(cases)]


def run_case(case: Case, work: Path) -> dict:
    """Mutate, run the command in this process, check what the rules above demand."""
    from onnxopt import cli

    folder = work / f"case{case.index}"
    folder.mkdir(parents=True, exist_ok=True)
    original = Path(case.seed_model)
    mutated = MUTATIONS[case.mutation](original.read_bytes(), np.random.default_rng(case.seed))
    path, out = folder / "model.onnx", folder / "out.onnx"
    path.write_bytes(mutated.data)
    for name, blob in mutated.external.items():
        (folder / name).write_bytes(blob)
    before = _digest(folder)
    argv = [str(a) for a in COMMANDS[case.command](path, original, out)]
    stdout, stderr = io.StringIO(), io.StringIO()
    saved = sys.argv, cli.stdout, cli.stderr
    sys.argv = ["onnxopt", *argv]
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            cli.stdout, cli.stderr = _console(stdout), _console(stderr)
            try:
                cli.main()
                code = 0
            except SystemExit as done:
                code = 0 if done.code is None else int(done.code)
    finally:
        sys.argv, cli.stdout, cli.stderr = saved
    seconds = time.perf_counter() - start
    problems = _problems(code, stdout.getvalue(), stderr.getvalue(), path, out,
                         case.command, before, folder)
    return {**dataclasses.asdict(case), "what": mutated.what, "exit": code,
            "seconds": round(seconds, 2), "problems": problems,
            "error": stderr.getvalue().strip()[:300]}


def _console(sink):
    from rich.console import Console

    return Console(file=sink, width=200)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.iterdir() if p.name != "out.onnx" and p.is_file()}


def _problems(code, stdout, stderr, path, out, command, before, folder) -> list[str]:
    problems = []
    if code not in ALLOWED_EXITS:
        problems.append(f"exit {code}")
    if "Traceback" in stdout + stderr:
        problems.append("traceback")
    if code == 2 and len([line for line in stderr.splitlines() if line.strip()]) != 1:
        problems.append("exit 2 with an error that is not one line")
    after = {k: v for k, v in _digest(folder).items() if k in before}
    if after != before:
        problems.append("input touched")
    if out.exists():
        if code == 2:
            problems.append("output written on exit 2")
        problems += _invalid_output(path, out)
    return problems


def _invalid_output(path: Path, out: Path) -> list[str]:
    try:
        onnx.checker.check_model(str(out))
    except Exception as error:  # any failure to read or check is a failure of ours
        return [f"invalid output: {str(error).splitlines()[0][:200]}"]
    if _loads(path) and not _loads(out):
        return ["output does not load in ONNX Runtime (the input does)"]
    return []


def _loads(path: Path) -> bool:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception:  # ORT's own error types
        return False
    return True


# --- campaign: workers in subprocesses --------------------------------------------------------

def worker(plan_file: str, results_file: str) -> None:
    """Run the cases of `plan_file` in order, appending one JSON line each; the line
    `{"start": i}` goes first, so a crash is pinned on its case."""
    import logging

    logging.disable(logging.CRITICAL)
    cases = [Case(**c) for c in json.loads(Path(plan_file).read_text())]
    done = {json.loads(line).get("index") for line in _lines(results_file)}
    with tempfile.TemporaryDirectory(prefix="onnxopt-fuzz-") as tmp, \
            open(results_file, "a") as sink:
        for case in cases:
            if case.index in done:
                continue
            sink.write(json.dumps({"start": case.index}) + "\n")
            sink.flush()
            sink.write(json.dumps(run_case(case, Path(tmp))) + "\n")
            sink.flush()


def _lines(path: str) -> list[str]:
    return Path(path).read_text().splitlines() if Path(path).exists() else []


def campaign(cases: list[Case], jobs: int, log=print) -> list[dict]:
    """Split the cases over `jobs` worker processes; a worker that dies is restarted after
    its case is recorded as a crash."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-fuzz-plan-") as tmp:
        plans = [Path(tmp) / f"plan{i}.json" for i in range(jobs)]
        sinks = [Path(tmp) / f"results{i}.jsonl" for i in range(jobs)]
        for i, plan_file in enumerate(plans):
            plan_file.write_text(json.dumps([dataclasses.asdict(c) for c in cases[i::jobs]]))
        procs: list = [None] * jobs
        finished = [False] * jobs
        last = time.time()
        while not all(finished):
            for i in range(jobs):
                proc = procs[i]
                if finished[i] or (proc is not None and proc.poll() is None):
                    continue
                if proc is not None and proc.returncode != 0:
                    _record_crash(sinks[i], proc.returncode)
                if _finished(plans[i], sinks[i]):
                    finished[i] = True
                    continue
                procs[i] = subprocess.Popen([sys.executable, __file__, "--worker", str(plans[i]),
                                             str(sinks[i])])
            time.sleep(0.2)
            if time.time() - last > 30:
                last = time.time()
                done = sum(1 for sink in sinks for line in _lines(str(sink)) if '"exit"' in line)
                log(f"  {done}/{len(cases)} cases")
        results = [r for sink in sinks for r in map(json.loads, _lines(str(sink))) if "exit" in r]
    return sorted(results, key=lambda r: r["index"])


def _finished(plan_file: Path, results_file: Path) -> bool:
    planned = {c["index"] for c in json.loads(plan_file.read_text())}
    done = {json.loads(line).get("index") for line in _lines(str(results_file))}
    return planned <= done


def _record_crash(results_file: Path, returncode: int) -> None:
    lines = _lines(str(results_file))
    starts = [json.loads(line)["start"] for line in lines if "start" in json.loads(line)]
    finished = {json.loads(line).get("index") for line in lines}
    crashed = [i for i in starts if i not in finished]
    if crashed:
        with open(results_file, "a") as sink:
            sink.write(json.dumps({"index": crashed[-1], "exit": returncode, "seconds": 0,
                                   "problems": [f"process died ({returncode})"]}) + "\n")


def summarize(results: list[dict]) -> dict:
    failures = [r for r in results if r["problems"]]
    by = lambda key: {k: sum(1 for r in results if r[key] == k)  # noqa: E731
                      for k in sorted({r[key] for r in results if key in r})}
    return {
        "cases": len(results),
        "failures": len(failures),
        "tracebacks": sum("traceback" in r["problems"] for r in results),
        "exit_3": sum(r["exit"] == 3 for r in results),
        "crashes": sum(any("died" in p for p in r["problems"]) for r in results),
        "invalid_outputs": sum(any(p.startswith(("invalid output", "output does not load"))
                                   for p in r["problems"]) for r in results),
        "inputs_touched": sum("input touched" in r["problems"] for r in results),
        "exits": by("exit"),
        "mutations": by("mutation"),
        "commands": by("command"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", help="default: benchmarks/results/fuzz-DATE.json")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    print(f"fuzz: {args.cases} cases from seed {args.seed} (random mutations, fixed seed), "
          f"{args.jobs} workers")
    start = time.time()
    results = campaign(plan(args.cases, args.seed), args.jobs)
    summary = summarize(results)
    summary["seconds"] = round(time.time() - start, 1)
    today = datetime.date.today().isoformat()
    target = Path(args.json or ROOT / "benchmarks" / "results" / f"fuzz-{today}.json")
    target.write_text(json.dumps({"date": today, "command": " ".join(["python", *sys.argv]),
                                  "seed": args.seed, "summary": summary,
                                  "failures": [r for r in results if r["problems"]]}, indent=1))
    print(json.dumps(summary, indent=1))
    for failure in [r for r in results if r["problems"]][:30]:
        print(f"FAIL #{failure['index']} {failure.get('mutation')} / {failure.get('command')} "
              f"on {Path(failure.get('seed_model', '?')).name}: {failure['problems']} "
              f"{failure.get('error', '')[:160]}")
    print(f"written: {target}")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
