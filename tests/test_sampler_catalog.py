"""The sampler/schedule name table (sampler/catalog.py) against the implementations, the CLI and PNG metadata."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.sampler import catalog


def test_catalog_names_exactly_the_implemented_samplers_and_schedules():
    from mergekit_sdxl.sampler import samplers, schedules

    assert set(catalog.SAMPLER_NAMES) == set(samplers.SAMPLERS)
    dummy = schedules.DiscreteSchedule()
    for name in catalog.SCHEDULE_NAMES:  # every named schedule computes n + 1 sigmas ending in 0
        sigmas = schedules.get_sigmas(name, 4, dummy)
        # A1111's kl_optimal stops at sigma_min instead of 0 (sampling ends slightly noisy there, as in A1111)
        end = dummy.sigma_min if name == "kl_optimal" else 0.0
        assert sigmas.shape == (5,) and float(sigmas[-1]) == pytest.approx(end, rel=1e-5)


def test_rows_are_keyed_by_their_own_name_and_spellings_are_unique():
    for table in (catalog.SAMPLER_NAMES, catalog.SCHEDULE_NAMES):
        assert all(key == row.name for key, row in table.items())
        assert len({row.a1111 for row in table.values()}) == len(table)
        assert len({row.comfyui for row in table.values()}) == len(table)


def test_grid_choices_come_from_the_catalog():
    from mergekit_sdxl.cli.grid_cmd import command

    options = {p.name: p for p in command.params if isinstance(p, click.Option)}
    assert tuple(options["sampler"].type.choices) == tuple(catalog.SAMPLER_NAMES)
    assert tuple(options["schedule"].type.choices) == tuple(catalog.SCHEDULE_NAMES)


def test_png_parameters_use_the_a1111_spelling():
    from mergekit_sdxl.sampler.pngmeta import parameters_text

    for sampler in catalog.SAMPLER_NAMES.values():
        for schedule in catalog.SCHEDULE_NAMES.values():
            text = parameters_text("p", "", 20, sampler.name, schedule.name, 6.0, 1, 64, 64)
            assert f"Sampler: {sampler.a1111}, Schedule type: {schedule.a1111}," in text


def test_unknown_names_are_usage_errors_with_a_hint():
    with pytest.raises(UsageError, match="did you mean 'euler_a'"):
        catalog.sampler_name("euler_ancestal")
    with pytest.raises(UsageError, match="known: normal, karras"):
        catalog.schedule_name("beta-ish")
    assert catalog.sampler_name("heun").model_calls_per_step == 2


def test_catalog_is_torch_free():
    code = "import sys, mergekit_sdxl.sampler.catalog; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
