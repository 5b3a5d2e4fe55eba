"""Every sampler, step by step, against an independent implementation of its published update rule
(`sampler_reference.py`), on a nonlinear toy denoiser and schedules whose step ratio varies; and a mutation
check: perturbing any coefficient or operand order of a sampler (or a helper it calls) must break the match."""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import pytest
import torch
from sampler_reference import REFERENCES

from mergekit_sdxl.sampler import catalog, samplers, samplers_dpmpp, unipc
from mergekit_sdxl.sampler.schedules import DiscreteSchedule, get_sigmas

SCHED = DiscreteSchedule()
GRID = torch.linspace(-2.0, 3.0, 2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4)
X0 = torch.cos(GRID * 1.7) * 14.6
SIGMAS = {
    "karras": get_sigmas("karras", 7, SCHED).double(),
    "normal": get_sigmas("normal", 6, SCHED).double(),
    "irregular": torch.tensor([14.6, 9.0, 6.5, 3.1, 2.4, 0.9, 0.5, 0.12, 0.03, 0.0], dtype=torch.float64),
    "kl_optimal": get_sigmas("kl_optimal", 5, SCHED).double(),  # ends at sigma_min, not 0
}


def toy_model(x, sigma):
    """A smooth, nonlinear denoiser: depends on x and sigma in ways no sampler coefficient can absorb."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    s = s.reshape(-1, 1, 1, 1) if s.ndim else s
    return torch.tanh(0.3 * x) / (1 + 0.3 * s) + 0.1 * x * s / (1 + s * s) + 0.05 * torch.sin(s + GRID)


def toy_noise(sigma, sigma_next):
    """Deterministic 'noise' that depends on the interval asked for, so the sampler must ask for the right one."""
    return torch.sin(GRID * (3.7 * float(sigma) + 1.3 * float(sigma_next) + 0.5))


SAMPLER_FUNCS = {
    "euler": (samplers, "sample_euler"), "euler_a": (samplers, "sample_euler_a"), "heun": (samplers, "sample_heun"),
    "dpm_2": (samplers, "sample_dpm_2"), "dpm_2_a": (samplers, "sample_dpm_2_a"), "lms": (samplers, "sample_lms"),
    "ddim": (samplers, "sample_ddim"), "lcm": (samplers, "sample_lcm"),
    "dpmpp_2s_a": (samplers_dpmpp, "sample_dpmpp_2s_a"), "dpmpp_sde": (samplers_dpmpp, "sample_dpmpp_sde"),
    "dpmpp_2m": (samplers_dpmpp, "sample_dpmpp_2m"), "dpmpp_2m_sde": (samplers_dpmpp, "sample_dpmpp_2m_sde"),
    "dpmpp_2m_sde_heun": (samplers_dpmpp, "sample_dpmpp_2m_sde_heun"),
    "dpmpp_3m_sde": (samplers_dpmpp, "sample_dpmpp_3m_sde"),
    "uni_pc": (unipc, "sample_uni_pc"), "uni_pc_bh2": (unipc, "sample_uni_pc_bh2"),
}


def run_ours(name, sigmas):
    module, func = SAMPLER_FUNCS[name]
    states = []
    getattr(module, func)(toy_model, X0.clone(), sigmas, noise=toy_noise,
                          callback=lambda i, x, d: states.append(x.clone()))
    return states


def run_reference(name, sigmas):
    return REFERENCES[name](toy_model, X0.clone(), [float(s) for s in sigmas], toy_noise)


def test_every_sampler_has_a_reference_and_a_function():
    assert set(REFERENCES) == set(catalog.SAMPLER_NAMES) == set(SAMPLER_FUNCS)
    for name in catalog.SAMPLER_NAMES:
        assert samplers.sampler_function(name) is getattr(*SAMPLER_FUNCS[name])


@pytest.mark.parametrize("schedule", sorted(SIGMAS))
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_each_step_matches_the_published_rule(name, schedule):
    sigmas = SIGMAS[schedule]
    ours, ref = run_ours(name, sigmas), run_reference(name, sigmas)
    assert len(ours) == len(ref) == len(sigmas) - 1
    for step, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, step=step: f"step {step}: {m}")


def test_dpmpp_2m_sde_uses_the_step_ratio_h_over_h_last():
    """The regression of issue 12: h_last / h instead of h / h_last is far off on schedules with varying ratio."""
    sigmas = SIGMAS["karras"]
    ours, ref = run_ours("dpmpp_2m_sde", sigmas)[-2], run_reference("dpmpp_2m_sde", sigmas)[-2]
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


# ---- mutation check -------------------------------------------------------------------------------------------

def _helpers(module, func_name):
    """Functions of the sampler package that `func_name` calls (mutated in the namespace that calls them)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(getattr(module, func_name))))
    called = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    out = [(module, func_name)]
    for name in sorted(called):
        obj = getattr(module, name, None)
        if inspect.isfunction(obj) and obj.__module__.startswith("mergekit_sdxl.sampler") and name != func_name:
            out.append((module, name))
    return out


