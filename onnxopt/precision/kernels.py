"""Does ONNX Runtime register a float16 / bfloat16 kernel for this op on this provider?

A node without a half kernel on the target provider must stay float32: ONNX Runtime would run it
on the CPU instead, with copies both ways (the cause of 7x slowdowns). The answer comes from
ONNX Runtime's own kernel registry, as its generated docs/OperatorKernels.md lists it, turned into
onnxopt/data/ort_half_kernels.json by benchmarks/gen_half_kernels.py (the header names the
commit and version). Per provider, domain and op, each registration row holds its opset range,
the type constraints admitting float16 / bfloat16 / float, and the op's main float constraint:
the one typing output 0 (T for Conv, T1 for Attention, T2 for Cast), or the float input when
output 0 never is a float (ArgMax, Shape).

Opset resolution follows ONNX Runtime: the model's opset gives the op's schema version (Resize
at opset 21 is Resize-19), and a registration "[13, 17]" serves versions 13 to 17, while an open
"18+" serves version 18 only, not a later version it was written before (CUDA's Resize "18+"
does not take Resize-19: ONNX Runtime runs that on the CPU).

Answers: True, the kernel serving that version admits the dtype for the main constraint; False,
the op is known but not in that dtype at that version (also: known to ONNX Runtime, but with no
kernel on this provider, or none for this version); None, unknown (a custom domain, an op no
provider lists, an opset below every registration).

One gap in the md: a kernel whose types are all written out has no type constraints, and the
md has no row for it (NonMaxSuppression: boxes are tensor(float)). For such ONNX ops the ONNX
schema answers instead: a dtype the schema does not allow has no kernel anywhere (False).
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import onnx

from onnxopt.errors import BadInputError

__all__ = ["DTYPES", "PROVIDERS", "half_kernel", "table_source"]

PROVIDERS = ("cpu", "cuda")
DTYPES = ("float16", "bfloat16", "float")
_ALIASES = {"cpuexecutionprovider": "cpu", "cudaexecutionprovider": "cuda"}
_ONNX_DOMAINS = {"": "ai.onnx", "ai.onnx": "ai.onnx", "ai.onnx.ml": "ai.onnx.ml"}
# ONNX function ops ONNX Runtime has no kernel for: it inlines their body, one op of the table.
_INLINED = {("ai.onnx", "CastLike"): "Cast"}


@functools.cache
def _table() -> dict:
    text = (resources.files("onnxopt") / "data" / "ort_half_kernels.json").read_text("utf-8")
    return json.loads(text)


def table_source() -> str:
    """Where the table comes from, for a report line."""
    header = _table()["header"]
    return (f"onnxruntime {header['version']} ({header['commit'][:10]}, {header['date']}) "
            f"{header['source'].split()[-1]}")


def half_kernel(provider: str, domain: str, op_type: str, opset: int,
                dtype: str) -> bool | None:
    """Whether `provider` ("cpu", "cuda") registers a kernel for `domain`::`op_type` at the
    model's `opset` for that domain whose main float constraint admits `dtype` ("float16",
    "bfloat16"; "float" works too). None when the table does not know the op."""
    provider = _ALIASES.get(provider.lower(), provider.lower())
    if provider not in PROVIDERS:
        raise BadInputError(f"half kernels: provider {provider!r} is not in ONNX Runtime's "
                            f"kernel table; use one of {', '.join(PROVIDERS)}")
    if dtype not in DTYPES:
        raise BadInputError(f"half kernels: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    domain = _ONNX_DOMAINS.get(domain, domain)
    op_type = _INLINED.get((domain, op_type), op_type)
    table = _table()
    rows = table[provider].get(domain, {}).get(op_type)
    if rows is None:
        if any(op_type in table[p].get(domain, {}) for p in PROVIDERS):
            return False  # ONNX Runtime has the op, this provider has no kernel for it
        return _by_schema(domain, op_type, opset, dtype)
    version = _since_version(domain, op_type, opset, rows)
    for since, until, support, main in rows:
        # ONNX Runtime's rule (kernel_registry.cc, VerifyVersion): an open-ended "13+" kernel
        # matches only nodes whose schema version is 13; a closed one, any version inside it.
        if since == version or (until is not None and since <= version <= until):
            return main in support.get(dtype, ())
    if version < min(row[0] for row in rows):
        return None
    return False  # a newer op version than the provider's kernels, or a gap between them


def _since_version(domain: str, op_type: str, opset: int, rows: list) -> int:
    """The op's schema version in a model of `opset` for its domain: the ONNX schema's
    since_version; ONNX Runtime's own ops (and ops ONNX no longer has at that opset), the
    newest registration at or below `opset`."""
    if domain in _ONNX_DOMAINS.values():
        try:
            onnx_domain = "" if domain == "ai.onnx" else domain
            return onnx.defs.get_schema(op_type, opset, onnx_domain).since_version
        except onnx.defs.SchemaError:
            pass
    return max((row[0] for row in rows if row[0] <= opset), default=opset)


def _by_schema(domain: str, op_type: str, opset: int, dtype: str) -> bool | None:
    """For an ONNX op the md has no row for: False when its schema rules `dtype` out for the
    main float type (then no provider can have the kernel), else None."""
    if domain not in _ONNX_DOMAINS.values():
        return None
    try:
        schema = onnx.defs.get_schema(op_type, opset, "" if domain == "ai.onnx" else domain)
    except onnx.defs.SchemaError:
        return None
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}

    def types(param: onnx.defs.OpSchema.FormalParameter) -> set[str]:
        return allowed.get(param.type_str, {param.type_str})

    floats = {f"tensor({f})" for f in DTYPES}
    params = [*schema.outputs[:1], *schema.inputs]
    main = next((types(p) for p in params if types(p) & floats), None)
    if main is None or f"tensor({dtype})" not in main:
        return False
    return None
