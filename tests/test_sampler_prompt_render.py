"""A1111 prompt features end to end on a tiny SDXL model: editing, alternation, AND, spaced weights, embeddings
and `<lora:...>`, and what the PNG `parameters` record about them."""

from __future__ import annotations

import pytest
import torch

from mergekit_sdxl.errors import PromptError, UsageError
from mergekit_sdxl.sampler.models import ModelSlot, WeightSource
from mergekit_sdxl.sampler.pipeline import GenParams, Renderer


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def slot(tiny_sdxl):
    slot = ModelSlot()
    slot.load(WeightSource.from_file(tiny_sdxl))
    return slot


def _render(renderer, prompt, sampler="euler", steps=2, negative="lowres"):
    params = GenParams(prompt, negative, steps=steps, cfg=5.0, sampler=sampler, width=64, height=64)
    return renderer.sample(params, [3])


def test_editing_and_weights_render_as_a1111(slot):
    r = Renderer(slot.model, slot)
    cat, dog = _render(r, "a cat"), _render(r, "a dog")
    assert not torch.equal(cat, dog)
    assert torch.equal(_render(r, "a [cat:dog:0.0]"), dog)  # switched before step 1
    assert torch.equal(_render(r, "a [cat:dog:1.0]"), cat)  # never switched
    assert torch.equal(_render(r, "a (cat: 1.5)"), _render(r, "a (cat:1.5)"))  # spaced weight (A1111 >= 1.6)
    assert not torch.equal(_render(r, "a (cat: 1.5)"), _render(r, "a (cat)"))
    # A1111 compares its 0-based call count with the 1-based end step: with 3 steps, [cat:dog:1] uses "cat" for
    # calls 0 and 1 and "dog" for call 2, and so does [cat|dog] (entries end at 1: cat, 2: dog, 3: cat)
    edit = _render(r, "a [cat:dog:1]", steps=3)
    assert torch.equal(edit, _render(r, "a [cat|dog]", steps=3))
    assert not torch.equal(edit, _render(r, "a cat", steps=3)) and not torch.equal(edit, _render(r, "a dog", steps=3))
    assert torch.equal(_render(r, "a [cat:dog:1]"), cat)  # with 2 steps the switch comes after the last call


def test_second_order_samplers_count_model_calls(slot):
    # heun, 2 steps: A1111 schedules over 4 calls, so [cat:dog:0.5] switches after call 2 (the second step)
    r = Renderer(slot.model, slot)
    heun = _render(r, "a [cat:dog:0.5]", sampler="heun")
    assert torch.equal(heun, _render(r, "a [cat:dog:2]", sampler="heun"))
    assert not torch.equal(heun, _render(r, "a [cat:dog:1]", sampler="heun"))


def test_and_combines_predictions(slot):
    r = Renderer(slot.model, slot)
    both = _render(r, "a cat AND a dog")
    assert not torch.equal(both, _render(r, "a cat")) and not torch.equal(both, _render(r, "a dog"))
    # weight 0 on the second part leaves the first part's guidance alone, and A1111's sum
    # u + s (c1 - u) + s (c2 - u) equals a single cond at 2 s when c1 == c2 -- both up to rounding: a batch of 3
    # conds runs other GEMM blocks than a batch of 2 (AVX-512/AMX kernels differ by ~1e-4 here after two steps).
    # Rounding is measured against what a wrong weight would change (`both` vs the single prompt).
    single = _render(r, "a cat")
    effect = float((both - single).abs().max())
    zero = _render(r, "a cat AND a dog:0")
    twice = Renderer(slot.model, slot).sample(GenParams("a cat AND a cat", "lowres", steps=2, cfg=2.5,
                                                        sampler="euler", width=64, height=64), [3])
    assert effect > 0.1
    assert float((zero - single).abs().max()) <= 1e-3 * effect
    assert float((twice - single).abs().max()) <= 1e-3 * effect


def test_prompt_errors_name_the_position(slot):
    r = Renderer(slot.model, slot)
    with pytest.raises(PromptError, match="'1.2.3' at character 10"):
        _render(r, "a cat (dog:1.2.3)")
    with pytest.raises(UsageError, match="--lora-dir"):
        _render(r, "a cat <lora:style:0.8>")


def _embedding(folder, name, vectors, split):
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    save_file({"clip_l": vectors[:, :split].contiguous(), "clip_g": vectors[:, split:].contiguous()},
              str(folder / f"{name}.safetensors"))