class _Mutator(ast.NodeTransformer):
    """Applies mutation number `target` (numbering every candidate site in walk order)."""

    def __init__(self, target):
        self.target, self.count, self.done = target, 0, None
        self.in_compare = 0

    def _hit(self):
        hit = self.count == self.target
        self.count += 1
        return hit

    def visit_Compare(self, node):
        self.in_compare += 1
        self.generic_visit(node)
        self.in_compare -= 1
        return node

    def visit_Constant(self, node):
        if self.in_compare or isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            return node
        if self._hit():
            self.done = f"constant {node.value!r} at line {node.lineno}"
            return ast.copy_location(ast.Constant(node.value * 1.01 if node.value else 0.01), node)
        return node

    def visit_BinOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, (ast.Sub, ast.Div, ast.Pow)) and self._hit():
            self.done = f"swapped {type(node.op).__name__} operands at line {node.lineno}"
            return ast.copy_location(ast.BinOp(node.right, node.op, node.left), node)
        if isinstance(node.op, ast.Add) and self._hit():
            self.done = f"+ -> - at line {node.lineno}"
            return ast.copy_location(ast.BinOp(node.left, ast.Sub(), node.right), node)
        return node


def _mutants(module, func_name):
    source = textwrap.dedent(inspect.getsource(getattr(module, func_name)))
    target = 0
    while True:
        mutator = _Mutator(target)
        tree = ast.fix_missing_locations(mutator.visit(ast.parse(source)))
        if mutator.done is None:
            return
        namespace = dict(vars(module))
        exec(compile(tree, f"<mutant of {func_name}>", "exec"), namespace)  # noqa: S102 - our own source, mutated
        yield mutator.done, namespace[func_name]
        target += 1


# mutants no run can tell apart from the original, with the reason
EQUIVALENT = {
    ("get_ancestral_step", "constant 1.0 at line 1"): "the eta default; every sampler passes eta",
    ("get_ancestral_step", "constant 0 at line 4"): "`sigma_to * 0` runs only for eta == 0",
    ("sample_dpmpp_2m_sde", "constant 1.0 at line 2"): "the eta default; dpmpp_2m_sde_heun passes eta",
    ("sample_dpmpp_sde", "swapped Div operands at line 12"): "fac = 1 / (2 r) = 2 r / 1 = 1 at r = 1/2 (A1111's r)",
    ("sample_dpmpp_sde", "swapped Sub operands at line 20"): "(1 - fac) = (fac - 1) = 0 at r = 1/2",
}
MUTATION_SIGMAS = (SIGMAS["irregular"], get_sigmas("karras", 3, SCHED).double())


@functools.cache
def _reference(name, which):
    return run_reference(name, MUTATION_SIGMAS[which])


def _killed(users):
    """True when some sampler that calls the mutated function no longer matches its reference (or crashes)."""
    for name in users:
        for which, sigmas in enumerate(MUTATION_SIGMAS):
            reference = _reference(name, which)
            try:
                ours = run_ours(name, sigmas)
            except Exception:  # noqa: BLE001 - a crash is a detected mutant
                return True
            if len(ours) != len(reference) or any(
                    not torch.allclose(a, b, rtol=1e-7, atol=1e-7) for a, b in zip(ours, reference)):
                return True
    return False


def _functions():
    """Every sampler function and helper, with the samplers that call it."""
    users = {}
    for name, (module, func_name) in SAMPLER_FUNCS.items():
        for owner, fname in _helpers(module, func_name):
            users.setdefault((owner.__name__, fname), (owner, []))[1].append(name)
    return {f"{mod.rsplit('.', 1)[-1]}.{fname}": (owner, fname, names_) for (mod, fname), (owner, names_)
            in sorted(users.items()) if next(_mutants(owner, fname), None) is not None}  # skip: no sites


FUNCTIONS = _functions()


@pytest.mark.parametrize("function", sorted(FUNCTIONS))
def test_perturbing_any_coefficient_breaks_the_match(function, monkeypatch):
    owner, fname, users = FUNCTIONS[function]
    original = getattr(owner, fname)
    survivors, total = [], 0
    for what, mutant in _mutants(owner, fname):
        total += 1
        monkeypatch.setattr(owner, fname, mutant)
        if not _killed(users) and (fname, what) not in EQUIVALENT:
            survivors.append(what)
        monkeypatch.setattr(owner, fname, original)
    assert not survivors, f"{len(survivors)} of {total} mutants of {function} survive (users {users}): {survivors}"
