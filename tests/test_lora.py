"""LoRA (diffusers + peft) on quantized models: a float branch beside the quantized base, fake-quant and converted;
UNet (SD), SD3 and Flux transformers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import diffquant
from diffquant import QuantConfig
from diffquant.lora import FUSE_CONVERTED, lora_layers
from diffquant.nn import QuantLinear

from tinyutil import PROMPTS, calibration_config

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CONV = "down_blocks.0.resnets.0.conv1"


def unet_copy(pipe):
    """The pipeline around a deep copy of its UNet (the other components, which no test changes, shared)."""
    return type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})


@pytest.fixture(scope="module")
def models(tiny_pipes):
    fake = unet_copy(tiny_pipes["sd"])
    cfg = QuantConfig(method="rtn", wbits=8, abits=8, calibration=calibration_config(num_prompts=2, num_inference_steps=3))
    diffquant.quantize(fake, cfg, calibration=PROMPTS[:2], progress=False)
    return {"fake": fake, "converted": diffquant.convert(unet_copy(fake), progress=False)}


def unet_inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(2, 4, 16, 16, generator=g), timestep=torch.tensor(500.0),
                encoder_hidden_states=torch.randn(2, 16, 32, generator=g), return_dict=False)


def run(unet, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return unet(**unet_inputs(seed))[0]


def targets(unet) -> list[str]:
    return [n for n, _ in unet.named_modules() if n.endswith(ATTENTION)] + [CONV]


def random_lora(unet, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """diffusers' LoRA state dict (``<module>.lora_A/B.weight``) of random low-rank weights for ``targets``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in targets(unet):
        m = unet.get_submodule(name)
        if name == CONV:
            a, b = (rank, m.in_channels, *m.kernel_size), (m.out_channels, rank, 1, 1)
        else:
            a, b = (rank, m.in_features), (m.out_features, rank)
        sd[f"{name}.lora_A.weight"] = torch.randn(*a, generator=g) * 0.1
        sd[f"{name}.lora_B.weight"] = torch.randn(*b, generator=g) * 0.1
    return sd


def lora_delta(wrapper, x: torch.Tensor, adapter: str) -> torch.Tensor:
    return wrapper.lora_B[adapter](wrapper.lora_A[adapter](x)) * wrapper.scaling[adapter]


@pytest.mark.parametrize("kind", ["fake", "converted"])
def test_lora_runs_in_float_beside_the_quantized_base(models, kind, tmp_path):
    pipe = unet_copy(models[kind])
    unet = pipe.unet
    names = targets(unet)
    bases = {n: unet.get_submodule(n) for n in names}
    copies = {n: copy.deepcopy(m) for n, m in bases.items()}
    before = run(unet)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=random_lora(unet))
    pipe.load_lora_weights(tmp_path, adapter_name="style")

    layers = lora_layers()
    for n in names:  # peft wrapped the very same quantized layer: nothing re-quantized
        wrapper = unet.get_submodule(n)
        assert type(wrapper) is layers[type(bases[n])] and wrapper.base_layer is bases[n], n
    seen = {}
    hooks = [unet.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0], o)))
             for n in (names[0], CONV)]
    with_lora = run(unet)
    for h in hooks:
        h.remove()
    assert (with_lora - before).abs().max() > 1e-2
    with torch.no_grad():
        for n, (x, out) in seen.items():
            base_out = bases[n](x)
            assert torch.equal(base_out, copies[n](x)), n  # the base computes exactly what the quantized layer did
            torch.testing.assert_close(out, base_out + lora_delta(unet.get_submodule(n), x, "style"), rtol=1e-5, atol=1e-5)
        if kind == "fake":  # and that is quantized: input fake quantization, then the grid weight
            x, _ = seen[names[0]]
            layer = bases[names[0]]
            assert torch.equal(base_out := layer(x), F.linear(layer.input_quantizer(x), layer.weight, layer.bias))
            assert not torch.equal(base_out, F.linear(x, layer.weight, layer.bias))

    pipe.set_adapters(["style"], adapter_weights=[0.5])
    half = run(unet)
    assert (half - before).abs().max() > 1e-3 and (half - with_lora).abs().max() > 1e-3
    pipe.unload_lora_weights()
    assert all(unet.get_submodule(n) is bases[n] for n in names)
    assert torch.equal(run(unet), before)


