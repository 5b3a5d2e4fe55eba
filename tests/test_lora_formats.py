"""Every adapter format we read, against closed forms and against lycoris-lora's module forward pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mergekit_sdxl.io.reader import open_checkpoint
from mergekit_sdxl.io.writer import save_file
from mergekit_sdxl.lora.bake import AdapterSet, AdapterSpec

LINEAR = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
LINEAR_NAME = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
CONV = "model.diffusion_model.input_blocks.4.0.in_layers.2.weight"
CONV_NAME = "lora_unet_input_blocks_4_0_in_layers_2"
NORM = "model.diffusion_model.input_blocks.4.1.norm.weight"
NORM_NAME = "lora_unet_input_blocks_4_1_norm"


@pytest.fixture(scope="module")
def ckpt(tiny_sdxl):
    with open_checkpoint(tiny_sdxl) as r:
        shapes = {k: r.info(k).shape for k in r.keys()}
        weights = {k: r.read(k).float() for k in (LINEAR, CONV, NORM, NORM.replace("weight", "bias"))}
    return shapes, weights


def _delta(ckpt, tmp_path, tensors, key, weight=None, **spec):
    path = tmp_path / "adapter.safetensors"
    save_file(tensors, path, overwrite=True)
    with AdapterSet([AdapterSpec(str(path), **spec)], "sdxl", ckpt[0]) as aset:
        return aset.delta(key, weight=weight)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


# ------------------------------------------------------------------ closed forms


ALPHAS = [None, torch.tensor(2.0), torch.tensor([2.0]), torch.tensor(2), torch.tensor(2.0).half()]


@pytest.mark.parametrize("alpha", ALPHAS)
def test_lora_linear_alpha_forms(ckpt, tmp_path, alpha):
    down, up = _rand(4, 32), _rand(32, 4)
    tensors = {f"{LINEAR_NAME}.lora_down.weight": down, f"{LINEAR_NAME}.lora_up.weight": up}
    if alpha is not None:
        tensors[f"{LINEAR_NAME}.alpha"] = alpha
    scale = 1.0 if alpha is None else 2.0 / 4
    torch.testing.assert_close(_delta(ckpt, tmp_path, tensors, LINEAR), scale * up @ down)


def test_peft_and_diffusers_names(ckpt, tmp_path):
    down, up = _rand(4, 32), _rand(32, 4)
    peft = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": down,
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": up}
    torch.testing.assert_close(_delta(ckpt, tmp_path, peft, LINEAR), up @ down)
    kohya_diffusers = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
                       "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": up}
    torch.testing.assert_close(_delta(ckpt, tmp_path, kohya_diffusers, LINEAR), up @ down)


def test_locon_conv_and_tucker(ckpt, tmp_path):
    down, up, mid = _rand(4, 16, 3, 3), _rand(32, 4, 1, 1), _rand(4, 4, 3, 3)
    tensors = {f"{CONV_NAME}.lora_down.weight": down, f"{CONV_NAME}.lora_up.weight": up,
               f"{CONV_NAME}.alpha": torch.tensor(1.0)}
    expect = (up.reshape(32, 4) @ down.reshape(4, -1)).reshape(32, 16, 3, 3) / 4
    torch.testing.assert_close(_delta(ckpt, tmp_path, tensors, CONV), expect)
    d1 = _rand(4, 16, 1, 1, seed=5)
    tucker = {f"{CONV_NAME}.lora_down.weight": d1, f"{CONV_NAME}.lora_up.weight": up,
              f"{CONV_NAME}.lora_mid.weight": mid, f"{CONV_NAME}.alpha": torch.tensor(1.0)}
    expect = torch.zeros(32, 16, 3, 3)
    for i in range(32):
        for j in range(16):
            expect[i, j] = sum(mid[m, n] * up[i, m, 0, 0] * d1[n, j, 0, 0] for m in range(4) for n in range(4)) / 4
    torch.testing.assert_close(_delta(ckpt, tmp_path, tucker, CONV), expect, rtol=1e-4, atol=1e-5)


def test_loha_closed_form(ckpt, tmp_path):
    w = {p: _rand(*s, seed=i) for i, (p, s) in enumerate(
        [("hada_w1_a", (32, 4)), ("hada_w1_b", (4, 32)), ("hada_w2_a", (32, 4)), ("hada_w2_b", (4, 32))])}
    tensors = {f"{LINEAR_NAME}.{p}": t for p, t in w.items()} | {f"{LINEAR_NAME}.alpha": torch.tensor(1.0)}
    expect = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) / 4
    torch.testing.assert_close(_delta(ckpt, tmp_path, tensors, LINEAR), expect)


@pytest.mark.parametrize("layout", ["full_full", "w1_full_w2_lowrank", "both_lowrank"])
def test_lokr_closed_form(ckpt, tmp_path, layout):
    w1, w2 = _rand(4, 4), _rand(8, 8, seed=1)
    tensors = {f"{LINEAR_NAME}.alpha": torch.tensor(2.0)}
    scale = 1.0  # both full: alpha ignored
    if layout == "full_full":
        tensors |= {f"{LINEAR_NAME}.lokr_w1": w1, f"{LINEAR_NAME}.lokr_w2": w2}
    else:
        a, b = _rand(8, 2, seed=2), _rand(2, 8, seed=3)
        w2 = a @ b
        tensors |= {f"{LINEAR_NAME}.lokr_w2_a": a, f"{LINEAR_NAME}.lokr_w2_b": b}
        scale = 2.0 / 2
        if layout == "both_lowrank":
            c, d = _rand(4, 2, seed=4), _rand(2, 4, seed=5)
            w1 = c @ d
            tensors |= {f"{LINEAR_NAME}.lokr_w1_a": c, f"{LINEAR_NAME}.lokr_w1_b": d}
        else:
            tensors[f"{LINEAR_NAME}.lokr_w1"] = w1
    torch.testing.assert_close(_delta(ckpt, tmp_path, tensors, LINEAR), scale * torch.kron(w1, w2))


def test_full_and_norm(ckpt, tmp_path):
    diff = _rand(32, 32)
    torch.testing.assert_close(_delta(ckpt, tmp_path, {f"{LINEAR_NAME}.diff": diff}, LINEAR, strength=0.5), 0.5 * diff)
    wn, bn = _rand(32), _rand(32, seed=9)
    tensors = {f"{NORM_NAME}.w_norm": wn, f"{NORM_NAME}.b_norm": bn}
    torch.testing.assert_close(_delta(ckpt, tmp_path, tensors, NORM), wn)
    torch.testing.assert_close(_delta(ckpt, tmp_path, tensors, NORM.replace("weight", "bias")), bn)


def test_dora_needs_weight_and_is_linear_in_strength(ckpt, tmp_path):
    w = ckpt[1][LINEAR]
    down, up = _rand(4, 32), _rand(32, 4)
    m = w.norm(dim=1, keepdim=True) * 1.1
    tensors = {f"{LINEAR_NAME}.lora_down.weight": down, f"{LINEAR_NAME}.lora_up.weight": up,
               f"{LINEAR_NAME}.dora_scale": m}
    merged = w + up @ down
    expect = merged * (m / merged.norm(dim=1, keepdim=True)) - w
    torch.testing.assert_close(_delta(ckpt, tmp_path, tensors, LINEAR, weight=w), expect, rtol=1e-5, atol=1e-6)
    half = _delta(ckpt, tmp_path, tensors, LINEAR, weight=w, strength=0.5)
    torch.testing.assert_close(half, 0.5 * expect, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ against lycoris-lora's module forward pass

lycoris = pytest.importorskip("lycoris.modules")


def _lycoris_module(cls, org, seed=0, **kwargs):
    module = cls("x", org, 1.0, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name != "dora_scale":
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def _org(ckpt, key):
    w = ckpt[1][key]
    if w.dim() == 2:
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    else:
        layer = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


CASES = [
    ("locon", LINEAR, {}), ("locon", CONV, {}), ("locon", CONV, {"use_tucker": True}),
    ("locon", LINEAR, {"weight_decompose": True}),
    ("loha", LINEAR, {}), ("loha", CONV, {}), ("loha", CONV, {"use_tucker": True}),
    ("lokr", LINEAR, {}), ("lokr", LINEAR, {"decompose_both": True, "factor": 4}),
    ("lokr", CONV, {"factor": 4}), ("lokr", CONV, {"use_tucker": True, "factor": 4}),
    ("lokr", LINEAR, {"full_matrix": True, "factor": 4}), ("loha", LINEAR, {"weight_decompose": True}),
]


@pytest.mark.parametrize(("algo", "key", "kwargs"), CASES, ids=lambda v: str(v)[:40])
def test_matches_lycoris_forward(ckpt, tmp_path, algo, key, kwargs):
    cls = {"locon": lycoris.LoConModule, "loha": lycoris.LohaModule, "lokr": lycoris.LokrModule}[algo]
    org = _org(ckpt, key)
    rank = 2 if algo == "lokr" else 4
    module = _lycoris_module(cls, org, lora_dim=rank, alpha=1.0, **kwargs)
    name = LINEAR_NAME if key == LINEAR else CONV_NAME
    tensors = {f"{name}.{k}": v.detach().clone().contiguous() for k, v in module.custom_state_dict().items()}
    ours = _delta(ckpt, tmp_path, tensors, key, weight=ckpt[1][key])
    x = torch.randn(3, org.weight.shape[1]) if key == LINEAR else torch.randn(2, org.weight.shape[1], 6, 6)
    with torch.no_grad():
        reference = module.forward(x) - org(x)
        mine = F.linear(x, ours) if key == LINEAR else F.conv2d(x, ours, padding=1)
    torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_merge_to_double_scales(ckpt, tmp_path, algo):
    """lycoris-lora 4.1.3's get_merged_weight/merge_to bake LoHa and LoKr at (alpha/r)² instead of alpha/r:
    get_weight() already multiplies by self.scale and get_diff_weight() multiplies by it again. Its forward pass
    (what every UI applies at inference) uses alpha/r once; we match the forward pass, so merge_to is the outlier."""
    cls = lycoris.LohaModule if algo == "loha" else lycoris.LokrModule
    org = _org(ckpt, LINEAR)
    module = _lycoris_module(cls, org, lora_dim=4 if algo == "loha" else 2, alpha=1.0,
                             **({"decompose_both": True, "factor": 4} if algo == "lokr" else {}))
    tensors = {f"{LINEAR_NAME}.{k}": v.detach().clone().contiguous() for k, v in module.custom_state_dict().items()}
    ours = _delta(ckpt, tmp_path, tensors, LINEAR)
    with torch.no_grad():
        merged, _ = module.get_merged_weight(multiplier=1.0)
        x = torch.eye(32)
        forward_delta = (module.forward(x) - org(x)).T
    torch.testing.assert_close(ours, forward_delta, rtol=1e-4, atol=1e-5)
    merge_delta = merged - ckpt[1][LINEAR]
    torch.testing.assert_close(merge_delta, module.scale * ours, rtol=1e-4, atol=1e-5)
    assert module.scale != 1 and not torch.allclose(merge_delta, ours, rtol=1e-3, atol=1e-4)
