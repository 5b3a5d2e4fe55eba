"""The SDXL adapters we write load in diffusers' StableDiffusionXLPipeline.load_lora_weights (peft backend) with no
leftover keys, inject into every module we extracted, and the fused pipeline matches the tuned tiny model."""

from __future__ import annotations

import logging

import pytest

from mergekit_sdxl.arch.lora_names import lora_modules, select
from mergekit_sdxl.io.reader import open_checkpoint
from mergekit_sdxl.lora.extract import ExtractOptions, extract_lora
from mergekit_sdxl.lora.svd import RankRule

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from test_synth_models import load_tiny  # noqa: E402 - after the skips: it imports diffusers itself


@pytest.fixture(scope="module")
def tiny_pair(make_ckpt):
    base = make_ckpt("sdxl", seed=0, dtype="F32")
    tuned = make_ckpt(seed=1, like=base, delta="lowrank:4", dtype="F32")
    return base, tuned, load_tiny("sdxl", tuned), load_tiny("sdxl", base)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("fmt", ["kohya", pytest.param("peft", marks=pytest.mark.slow)])
def test_sdxl_adapter_loads_in_diffusers(tiny_pair, tmp_path, fmt):
    base_path, tuned_path, tuned, reference = tiny_pair
    lora = tmp_path / f"{fmt}.safetensors"
    options = ExtractOptions(rank=RankRule("fixed", 8), conv_rank=RankRule("fixed", 8), preset="attn+conv",
                             text_encoders="on", save_dtype="F32", fmt=fmt)
    extract_lora(base_path, tuned_path, lora, options)
    base = load_tiny("sdxl", base_path)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=base["vae"], text_encoder=base["text_encoder"], text_encoder_2=base["text_encoder_2"], tokenizer=None,
        tokenizer_2=None, unet=base["unet"], scheduler=diffusers.EulerDiscreteScheduler())
    collect = _Collect()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    for logger in loggers:
        logger.addHandler(collect)
    try:
        pipe.load_lora_weights(str(lora))  # raises on keys it cannot convert
    finally:
        for logger in loggers:
            logger.removeHandler(collect)
    assert not [m for m in collect.messages if "key" in m.lower()], collect.messages

    with open_checkpoint(base_path) as r:
        modules = select(lora_modules("sdxl", {k: r.info(k).shape for k in r.keys()}), "attn+conv")
    injected = sum(1 for name in ("unet", "text_encoder", "text_encoder_2")
                   for m in getattr(pipe, name).modules() if hasattr(m, "lora_A") and len(m.lora_A))
    assert injected == len(modules) == 1052

    pipe.fuse_lora()
    names = ("unet", "text_encoder", "text_encoder_2")
    fused_state = {name: getattr(pipe, name).state_dict() for name in names}
    tuned_state = {name: tuned[name].state_dict() for name in names}
    start_state = {name: reference[name].state_dict() for name in names}
    worst = 0.0
    for module in modules:
        component, _, path = module.diffusers.partition(".")
        if component == "text_encoder" and not hasattr(pipe.text_encoder, "text_model"):
            path = path.removeprefix("text_model.")  # transformers >= 5.6 CLIPTextModel has flat names
        state = fused_state[component]
        fused = state.get(f"{path}.weight", state.get(f"{path}.base_layer.weight")).float()
        want = tuned_state[component][f"{path}.weight"].float()
        start = start_state[component][f"{path}.weight"].float()
        worst = max(worst, float((fused - want).norm() / (want - start).norm()))
    assert worst <= 1e-5