def test_fuse_requantizes_on_fake_quant_and_is_refused_on_converted(models, tmp_path):
    pipe = unet_copy(models["fake"])
    unet = pipe.unet
    before = run(unet)
    weights = {n: unet.get_submodule(n).weight.clone() for n in targets(unet)}
    unet.load_lora_adapter(random_lora(unet), prefix=None, adapter_name="style")
    unfused = run(unet)
    with pytest.raises(ValueError, match="unload_lora_weights"):
        diffquant.save(pipe, tmp_path / "q")

    pipe.fuse_lora()
    fused = run(unet)
    for n, w in weights.items():
        base = unet.get_submodule(n).base_layer
        assert not torch.equal(base.weight, w), n
        assert torch.equal(base.weight_quantizer.dequantize(base.saved_weight_codes()), base.weight), n  # on the grid
    # fusing quantizes the LoRA delta: close to the unfused LoRA, far from no LoRA
    assert (fused - unfused).norm() < 0.5 * (before - unfused).norm()
    pipe.unfuse_lora()
    assert all(torch.equal(unet.get_submodule(n).base_layer.weight, w) for n, w in weights.items())
    assert torch.equal(run(unet), unfused)

    pipe.fuse_lora()
    pipe.unload_lora_weights()  # a fused, unloaded model is a plain quantized model again
    assert isinstance(unet.get_submodule(targets(unet)[0]), QuantLinear)
    torch.testing.assert_close(run(unet), fused, rtol=0, atol=0)

    converted = unet_copy(models["converted"])
    converted.unet.load_lora_adapter(random_lora(converted.unet), prefix=None, adapter_name="style")
    with pytest.raises(ValueError, match="converted"):
        converted.fuse_lora()
    assert FUSE_CONVERTED.startswith("fuse_lora")