def test_embedding_changes_the_image_and_is_recorded(slot, tmp_path):
    te1 = slot.model.modules["text_encoder"].config.hidden_size
    te2 = slot.model.modules["text_encoder_2"].config.hidden_size
    # the tiny model's widths stand in for 768 + 1280; one SD1.5-width file is skipped (its name stays text)
    _embedding(tmp_path / "emb", "shiny", torch.randn(2, te1 + te2, generator=torch.Generator().manual_seed(0)), te1)
    torch.save({"string_to_param": {"*": torch.randn(1, te1)}}, tmp_path / "emb" / "narrow.pt")
    plain = Renderer(slot.model, slot)
    r = Renderer(slot.model, slot, embeddings_dir=tmp_path / "emb")
    assert torch.equal(_render(r, "a cat"), _render(plain, "a cat"))
    assert not torch.equal(_render(r, "a shiny cat"), _render(plain, "a shiny cat"))
    fields = r.cell_fields(GenParams("a shiny cat", "lowres"))
    assert fields["TI hashes"].startswith("shiny: ") and len(fields["TI hashes"]) == len("shiny: ") + 12
    assert "TI hashes" not in r.cell_fields(GenParams("a unknown cat", "lowres"))
    assert set(r.embeddings.embeddings) == {"shiny"} and "narrow" in r.embeddings.skipped
    assert torch.equal(_render(r, "a narrow cat"), _render(plain, "a narrow cat"))


def _tiny_lora(path, checkpoint):
    from safetensors.torch import save_file

    from mergekit_sdxl.arch.lora_names import lora_modules
    from mergekit_sdxl.io.reader import open_checkpoint

    with open_checkpoint(checkpoint) as reader:
        shapes = {k: tuple(reader.info(k).shape) for k in reader.keys()}
    g = torch.Generator().manual_seed(1)
    tensors = {}
    linear = [m for m in lora_modules("sdxl", shapes) if len(shapes.get(m.key, ())) == 2 and m.part == -1
              and "attn" in m.name]
    chosen = [m for m in linear if not m.is_text][:6] + [m for m in linear if m.is_text][:6]
    for m in chosen:
        out_dim, in_dim = shapes[m.key]
        tensors[f"{m.name}.lora_down.weight"] = torch.randn(4, in_dim, generator=g) * 0.3
        tensors[f"{m.name}.lora_up.weight"] = torch.randn(out_dim, 4, generator=g) * 0.3
        tensors[f"{m.name}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))


def test_lora_tag_changes_the_image_restores_and_is_recorded(slot, tiny_sdxl, tmp_path):
    (tmp_path / "loras").mkdir()
    _tiny_lora(tmp_path / "loras" / "style.safetensors", tiny_sdxl)
    r = Renderer(slot.model, slot, lora_dir=tmp_path / "loras")
    before = _render(r, "a cat")
    with_lora = _render(r, "a cat <lora:style:1>")
    assert not torch.equal(with_lora, before)
    assert not torch.equal(_render(r, "a cat <lora:style:1:0>"), with_lora)  # UNet multiplier 0: TE only
    assert not torch.equal(_render(r, "a cat <lora:style:0:1>"), with_lora)  # TE multiplier 0: UNet only
    assert torch.equal(_render(r, "a cat <lora:style:1:1>"), with_lora)  # <lora:NAME:TE:UNET>, UNET defaults to TE
    assert torch.equal(_render(r, "a cat <lora:style:te=1:unet=1>"), with_lora)
    assert torch.equal(_render(r, "a cat"), before)  # weights restored bit for bit
    fields = r.cell_fields(GenParams("a cat <lora:style:0.5>", "lowres"))
    assert fields["Lora hashes"].startswith("style: ") and len(fields["Lora hashes"]) == len("style: ") + 12
    r.set_loras([])
    assert torch.equal(_render(r, "a cat"), before)


def test_lora_tag_lbw_block_weights(slot, tiny_sdxl, tmp_path):
    from mergekit_sdxl.errors import PromptError

    (tmp_path / "loras").mkdir()
    _tiny_lora(tmp_path / "loras" / "style.safetensors", tiny_sdxl)  # UNet modules in IN04, text-encoder ones
    r = Renderer(slot.model, slot, lora_dir=tmp_path / "loras")
    before, full = _render(r, "a cat"), _render(r, "a cat <lora:style:1>")
    assert torch.equal(_render(r, "a cat <lora:style:1:lbw=NONE>"), before)  # every block 0
    assert torch.equal(_render(r, "a cat <lora:style:1:lbw=ALL>"), full)  # IN04 and BASE are 1
    te_only = _render(r, "a cat <lora:style:1:0>")
    assert torch.equal(_render(r, "a cat <lora:style:1:lbw=IND>"), te_only)  # BASE 1, IN04 0 (the 17 layout)
    assert torch.equal(_render(r, "a cat <lora:style:1:lbw=INS>"), full)  # BASE, IN01, IN02, IN04 1
    assert torch.equal(_render(r, "a cat <lora:style:1:lbw=1,0,1,1,1,1,1,1,1,1,1,1>"), te_only)  # 12: IN04 = 0
    assert not torch.equal(te_only, full)
    with pytest.raises(PromptError, match="preset 'MIDDLE'"):
        _render(r, "a cat <lora:style:1:lbw=MIDDLE>")
