"""MBW vector parsing: lengths, layouts, named form, presets and errors (docs/conventions.md, sections 2 and 3)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mergekit_sdxl.arch.blocks import CONVENTIONS, block_names
from mergekit_sdxl.arch.mbw import PRESETS, parse_mbw, to_list
from mergekit_sdxl.errors import RecipeError

KOHAKU_REV2 = "0,0.1,0.1,0,0.1,0.1,0,0.1,0.1,0,0,0,0,0,0.05,0.05,0.05,0.05,0.05,0.05"
HIGH_RES_REPLACE = "0,0,1,1,0.67,0.67,0.33,0.33,0,0,0,0,0,0,0,0,0,0,0,0.33,0.33,0.67,0.67,1,1,0"
LOW_RES_REPLACE = "0,0,0,0,0,0,0,0.33,0.33,0.67,0.67,1,1,1,1,1,0.67,0.67,0.33,0.33,0,0,0,0,0,0"


def test_kohaku_gamma_rev2_vector():
    w = parse_mbw(KOHAKU_REV2, "sdxl", where="step rev2b, parameter alpha")
    assert list(w) == list(block_names("sdxl"))
    assert w["BASE"] == 0 and w["M00"] == 0
    assert [w[f"IN{i:02d}"] for i in range(9)] == [0.1, 0.1, 0, 0.1, 0.1, 0, 0.1, 0.1, 0]
    assert [w[f"OUT{i:02d}"] for i in range(9)] == [0, 0, 0] + [0.05] * 6


def test_anime_diffusion_high_res_replace_sd15():
    w = parse_mbw(HIGH_RES_REPLACE, "sd15")
    assert w["BASE"] == 0 and w["IN00"] == 0 and w["IN01"] == w["IN02"] == 1
    assert w["IN03"] == w["IN04"] == 0.67 and w["IN05"] == w["IN06"] == 0.33
    assert all(w[f"IN{i:02d}"] == 0 for i in range(7, 12)) and w["M00"] == 0
    assert all(w[f"OUT{i:02d}"] == 0 for i in range(5))
    assert w["OUT05"] == w["OUT06"] == 0.33 and w["OUT07"] == w["OUT08"] == 0.67
    assert w["OUT09"] == w["OUT10"] == 1 and w["OUT11"] == 0
    low = parse_mbw(LOW_RES_REPLACE, "sd15")
    assert low["M00"] == 1 and low["IN11"] == 1 and low["OUT00"] == 1 and low["OUT11"] == 0


def _sd1_on_sdxl(in_run: tuple[float, float, float] | None = None,
                 out_run: tuple[float, float, float] | None = None) -> list[float]:
    """Distinct values 0..25 at every SD1 position; IN09-IN11 default to IN08 (9), OUT09-OUT11 to OUT08 (22)."""
    values = [float(i) for i in range(26)]
    values[10:13] = in_run or (9.0, 9.0, 9.0)
    values[23:26] = out_run or (22.0, 22.0, 22.0)
    return values


def test_26_values_for_sdxl_keep_supermerger_positions():
    w = parse_mbw(_sd1_on_sdxl(), "sdxl")
    assert to_list(w, "sdxl") == [*range(0, 10), *range(13, 23)]
    assert w["M00"] == 13 and w["OUT00"] == 14 and w["OUT08"] == 22 and w["IN08"] == 9
    # a dropped IN value may also equal M00, its other kept neighbour
    assert to_list(parse_mbw(_sd1_on_sdxl(in_run=(9, 13, 13)), "sdxl"), "sdxl") == [*range(0, 10), *range(13, 23)]
    assert parse_mbw(",".join(["0.5"] * 26), "sdxl") == dict.fromkeys(block_names("sdxl"), 0.5)


@pytest.mark.parametrize(("in_run", "out_run", "named"), [
    ((9, 9, 0.5), None, ["IN11 = 0.5 (not IN08 = 9 or M00 = 13)"]),
    ((10, 9, 9), None, ["IN09 = 10 (not IN08 = 9 or M00 = 13)"]),
    (None, (22, 22, 0), ["OUT11 = 0 (not OUT08 = 22)"]),
    (None, (13, 22, 22), ["OUT09 = 13 (not OUT08 = 22)"]),  # M00's value is no neighbour of the OUT run
    ((9, 1, 13), (23, 24, 22), ["IN10 = 1", "OUT09 = 23", "OUT10 = 24"]),
])
def test_26_values_for_sdxl_refuse_dropping_a_weight_of_their_own(in_run, out_run, named):
    values = _sd1_on_sdxl(in_run, out_run)
    with pytest.raises(RecipeError, match=r"^steps\.m\.alpha: 26 values .* drop IN09-IN11 and OUT09-OUT11") as info:
        parse_mbw(values, "sdxl", where="steps.m.alpha")
    message = str(info.value)
    assert all(part in message for part in named), message
    dropped = [f"IN{i:02d}" for i in (9, 10, 11)] + [f"OUT{i:02d}" for i in (9, 10, 11)]
    assert sum(f"{name} = " in message for name in dropped) == len(named)  # only the offending ones are listed
    with pytest.raises(RecipeError, match="IN09-IN11"):  # the string form is checked the same way
        parse_mbw(",".join(repr(v) for v in values), "sdxl")
    assert to_list(parse_mbw(values, "sd15"), "sd15") == values  # SD1.x keeps all 26


def test_25_values_with_base_alpha():
    values = [float(i + 1) for i in range(25)]
    sd15 = parse_mbw(values, "sd15", base_alpha=0.5)
    assert to_list(sd15, "sd15") == [0.5, *values]
    sdxl_values = _sd1_on_sdxl()[1:]
    sdxl = parse_mbw(sdxl_values, "sdxl", base_alpha=0.5)
    assert sdxl["BASE"] == 0.5 and sdxl["IN00"] == 1 and sdxl["M00"] == 13 and sdxl["OUT08"] == 22
    with pytest.raises(RecipeError, match="OUT11 = 25"):
        parse_mbw(values, "sdxl", base_alpha=0.5)
    with pytest.raises(RecipeError, match="base_alpha"):
        parse_mbw(values, "sd15")
    with pytest.raises(RecipeError, match="base_alpha goes only with 25 values"):
        parse_mbw([0.0] * 26, "sd15", base_alpha=0.5)


def test_sd_mecha_vae_weight():
    w = parse_mbw([0.1] * 20 + [0.9], "sdxl", "sd-mecha")
    assert w["VAE"] == 0.9 and len(w) == 21
    follows = parse_mbw([0.3] + [0.0] * 19, "sdxl", "sd-mecha")
    assert follows["VAE"] == 0.3
    assert parse_mbw("GRAD_V", "sdxl", "sd-mecha")["VAE"] == 0
    with pytest.raises(RecipeError, match="got 21"):
        parse_mbw([0.1] * 21, "sdxl")
    assert "VAE" not in parse_mbw([0.0] * 26, "sd15", "sd-mecha")


def test_length_errors_name_where_and_the_expected_lengths():
    with pytest.raises(RecipeError) as exc:
        parse_mbw([0.0] * 19, "sdxl", where="step rev2b, parameter alpha")
    assert str(exc.value) == ("step rev2b, parameter alpha: expected 20 values (BASE, IN00..IN08, M00, OUT00..OUT08) "
                              "for SDXL, or 26 (SuperMerger SD1 layout), got 19")
    with pytest.raises(RecipeError, match=r"expected 26 values \(BASE, IN00..IN11, M00, OUT00..OUT11\) for SD1.x"):
        parse_mbw(KOHAKU_REV2, "sd15")
    with pytest.raises(RecipeError, match="20 or 21 values"):
        parse_mbw([0.0] * 22, "sdxl", "sd-mecha")


@pytest.mark.parametrize("bad, fragment", [
    ([0.0] * 19 + [float("nan")], "value 20 is nan"),
    ([float("inf")] + [0.0] * 19, "finite"),
    ("0,0.1,x" + ",0" * 17, "value 3 is 'x'"),
    ([None] * 20, "not a number"),
    ([True] + [0.0] * 19, "value 1 is True"),
    (0.5, "single number"),
    (object(), "expected a list"),
    ("1e999" + ",0" * 19, "finite"),
    ("GRAD_X", "unknown preset 'GRAD_X'; presets: GRAD_V, GRAD_A"),
    ("inf", "unknown preset"),
])
def test_bad_values_are_refused(bad, fragment):
    with pytest.raises(RecipeError, match=fragment) as exc:
        parse_mbw(bad, "sdxl", where="step s1, parameter alpha")
    assert str(exc.value).startswith("step s1, parameter alpha: ")


def test_string_and_list_forms():
    spaced = parse_mbw("0,0.1, 0.1 ,0" + ",0" * 16, "sdxl")
    assert to_list(spaced, "sdxl")[:4] == [0, 0.1, 0.1, 0]
    assert parse_mbw([1] * 20, "sdxl") == parse_mbw(",".join(["1"] * 20), "sdxl")
    assert parse_mbw(tuple([0.5] * 20), "sdxl")["OUT08"] == 0.5
    assert parse_mbw("0\n" * 20, "sdxl")["BASE"] == 0


def test_named_form():
    w = parse_mbw({"IN04": 0.3, "OUT00..OUT02": 0.5, "default": 0}, "sdxl")
    assert w["IN04"] == 0.3 and w["OUT00"] == w["OUT01"] == w["OUT02"] == 0.5
    assert sum(w.values()) == pytest.approx(1.8)
    same = parse_mbw("IN04: 0.3, OUT00..OUT02=0.5, default:0", "sdxl")
    assert same == w
    aliases = parse_mbw({"MID": 1, "base": 0.2, "in4": 0.4, "default": 0}, "sdxl")
    assert aliases["M00"] == 1 and aliases["BASE"] == 0.2 and aliases["IN04"] == 0.4
    # a single block beats a range, a range beats default
    w = parse_mbw({"IN00..IN08": 0.5, "IN04": 0.1, "default": 1}, "sdxl")
    assert w["IN03"] == 0.5 and w["IN04"] == 0.1 and w["M00"] == 1
    assert parse_mbw({"IN00..OUT08": 0.5}, "sdxl", default=0)["BASE"] == 0  # ranges follow block order
    assert parse_mbw({"VAE": 0.7}, "sdxl", "sd-mecha", default=0)["VAE"] == 0.7


@pytest.mark.parametrize("mapping, fragment", [
    ({"IN04": 0.3}, "no weight for BASE, IN00"),
    ({"IN09": 0.3, "default": 0}, "unknown block 'IN09'"),
    ({"VAE": 0.3, "default": 0}, "unknown block 'VAE'"),
    ({"OUT02..OUT00": 0.3, "default": 0}, "runs backwards"),
    ({"MID": 1, "M00": 0, "default": 0}, "given twice"),
    ({"IN00..IN04": 1, "IN03..IN05": 0, "default": 0}, "in both"),
    ({"IN04": "half", "default": 0}, "not a number"),
    ({"default": float("nan")}, "finite"),
])
def test_named_form_errors(mapping, fragment):
    with pytest.raises(RecipeError, match=fragment):
        parse_mbw(mapping, "sdxl", where="step a")


def test_named_string_errors():
    with pytest.raises(RecipeError, match="NAME:VALUE"):
        parse_mbw("IN04:0.3, OUT00", "sdxl")
    with pytest.raises(RecipeError, match="given twice"):
        parse_mbw("IN04:0.3, IN04:0.4, default:0", "sdxl")


def test_presets_as_supermerger_ships_them():
    assert all(len(v) == 26 for v in PRESETS.values())
    shipped = {  # a few values from SuperMerger's mbwpresets.txt
        "GRAD_V": (0, 1, 0.9166666667, 0.8333333333), "GRAD_A": (0, 0, 0.0833333333, 0.1666666667),
        "SMOOTHSTEP": (0, 0, 0.00506365740740741, 0.0196759259259259, 0.04296875),
        "COSINE": (0, 1, 0.995722430686905, 0.982962913144534),
        "REVERSE-SMOOTHSTEP": (0, 1, 0.994936342592593, 0.980324074074074),
        "WRAP08": (0, 1, 1, 1, 1, 0, 0),
    }
    for name, head in shipped.items():
        assert PRESETS[name][:len(head)] == pytest.approx(head, abs=1e-10), name
    assert PRESETS["GRAD_A"][13] == 1 and PRESETS["GRAD_V"][13] == 0 and PRESETS["GRAD_V"][25] == 1
    assert PRESETS["SMOOTHSTEP"][13] == 0.5 and PRESETS["SMOOTHSTEP"][25] == 1
    assert PRESETS["WRAP08"] == (0,) + (1,) * 4 + (0,) * 17 + (1,) * 4
    assert PRESETS["FLAT_25"] == (0,) + (0.25,) * 25 and PRESETS["FLAT_75"][1:] == (0.75,) * 25
    assert set(PRESETS["ALL_A"]) == {0} and set(PRESETS["ALL_B"]) == {1}


def test_presets_map_to_sdxl_by_the_26_to_20_rule():
    for name, values in PRESETS.items():
        sdxl = to_list(parse_mbw(name, "sdxl"), "sdxl")
        assert sdxl == list(values[:10]) + list(values[13:23]), name
        assert to_list(parse_mbw(name.lower(), "sd15"), "sd15") == list(values)
    grad_v = parse_mbw("GRAD_V", "sdxl")
    assert grad_v["IN00"] == 1 and grad_v["IN08"] == pytest.approx(4 / 12) and grad_v["OUT08"] == pytest.approx(9 / 12)


finite = st.floats(min_value=-4, max_value=4, allow_nan=False, allow_infinity=False)


@given(st.sampled_from(["sdxl", "sd15"]), st.sampled_from(CONVENTIONS), st.data())
def test_round_trip_list_dict_list(arch, convention, data):
    n = len(block_names(arch, convention))
    values = data.draw(st.lists(finite, min_size=n, max_size=n))
    weights = parse_mbw(values, arch, convention)
    assert list(weights) == list(block_names(arch, convention))
    assert to_list(weights, arch, convention) == values
    assert parse_mbw(dict(weights), arch, convention) == weights  # named form round trip
    text = ",".join(repr(v) for v in values)
    assert parse_mbw(text, arch, convention) == weights


@given(st.sampled_from(["sdxl", "sd15"]), st.lists(finite, min_size=0, max_size=40))
def test_any_length_is_accepted_or_refused_with_its_count(arch, values):
    allowed = {"sdxl": {20, 26}, "sd15": {26}}[arch]
    if arch == "sdxl" and len(values) == 26 and not (set(values[10:13]) <= {values[9], values[13]}
                                                      and set(values[23:26]) <= {values[22]}):
        with pytest.raises(RecipeError, match="drop IN09-IN11 and OUT09-OUT11"):
            parse_mbw(values, arch)
    elif len(values) in allowed:
        weights = parse_mbw(values, arch)
        assert len(weights) == len(block_names(arch)) and all(math.isfinite(v) for v in weights.values())
    else:
        with pytest.raises(RecipeError, match=f"got {len(values)}" if len(values) != 25 else "base_alpha"):
            parse_mbw(values, arch)