def test_peft_adapter_trains_on_fake_quant_and_loads_on_converted(models):
    fake, converted = copy.deepcopy(models["fake"].unet), copy.deepcopy(models["converted"].unet)
    base_state = {k: v.clone() for k, v in fake.state_dict().items()}
    torch.manual_seed(0)
    fake.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(ATTENTION)))
    trainable = {n: p for n, p in fake.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    start = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    target = torch.randn_like(run(fake), generator=torch.Generator().manual_seed(1))
    F.mse_loss(fake(**unet_inputs())[0], target).backward()
    opt.step()
    assert all(not torch.equal(p, start[n]) for n, p in trainable.items() if ".lora_B." in n)  # B starts at 0
    after = {k.replace(".base_layer", ""): v for k, v in fake.state_dict().items() if ".lora_" not in k}
    assert after.keys() == base_state.keys()
    assert all(torch.equal(after[k], v) for k, v in base_state.items())  # the quantized base is untouched

    lora = get_peft_model_state_dict(fake)
    assert lora and all(".lora_" in k for k in lora)
    no_lora = run(converted)
    converted.load_lora_adapter(lora, prefix=None, adapter_name="trained")
    out, ref = run(converted), run(fake)
    assert (out - no_lora).abs().max() > 1e-3
    assert ((out - ref).norm() / ref.norm()) < 0.05  # integer kernels vs fake quantization, LoRA on both


def test_every_lora_config_maps_diffquant_layers_and_variants_are_refused(models):
    assert LoraConfig()._custom_modules == lora_layers()
    diffquant.lora.install()  # peft is imported: registers at once, idempotent
    assert LoraConfig(r=2)._custom_modules == lora_layers()
    unet = copy.deepcopy(models["fake"].unet)
    with pytest.raises(ValueError, match="plain LoRA only"):
        unet.add_adapter(LoraConfig(r=2, use_dora=True, target_modules=["to_q"]))


@pytest.mark.slow
def test_import_diffquant_leaves_peft_unimported_until_used():
    """The import hook: no peft import cost for models that never see a LoRA, the mapping once peft loads."""
    import subprocess
    import sys

    code = ("import sys, diffquant; assert 'peft' not in sys.modules, 'peft imported'; import peft; "
            "from diffquant.lora import lora_layers; assert peft.LoraConfig()._custom_modules == lora_layers()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# --- SD3 (MMDiT) and Flux transformers: the same float branch, loaded through each pipeline's own LoRA loader ---
TRANSFORMER_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_k_proj", "attn.to_out.0", "ff.net.2", "proj_out")


@pytest.fixture(scope="module")
def transformers(tiny_pipes):
    from diffquant.models.tiny import tiny_flux_pipeline

    out = {}
    for family, pipe in (("sd3", tiny_pipes["sd3"]), ("flux", tiny_flux_pipeline(0))):
        fake = type(pipe)(**{**pipe.components, "transformer": copy.deepcopy(pipe.transformer)})
        cfg = QuantConfig(method="rtn", wbits=8, abits=8, calibration=calibration_config(num_prompts=2, num_inference_steps=2))
        diffquant.quantize(fake, cfg, calibration=PROMPTS[:2], progress=False)
        out[family] = {"fake": fake, "converted": diffquant.convert(transformer_copy(fake), progress=False)}
    return out


def transformer_copy(pipe):
    return type(pipe)(**{**pipe.components, "transformer": copy.deepcopy(pipe.transformer)})


def run_transformer(transformer) -> torch.Tensor:
    from diffquant.models.adapters import get_adapter

    adapter = get_adapter(transformer)
    with torch.no_grad():
        return adapter.call(adapter.example_inputs(batch=1, seq_len=8))


def transformer_lora(transformer, rank: int = 4) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA (``transformer.<module>.lora_A/B.weight``) of random low-rank weights."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, m in transformer.named_modules():
        if name.endswith(TRANSFORMER_TARGETS):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.1
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.1
    return sd


@pytest.mark.parametrize("kind", ["fake", "converted"])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_on_quantized_transformers_loads_switches_and_unloads_exactly(transformers, family, kind):
    pipe = transformer_copy(transformers[family][kind])
    t = pipe.transformer
    lora = transformer_lora(t)
    names = [k[len("transformer."):-len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight")]
    bases = {n: t.get_submodule(n) for n in names}
    assert all(type(b).__name__ == ("QuantLinear" if kind == "fake" else "IntLinear") for b in bases.values())
    before = run_transformer(t)
    if family == "flux" and kind == "converted":  # the Flux loader's zero-padding of wider LoRAs needs float weights
        wide = dict(lora)
        key = f"transformer.{names[0]}.lora_A.weight"
        wide[key] = torch.cat([wide[key], wide[key][:, :1]], dim=1)
        with pytest.raises(ValueError, match="widening LoRAs"):
            pipe.load_lora_weights(wide, adapter_name="wide")
        assert all(t.get_submodule(n) is bases[n] for n in names)
    pipe.load_lora_weights(lora, adapter_name="style")
    assert all(t.get_submodule(n).base_layer is bases[n] for n in names)  # nothing re-quantized
    with_lora = run_transformer(t)
    assert (with_lora - before).abs().max() > 1e-2
    pipe.set_adapters(["style"], adapter_weights=[0.5])
    half = run_transformer(t)
    assert (half - before).abs().max() > 1e-3 and (half - with_lora).abs().max() > 1e-3
    if kind == "fake":
        pipe.fuse_lora()
        fused = run_transformer(t)
        assert (fused - half).norm() < 0.5 * (before - half).norm()  # the delta quantized onto the layer's grid
        pipe.unfuse_lora()
        assert torch.equal(run_transformer(t), half)
    else:
        with pytest.raises(ValueError, match="converted"):
            pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert all(t.get_submodule(n) is bases[n] for n in names)
    assert torch.equal(run_transformer(t), before)
