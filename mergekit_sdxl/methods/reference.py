"""The merge-method reference, generated from the registry (`METHODS`): one home for every fact it prints.

`mergekit-sdxl methods` prints it (text, `--markdown`, `--json`); `docs/methods.md` is `methods_markdown()`
written by `scripts/gen_docs.py`, and `tests/test_reference_docs.py` fails when the two differ. Torch-free.
"""

from __future__ import annotations

from typing import Any

from mergekit_sdxl.methods.registry import METHODS
from mergekit_sdxl.methods.spec import MethodSpec, ParamSpec

# how each peer tool is spelled in prose
PEER_TOOLS: dict[str, str] = {"a1111": "A1111", "supermerger": "SuperMerger", "sd-mecha": "sd-mecha",
                              "mergekit": "mergekit"}
SEED_DEFAULT = "derived per key"  # what a seeded method's `seed` defaults to (the planner fills it)


def _default(spec: MethodSpec, p: ParamSpec) -> str:
    if p.name == "seed" and spec.seeded:
        return SEED_DEFAULT
    if p.default is None:
        return "required"
    if isinstance(p.default, bool):
        return "true" if p.default else "false"
    return f"{p.default:g}" if isinstance(p.default, (int, float)) else str(p.default)


def _range(p: ParamSpec) -> str:
    return "true/false" if p.type is bool else p.range_text()


def _input_names(spec: MethodSpec) -> list[str]:
    return [*spec.inputs, *(["models..."] if spec.variadic else [])]


def _identities(spec: MethodSpec) -> list[str]:
    """"alpha = 0 -> a" for each identity point (the planner then copies that input, bit for bit)."""
    out = []
    for identity in spec.identities:
        when = ", ".join(f"{name} = {value:g}" for name, value in identity.when) or "always"
        out.append(f"{when} -> {spec.inputs[identity.input] if identity.input < len(spec.inputs) else 'models'}")
    return out


def method_reference() -> list[dict[str, Any]]:
    """Every registered method as plain data (JSON-ready), in registry order."""
    rows = []
    for spec in METHODS.values():
        rows.append({
            "name": spec.name,
            "alias_of": spec.alias_of,
            "doc": spec.doc,
            "formula": spec.formula,
            "inputs": _input_names(spec),
            "arity": spec.arity(),
            "params": [{"name": p.name, "type": p.type.__name__, "range": _range(p), "default": _default(spec, p),
                        "doc": p.doc} for p in spec.params],
            "peers": {PEER_TOOLS.get(tool, tool): name for tool, name in spec.peers.items()},
            "elementwise": spec.elementwise,
            "linear": spec.linear is not None,
            "identities": _identities(spec),
        })
    return rows


def methods_text() -> str:
    """The reference for a terminal: one block per method."""
    lines = []
    for row in method_reference():
        alias = f" (another name for {row['alias_of']})" if row["alias_of"] else ""
        lines += [f"{row['name']}{alias}: {row['doc']}", f"  formula  {row['formula']}",
                  f"  inputs   {', '.join(row['inputs'])} ({row['arity']})"]
        for p in row["params"]:
            lines.append(f"  {p['name']:<8} {p['type']}, range {p['range']}, default {p['default']}: {p['doc']}")
        if row["peers"]:
            lines.append("  peers    " + "; ".join(f"{tool}: {name}" for tool, name in row["peers"].items()))
        lines.append("")
    return "\n".join(lines)


def methods_markdown() -> str:
    """docs/methods.md."""
    rows = method_reference()
    out = [
        "# Merge methods",
        "",
        "<!-- Generated from the method registry by `python scripts/gen_docs.py` (the same text as",
        "     `mergekit-sdxl methods --markdown`). Do not edit: tests/test_reference_docs.py checks it. -->",
        "",
        "A method step in a recipe names the method and its inputs and parameters, e.g.",
        "`{method: weighted_sum, a: x, b: y, alpha: 0.3}`; variadic methods take their further models as",
        "`models: [m1, m2, ...]`. Every float parameter also takes an MBW vector, a preset or per-key overrides",
        "(see [recipes.md](recipes.md)). A, B, C are the inputs `a`, `b`, `c`; M_i the models of `models`.",
        "Every method computes in the recipe's `output.compute_dtype` (fp32 by default); every result is checked to be",
        "finite.",
        "",
        "| method | formula | peers' names |",
        "|---|---|---|",
    ]
    for row in rows:
        peers = "; ".join(f"{tool}: {name}" for tool, name in row["peers"].items()) or "-"
        out.append(f"| [`{row['name']}`](#{row['name']}) | {_cell(row['formula'])} | {_cell(peers)} |")
    for row in rows:
        out += ["", f"## {row['name']}", "", row["doc"] + (f" Another name for `{row['alias_of']}`."
                                                             if row["alias_of"] else ""), ""]
        out += [f"- formula: `{row['formula']}`", f"- inputs: {', '.join(f'`{n}`' for n in row['inputs'])} "
                f"({row['arity']})"]
        if row["peers"]:
            out.append("- peers: " + "; ".join(f"{tool} \"{name}\"" for tool, name in row["peers"].items()))
        traits = [t for t, on in (("elementwise", row["elementwise"]), ("linear", row["linear"])) if on]
        if traits:
            out.append(f"- traits: {', '.join(traits)}")
        if row["identities"]:
            out.append("- copies an input bit for bit when: " + "; ".join(row["identities"]))
        if row["params"]:
            out += ["", "| parameter | type | range | default | meaning |", "|---|---|---|---|---|"]
            out += [f"| `{p['name']}` | {p['type']} | {p['range']} | {p['default']} | {_cell(p['doc'])} |"
                    for p in row["params"]]
    out += ["", "Traits: *elementwise* methods are computed chunk by chunk (bit-identical to the whole tensor);",
            "*linear* ones are fused with neighbouring linear steps into one sum. A seeded method's `seed`",
            "defaults to a value derived from `output.seed`, the step name and the key, so each key is",
            "reproducible on any device and thread count.", ""]
    return "\n".join(out)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|")
