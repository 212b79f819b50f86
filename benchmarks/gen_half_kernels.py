"""ONNX Runtime's kernel registry as data: which ops have float16 / bfloat16 kernels, per provider.

Writes onnxopt/data/ort_half_kernels.json from ONNX Runtime's generated docs/OperatorKernels.md
(tools/python/gen_opkernel_doc.py writes it from the registered kernels). The table in the
repository was made with:

    # microsoft/onnxruntime main at 735e69a396afe7e1bdfbc6b38c1d43eeb68b8484 (2026-02-13,
    # VERSION_NUMBER 1.25.0), read from the mirror of tianleiwu/onnxruntime, whose main is it
    git --git-dir /work/.mirror/tianleiwu+onnxruntime/repo \\
        show 735e69a396afe7e1bdfbc6b38c1d43eeb68b8484:docs/OperatorKernels.md \\
        > /tmp/OperatorKernels.md
    python benchmarks/gen_half_kernels.py /tmp/OperatorKernels.md \\
        --commit 735e69a396afe7e1bdfbc6b38c1d43eeb68b8484 --version 1.25.0 --date 2026-02-13

Output, per provider ("cpu", "cuda"), domain and op, one entry per registration row, newest first
(closed contiguous rows that agree are merged; an open "13+" row never is, since ONNX Runtime
matches it only at version 13):

    [since_version, until_version or null, {"float16": [names], "bfloat16": [...], "float": [...]},
     main]

where the lists name the type constraints that admit tensor(float16) / tensor(bfloat16) /
tensor(float) (only constraints admitting one of the three are kept), and `main` is the op's
main float constraint at that registration: the one that types output 0 (T for Conv, T1 for
Attention, T2 for Cast), or, when output 0 is never a float (ArgMax, Shape, Equal), the first
input that can be. A type written out in the signature instead of a constraint
(DequantizeLinear-13's `y: tensor(float)`) is its own constraint, named by that text.

What the md cannot say: a kernel whose types are all written out (NonMaxSuppression: boxes are
tensor(float)) has no type constraints, and gen_opkernel_doc.py writes no row for it; such ops
are absent here (onnxopt.precision.kernels asks the ONNX schema about them).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROVIDERS = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}
FLOATS = ("float16", "bfloat16", "float")
_PROVIDER_HEADING = re.compile(r"^## Operators implemented by (\w+)")
_DOMAIN_ROW = re.compile(r"^\|\*\*Operator Domain:\*\* \*([\w.]+)\*")
_PARAM = re.compile(r"\*(in|out)\* [^:]*:\*\*([^*]+)\*\*")
_CONSTRAINT = re.compile(r"\*\*(\w+)\*\* = (.*)")
_VERSIONS = re.compile(r"^(\d+\+?|\[\d+, \d+\])$")  # 13+, 13, [7, 12]


def parse(text: str) -> dict[str, dict[str, dict[str, list]]]:
    """{provider: {domain: {op: [row, ...]}}} for the providers in PROVIDERS."""
    table: dict[str, dict[str, dict[str, list]]] = {}
    provider = domain = op = None
    signatures: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        if heading := _PROVIDER_HEADING.match(line):
            provider = PROVIDERS.get(heading.group(1))
            continue
        if provider is None or not line.startswith("|"):
            continue
        if found := _DOMAIN_ROW.match(line):
            domain = found.group(1)
            continue
        cells = line.split("|")
        if len(cells) != 6 or not _VERSIONS.match(cells[3]):
            continue  # the table's heading rows and the "| |" rows between domains
        if cells[1]:  # a new op; continuation rows leave name and parameters empty
            op = cells[1]
            signatures = [_PARAM.findall(s) for s in cells[2].split("<br><br>or<br><br>")]
        since, until = _version_range(cells[3])
        constraints = _constraints(cells[4])
        row = [since, until, *_main(signatures, constraints)]
        rows = table.setdefault(provider, {}).setdefault(domain, {}).setdefault(op, [])
        newer = rows[-1] if rows else None
        if newer and newer[1] is not None and newer[0] == until + 1 and newer[2:] == row[2:]:
            # Closed, contiguous and the same: one range. Never into an open "13+" row: ONNX
            # Runtime matches those only at exactly their first version.
            newer[0] = since
        else:
            rows.append(row)
    return table


def _version_range(text: str) -> tuple[int, int | None]:
    if text.endswith("+"):
        return int(text[:-1]), None
    if text.startswith("["):
        first, last = text.strip("[]").split(",")
        return int(first), int(last)
    return int(text), int(text)


def _constraints(text: str) -> dict[str, set[str]]:
    """"**T** = tensor(float), tensor(float16)<br/> **I** = ..." -> {"T": {"float", "float16"}}."""
    result = {}
    for part in text.split("<br/>"):
        if found := _CONSTRAINT.search(part):
            types = {t.strip() for t in found.group(2).split(",")}
            result[found.group(1)] = {f for f in FLOATS if f"tensor({f})" in types}
    return result


def _floats_of(type_text: str, constraints: dict[str, set[str]]) -> set[str]:
    if type_text in constraints:
        return constraints[type_text]
    return {f for f in FLOATS if type_text == f"tensor({f})"}


def _main(signatures: list[list[tuple[str, str]]],
          constraints: dict[str, set[str]]) -> tuple[dict[str, list[str]], str | None]:
    """The row's dtype -> constraint names map and its main float constraint."""
    signature = max(signatures, key=lambda s: _fit(s, constraints))
    outputs = [t for kind, t in signature if kind == "out"]
    inputs = [t for kind, t in signature if kind == "in"]
    main = outputs[0] if outputs else None
    if main is None or not _floats_of(main, constraints):
        # Output 0 is never a float (ArgMax's indices, Shape, Equal): the float data input is.
        main = next((t for t in inputs if _floats_of(t, constraints)), main)
    named = {name: floats for name, floats in constraints.items() if floats}
    if main is not None and main not in constraints and _floats_of(main, constraints):
        named[main] = _floats_of(main, constraints)  # a written-out type, e.g. tensor(float)
    support = {f: sorted(n for n, floats in named.items() if f in floats) for f in FLOATS}
    return {f: names for f, names in support.items() if names}, main


