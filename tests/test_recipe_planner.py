"""Planning (recipe/planner.py) against fake input headers built from the real key tables: no tensors anywhere."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import pytest

from mergekit_sdxl.arch.tables import key_table
from mergekit_sdxl.engine.run import job_arch
from mergekit_sdxl.errors import ArchError, RecipeError
from mergekit_sdxl.recipe import InputHeader, build_plan, describe_plan, load_recipe, parse_recipe
from mergekit_sdxl.recipe.describe import plan_size
from mergekit_sdxl.recipe.nodes import Call, Linear, Load, loads_of
from mergekit_sdxl.recipe.planner import derive_seed

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
_CODES = {"float32": "F16", "int64": "I64", "int32": "I32"}

IN04 = "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"
IN02 = "model.diffusion_model.input_blocks.2.0.in_layers.0.weight"
IN00 = "model.diffusion_model.input_blocks.0.0.weight"
OUT05 = "model.diffusion_model.output_blocks.5.0.in_layers.0.weight"
OUT_CONV = "model.diffusion_model.out.0.bias"
TIME_EMBED = "model.diffusion_model.time_embed.0.weight"
LABEL_EMB = "model.diffusion_model.label_emb.0.0.weight"
TEXT_PROJECTION = "conditioner.embedders.1.model.text_projection"
CLIP_G = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
POSITION_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
VAE_KEY = "first_stage_model.decoder.conv_in.weight"


def header(alias: str, arch: str = "sdxl", *, without=(), shapes=None, detected: str | None = "") -> InputHeader:
    """A header with every key of the real `arch` table (fp16 floats), minus `without`, with `shapes` replaced."""
    keys = {key: (_CODES[info.dtype], tuple(info.shape)) for key, info in key_table(arch).items()
            if key not in without}
    for key, shape in (shapes or {}).items():
        keys[key] = (keys[key][0], shape)
    return InputHeader(f"/models/{alias}.safetensors", arch if detected == "" else detected, keys)


def headers(recipe, arch: str = "sdxl", **per_alias) -> dict[str, InputHeader]:
    return {alias: per_alias.get(alias) or header(alias, arch) for alias in recipe.models}


def plan_for(recipe, arch: str = "sdxl", **per_alias):
    return build_plan(recipe, headers(recipe, arch, **per_alias), arch=arch)


def by_key(plan) -> dict:
    return {kp.key: kp for kp in plan.keys}


def recipe_from(steps: dict, models=("a", "b", "c"), **top) -> object:
    data = {"models": {m: f"{m}.safetensors" for m in models}, "steps": steps, **top}
    return parse_recipe(data, source="test.yaml")


# ------------------------------------------------------------------------------------------ Kohaku-XL gamma rev2
@pytest.fixture(scope="module")
def rev2():
    recipe = load_recipe(RECIPES / "kohaku_xl_gamma_rev2.yaml")
    return recipe, plan_for(recipe)


def _rev2_linear(key: str) -> Linear:
    return Linear(((Load("beta7", key), 0.75), (Load("anxl3", key), 1.0), (Load("anxl2", key), -1.0),
                   (Load("base8", key), 0.25)))


def test_rev2_in04_is_weighted_sum_alpha_0_1_over_the_formula_node(rev2):
    _, plan = rev2
    node = by_key(plan)[IN04].node
    assert node == Call("weighted_sum", (_rev2_linear(IN04), Load("anxl3", IN04)), (("alpha", 0.1),))
    assert hash(node.inputs[0]) == hash(_rev2_linear(IN04))


def test_rev2_alpha_zero_block_is_exactly_the_formula_node(rev2):
    _, plan = rev2
    keys = by_key(plan)
    assert keys[IN02].node == _rev2_linear(IN02)  # IN02 has weight 0: (1 - 0) * rev2 + 0 * anxl3 is rev2 exactly
    assert keys[CLIP_G].node == _rev2_linear(CLIP_G)  # BASE has weight 0
    assert keys[IN00].node.params == (("alpha", 0.1),)  # the card's vector gives IN00 0.1
    assert keys[OUT05].node.params == (("alpha", 0.05),)
    assert keys[OUT_CONV].node.params == (("alpha", 0.05),)  # `.out.` follows OUT08


def test_rev2_keys_kept_from_a_are_the_formula_node(rev2):
    _, plan = rev2
    keys = by_key(plan)
    # rule 2 (neither weight nor bias) and, under supermerger-2023, time_embed/label_emb: keep A = step's first input
    for key in (TEXT_PROJECTION, TIME_EMBED, LABEL_EMB):
        assert keys[key].node == _rev2_linear(key), key
    assert keys[POSITION_IDS].node == Load("beta7", POSITION_IDS)
    assert keys[POSITION_IDS].dtype == "I64" and keys[POSITION_IDS].shape == (1, 77)
    assert keys["v_pred"].node == Load("beta7", "v_pred") and keys["v_pred"].dtype == "I64"


def test_rev2_order_dtypes_shapes_and_inputs(rev2):
    recipe, plan = rev2
    assert [kp.key for kp in plan.keys] == list(key_table("sdxl"))
    assert plan.arch == "sdxl"
    assert plan.inputs == {alias: ref.path for alias, ref in recipe.models.items()}
    assert all(kp.dtype == "F16" for kp in plan.keys if kp.key not in (POSITION_IDS, "v_pred", "ztsnr")
               and "position_ids" not in kp.key)
    assert by_key(plan)[IN04].shape == (640, 2048)
    for kp in plan.keys:
        assert {load.alias for load in loads_of(kp.node)} <= set(recipe.models)
    assert plan.warnings == []


def test_rev2_recipe_dict_and_description(rev2):
    _, plan = rev2
    data = json.loads(json.dumps(plan.recipe_dict))
    assert data["models"]["beta7"] == {"file": "kxl-beta7.safetensors", "sha256": None}
    assert data["steps"]["rev2"]["coefficients"] == {"beta7": 0.75, "anxl3": 1.0, "anxl2": -1.0, "base8": 0.25}
    assert data["steps"]["output"]["params"]["alpha"]["blocks"]["IN04"] == 0.1
    assert data["steps"]["output"]["convention"] == "supermerger-2023"
    assert data["output"]["dtype"] == "fp16"
    lines = describe_plan(plan)
    text = "\n".join(lines)
    assert "0.75*beta7 + 1*anxl3 - 1*anxl2 + 0.25*base8" in text
    assert "weighted_sum(rev2, anxl3; alpha=[0,0.1,0.1,0,0.1,0.1,0,0.1,0.1,0,0,0,0,0,0.05" in text
    assert f"{plan_size(plan):,} bytes" in text
    assert "merged by weighted_sum" in text and "formula (linear)" in text
    assert plan_size(plan) == sum(2 * _numel(kp.shape) if kp.dtype == "F16" else 8 * _numel(kp.shape)
                                  for kp in plan.keys)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_today_supermerger_convention_merges_time_embed_as_in00():
    recipe = load_recipe(RECIPES / "kohaku_xl_gamma_rev2.yaml")
    text = (RECIPES / "kohaku_xl_gamma_rev2.yaml").read_text().replace("convention: supermerger-2023",
                                                                       "convention: supermerger")
    now = parse_recipe(_yaml(text), source="now.yaml", base_dir=RECIPES)
    keys = by_key(plan_for(now))
    assert keys[TIME_EMBED].node.params == (("alpha", 0.1),)
    assert by_key(plan_for(recipe))[TIME_EMBED].node == _rev2_linear(TIME_EMBED)


def _yaml(text: str):
    from mergekit_sdxl.recipe.load import load_yaml

    return load_yaml(text)


# ------------------------------------------------------------------------------------------------ shipped recipes
@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_plans(path):
    recipe = load_recipe(path)
    arch = recipe.arch or "sdxl"
    plan = plan_for(recipe, arch)
    table = key_table(arch)
    expected = [k for k in table if not (recipe.output.prune_ema and k.startswith("model_ema."))]
    assert [kp.key for kp in plan.keys] == expected
    for kp in plan.keys:
        loads = loads_of(kp.node)
        assert loads and all(load.key == kp.key for load in loads)
        assert kp.shape == table[kp.key].shape
    assert describe_plan(plan)


def test_anime_diffusion_high_res_replace():
    recipe = load_recipe(RECIPES / "anime_diffusion_merge.yaml")
    keys = by_key(plan_for(recipe, "sd15"))
    in01 = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    in03 = "model.diffusion_model.input_blocks.3.0.op.weight"
    out10 = "model.diffusion_model.output_blocks.10.1.proj_out.weight"
    clip = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    assert keys[in01].node == Load("aurora", in01)  # weight 1: Aurora's block, exactly
    assert keys[in03].node == Call("weighted_sum", (Load("base", in03), Load("aurora", in03)), (("alpha", 0.67),))
    assert keys[out10].node == Load("aurora", out10)
    assert keys[clip].node == Load("base", clip)  # SD1: text encoder follows BASE (0)


def test_ties_dare_example_seeds_and_overrides():
    recipe = load_recipe(RECIPES / "ties_dare_example.yaml")
    keys = by_key(plan_for(recipe))
    node = keys[IN04].node
    assert node.method == "weighted_sum" and node.params == (("alpha", 0.5),)
    ties, dare = node.inputs
    assert ties.method == "ties" and ties.inputs == (Load("base", IN04), Load("anime", IN04), Load("photo", IN04))
    params = dict(dare.params)
    assert params["seed"] == derive_seed(20240128, "dare", IN04)
    assert (params["p"], params["alpha"], params["ties_sign"]) == (0.7, 0.5, True)
    clip = keys[CLIP_G].node  # override 0.0 for ^conditioner\. -> exactly the first input (the TIES node)
    assert clip == Call("ties", (Load("base", CLIP_G), Load("anime", CLIP_G), Load("photo", CLIP_G)), ties.params)
    mid = "model.diffusion_model.middle_block.1.proj_in.weight"
    assert dict(keys[mid].node.params)["alpha"] == 0.3


# ---------------------------------------------------------------------------------------------------- node rules
def test_formula_flattening_and_single_term_identity():
    recipe = recipe_from({"d": "b - c", "x": "a + 0.5 * d", "y": "x + 0.5 * d - 1.0 * (x - a)"}, models=("a", "b", "c"))
    keys = by_key(plan_for(recipe))
    # y = x + 0.5 d - (x - a) = 0.5 d + a (x cancels in the formula); d = b - c is flattened into the Linear
    assert keys[IN04].node == Linear(((Load("b", IN04), 0.5), (Load("c", IN04), -0.5), (Load("a", IN04), 1.0)))
    same = recipe_from({"x": "a + 0.5 * (b - b)"}, models=("a", "b"))
    assert by_key(plan_for(same))[IN04].node == Load("a", IN04)


def test_exact_shortcuts_and_regex_overrides_later_win():
    recipe = recipe_from({
        "ws1": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": 1.0},
        "ad0": {"method": "add_difference", "a": "ws1", "b": "b", "c": "c", "alpha": 0.0},
        "out": {"method": "weighted_sum", "a": "ad0", "b": "c", "alpha": {
            "value": 0.5, "overrides": [{"match": "attn2", "value": 0.2}, {"match": "to_k", "value": 0.3}]}},
    })
    keys = by_key(plan_for(recipe))
    to_q = IN04.replace("to_k", "to_q")
    assert keys[IN04].node == Call("weighted_sum", (Load("b", IN04), Load("c", IN04)), (("alpha", 0.3),))
    assert keys[to_q].node.params == (("alpha", 0.2),)
    assert keys[IN02].node.params == (("alpha", 0.5),)
    assert keys[TEXT_PROJECTION].node.params == (("alpha", 0.5),)  # no block weights: every float key is merged


def test_block_override_can_merge_a_kept_key():
    recipe = recipe_from({"out": {"method": "weighted_sum", "a": "a", "b": "b",
                                  "alpha": {"value": {"default": 0.5}, "overrides": [{"match": "text_projection",
                                                                                      "value": 0.25}]}}})
    keys = by_key(plan_for(recipe))
    assert keys[TEXT_PROJECTION].node.params == (("alpha", 0.25),)
    logit_scale = "conditioner.embedders.1.model.logit_scale"
    assert keys[logit_scale].node == Load("a", logit_scale)


def test_seed_is_stable_63_bit_and_per_key():
    expected = int.from_bytes(hashlib.sha256(b"0\x00d\x00" + IN04.encode()).digest()[:8], "big") >> 1
    assert derive_seed(0, "d", IN04) == expected
    assert 0 <= expected < 2**63
    recipe = recipe_from({"d": {"method": "dare", "base": "a", "models": ["b"], "seed": 5}})
    keys = by_key(plan_for(recipe))
    seeds = {dict(keys[k].node.params)["seed"] for k in (IN04, IN02, IN00)}
    assert len(seeds) == 3 and dict(keys[IN04].node.params)["seed"] == derive_seed(5, "d", IN04)
    assert dict(keys[IN04].node.params)["p"] == 0.9  # method defaults are explicit in the node


def test_vae_bake_from_full_and_bare_vae_files():
    recipe = recipe_from({"m": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": 0.5}},
                         models=("a", "b", "v"), output={"vae": "v"})
    keys = by_key(plan_for(recipe))
    assert keys[VAE_KEY].node == Load("v", VAE_KEY)
    vae_table = {k.removeprefix("first_stage_model."): v for k, v in header("v").keys.items()
                 if k.startswith("first_stage_model.")}
    bare = InputHeader("/models/vae.safetensors", None, vae_table)
    plan = build_plan(recipe, {"a": header("a"), "b": header("b"), "v": bare}, arch="sdxl")
    keys = by_key(plan)
    assert keys[VAE_KEY].node == Load("v", "decoder.conv_in.weight") and keys[VAE_KEY].dtype == "F16"
    assert len(plan.keys) == len(key_table("sdxl"))
    empty = InputHeader("/models/x.safetensors", None, {"foo": ("F16", (1,))})
    with pytest.raises(RecipeError, match=r"output\.vae: model 'v' .* has no VAE keys"):
        build_plan(recipe, {"a": header("a"), "b": header("b"), "v": empty}, arch="sdxl")


def test_prune_ema_and_drop():
    recipe = recipe_from({"m": "0.5 * a + 0.5 * b"}, models=("a", "b"),
                         output={"prune_ema": True, "drop": ["^alphas_cumprod", "ztsnr"]})
    plan = plan_for(recipe, "sd15")
    names = {kp.key for kp in plan.keys}
    assert not any(k.startswith("model_ema.") for k in names)
    assert "alphas_cumprod" not in names and "alphas_cumprod_prev" not in names and "betas" in names


def test_non_float_and_marker_keys_come_from_the_first_model_that_has_them():
    recipe = recipe_from({"m": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": 0.5}}, models=("a", "b"))
    plan = build_plan(recipe, {"a": header("a", without=[POSITION_IDS, "v_pred"]), "b": header("b")}, arch="sdxl")
    keys = by_key(plan)
    assert keys[POSITION_IDS].node == Load("b", POSITION_IDS)
    assert keys["v_pred"].node == Load("b", "v_pred")
    assert [kp.key for kp in plan.keys][-2:] == [POSITION_IDS, "v_pred"]  # extra keys after the first's order


# ---------------------------------------------------------------------------------------------------- errors
def test_missing_keys_reported_all_at_once_per_alias():
    recipe = load_recipe(RECIPES / "kohaku_xl_gamma_rev2.yaml")
    lacking3 = [IN04, IN02, IN00, OUT05, OUT_CONV]
    inputs = headers(recipe, anxl3=header("anxl3", without=lacking3), base8=header("base8", without=[IN04, CLIP_G]))
    with pytest.raises(RecipeError) as info:
        build_plan(recipe, inputs, arch="sdxl")
    message = str(info.value)
    assert "\n" not in message and "kohaku_xl_gamma_rev2.yaml: missing keys:" in message
    assert "anxl3 (/models/anxl3.safetensors) lacks 5 key(s), e.g." in message
    assert "base8 (/models/base8.safetensors) lacks 2 key(s)" in message
    assert "missing_keys: take_first" in message


def test_take_first_policy_uses_the_first_input_that_has_the_key():
    recipe = recipe_from({"x": "a + 0.5 * (b - c)", "m": {"method": "weighted_sum", "a": "x", "b": "b", "alpha": 0.3}},
                         output={"missing_keys": "take_first"})
    inputs = {"a": header("a"), "b": header("b", without=[IN04]), "c": header("c", without=[IN02])}
    plan = build_plan(recipe, inputs, arch="sdxl")
    keys = by_key(plan)
    assert keys[IN04].node == Load("a", IN04)
    assert keys[IN02].node == Call("weighted_sum", (Load("a", IN02), Load("b", IN02)), (("alpha", 0.3),))
    assert any("2 key(s) taken from the first model" in w for w in plan.warnings)


def test_shape_mismatches_reported_all_at_once():
    recipe = recipe_from({"m": "0.5 * a + 0.5 * b"}, models=("a", "b"))
    odd = header("b", shapes={IN00: (320, 9, 3, 3), IN02: (1,), OUT05: (2,), OUT_CONV: (3,)})
    with pytest.raises(RecipeError) as info:
        build_plan(recipe, {"a": header("a"), "b": odd}, arch="sdxl")
    message = str(info.value)
    assert "shape mismatch in 4 key(s)" in message
    assert f"{IN00} (a [320, 4, 3, 3], b [320, 9, 3, 3])" in message and "inpainting" in message


@pytest.mark.parametrize("declared", ["sd15", "sdxl"])
def test_declared_arch_against_inputs_names_each_file(declared):
    other = "sdxl" if declared == "sd15" else "sd15"
    names = {"sdxl": "SDXL", "sd15": "SD1.x"}
    recipe = recipe_from({"m": "0.5 * a + 0.5 * b"}, models=("a", "b"), arch=declared)
    for per_alias, wrong in (({}, ("a", "b")), ({"a": header("a", declared)}, ("b",))):
        found = headers(recipe, other, **per_alias)
        for build in (functools.partial(build_plan, recipe, found, arch=declared),
                      functools.partial(job_arch, recipe, found)):
            with pytest.raises(ArchError) as info:
                build()
            message = str(info.value)
            assert message.startswith(f"test.yaml: the recipe declares `arch: {declared}` ({names[declared]}) but ")
            assert "mix" not in message
            for alias in ("a", "b"):
                said = f"model '{alias}' (/models/{alias}.safetensors) is {names[other]}"
                assert (said in message) == (alias in wrong), message


def test_mixed_architectures_fail_before_planning():
    recipe = recipe_from({"m": "0.5 * a + 0.5 * b"}, models=("a", "b"))
    with pytest.raises(ArchError, match=r"inputs mix architectures: a is SDXL .*, b is SD1\.x \(/models/b"):
        build_plan(recipe, {"a": header("a"), "b": header("b", "sd15")}, arch="sdxl")
    declared = recipe_from({"m": "0.5 * a + 0.5 * b"}, models=("a", "b"), arch="sdxl")
    with pytest.raises(ArchError, match="the recipe is for SDXL but the inputs are SD1.x"):
        build_plan(declared, headers(declared, "sdxl"), arch="sd15")
    with pytest.raises(ArchError, match="unknown architecture"):
        build_plan(recipe, {"a": header("a"), "b": header("b")}, arch="sd3")


def test_vector_that_does_not_fit_the_inputs_arch():
    vector = [0.5] * 20
    recipe = recipe_from({"m": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": vector}}, models=("a", "b"))
    with pytest.raises(RecipeError, match=r"test\.yaml: steps\.m\.alpha: expected 26 values"):
        plan_for(recipe, "sd15")


def test_missing_input_header_and_unused_warnings():
    recipe = recipe_from({"spare": "b - c", "m": "a + 0.5 * (b - c)"})
    with pytest.raises(RecipeError, match="no input file for model"):
        build_plan(recipe, {"a": header("a")}, arch="sdxl")
    unused = recipe_from({"m": "a"}, models=("a", "b"))
    plan = build_plan(unused, {"a": header("a")}, arch="sdxl")
    assert plan.inputs == {"a": "a.safetensors"} and "model 'b' is not used" in plan.warnings[0]