def _fit(signature: list[tuple[str, str]], constraints: dict[str, set[str]]) -> tuple[int, int]:
    """How well a schema signature matches a row's constraints: the md lists every signature
    the op ever had, the row only the constraints its kernel registers."""
    names = {t for _, t in signature if not t.startswith(("tensor(", "seq(", "map("))}
    return -len(names - constraints.keys()), len(names & constraints.keys())


def dump(table: dict, header: dict) -> str:
    """JSON with one op per line, so a regenerated table diffs op by op."""
    lines = ["{", f' "header": {json.dumps(header)},']
    providers = sorted(table)
    for p_index, provider in enumerate(providers):
        lines.append(f" {json.dumps(provider)}: {{")
        domains = sorted(table[provider])
        for d_index, domain in enumerate(domains):
            lines.append(f"  {json.dumps(domain)}: {{")
            ops = sorted(table[provider][domain])
            for o_index, op in enumerate(ops):
                comma = "," if o_index < len(ops) - 1 else ""
                rows = json.dumps(table[provider][domain][op], separators=(",", ":"))
                lines.append(f"   {json.dumps(op)}: {rows}{comma}")
            lines.append("  }" + ("," if d_index < len(domains) - 1 else ""))
        lines.append(" }" + ("," if p_index < len(providers) - 1 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernels_md", type=Path, help="ONNX Runtime's docs/OperatorKernels.md")
    parser.add_argument("--commit", required=True, help="onnxruntime commit the md is from")
    parser.add_argument("--version", required=True, help="its VERSION_NUMBER")
    parser.add_argument("--date", required=True, help="its commit date, YYYY-MM-DD")
    parser.add_argument("--out", type=Path, default=ROOT / "onnxopt/data/ort_half_kernels.json")
    args = parser.parse_args()
    table = parse(args.kernels_md.read_text(encoding="utf-8"))
    header = {
        "source": "microsoft/onnxruntime docs/OperatorKernels.md",
        "commit": args.commit, "version": args.version, "date": args.date,
        "generator": "benchmarks/gen_half_kernels.py",
        "row": "[since_version, until_version|null, {dtype: [constraints admitting it]}, main]",
    }
    args.out.write_text(dump(table, header), encoding="utf-8")
    counts = {p: sum(len(ops) for ops in d.values()) for p, d in table.items()}
    print(f"wrote {args.out}: ops per provider {counts}")


if __name__ == "__main__":
    main()
