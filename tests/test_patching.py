"""engine.patching on tiny random Qwen2.5-VL / Qwen2-VL models built from configs (no download).

A patched model gives the unpatched model's log-probs and gradients (fp32, 1e-5);
token_logprobs_from_model equals log_softmax of the model's own logits, and goes through
engine.ops.linear_token_logprobs with no fallback (a broken op raises).
"""
import pytest
import torch

import engine
import engine.ops as ops
from engine import patching
from tests.tolerance import assert_matches_fp64

transformers = pytest.importorskip("transformers")

V = 300
IMAGE, VSTART, VEND, VIDEO = V - 3, V - 2, V - 1, V - 4


def tiny_qwen25_vl():
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),  # sums to head_dim / 2 = 8
            max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
        ),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1], window_size=56),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
    )
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()


def tiny_qwen2_vl():
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
            max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
        ),
        vision_config=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
    )
    return transformers.Qwen2VLForConditionalGeneration(cfg).eval()


def batch(device, sizes=((56, 84), (28, 56)), T=24):
    """Two sequences, one image each (uint8 pixels through engine.ops.patchify), left-padded second row."""
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, device=device) for h, w in sizes]
    pixel_values, grid_thw = ops.patchify(images)
    ids = torch.randint(0, V - 5, (len(images), T), device=device)
    mask = torch.ones_like(ids)
    for b, (t, h, w) in enumerate(grid_thw.tolist()):
        n = t * h * w // 4
        start = 2 + b  # row 1 has one pad token in front
        ids[b, start] = VSTART
        ids[b, start + 1 : start + 1 + n] = IMAGE
        ids[b, start + 1 + n] = VEND
        mask[b, :b] = 0
    mm_types = (ids == IMAGE).int()  # what the processor returns beside input_ids; M-RoPE needs it
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid_thw, mm_token_type_ids=mm_types)


def logits_logprobs(model, inputs, temperature=1.0):
    """The plain way: full logits, log_softmax, gather (and the entropy)."""
    out = model(**inputs, use_cache=False)
    z = out.logits[:, :-1].float() / temperature
    logsm = torch.log_softmax(z, -1)
    logp = logsm.gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_qwen25_vl()


def test_token_logprobs_from_model_matches_logits(model, device):
    m = model.to(device)
    inputs = batch(device)
    with torch.no_grad():
        logp, entropy = patching.token_logprobs_from_model(m, **inputs, temperature=0.7, return_entropy=True)
        ref_logp, ref_entropy = logits_logprobs(m, inputs, temperature=0.7)
    B, T = inputs["input_ids"].shape
    assert logp.shape == entropy.shape == (B, T - 1) and logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=1e-5)


def test_mm_token_type_ids_derived(model, device):
    m = model.to(device)
    inputs = batch(device)
    assert patching.mm_token_type_ids(m, inputs["input_ids"]).tolist() == inputs["mm_token_type_ids"].tolist()
    without = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        a = patching.token_logprobs_from_model(m, **without)
        b = patching.token_logprobs_from_model(m, **inputs)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_token_logprobs_from_model_text_only_and_grads(model, device):
    m = model.to(device)
    ids = torch.randint(0, V - 5, (3, 9), device=device)
    params = [m.lm_head.weight, m.model.language_model.layers[0].mlp.up_proj.weight]
    logp = patching.token_logprobs_from_model(m, input_ids=ids)
    g = torch.randn_like(logp)
    grads = torch.autograd.grad((logp * g).sum(), params)
    ref, _ = logits_logprobs(m, dict(input_ids=ids))
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("lm_head.weight", "up_proj.weight"), grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_patched_model_same_logprobs_and_grads(backend_name, device):
    torch.manual_seed(1)
    plain = tiny_qwen25_vl().to(device)
    patched = tiny_qwen25_vl().to(device)
    patched.load_state_dict(plain.state_dict())
    keys_before = list(patched.state_dict())
    weight_before = patched.model.visual.patch_embed.proj.weight
    assert patching.patch_model(patched) is patched
    # the same parameters, under the same names: checkpoints load and save unchanged
    assert list(patched.state_dict()) == keys_before
    assert patched.model.visual.patch_embed.proj.weight is weight_before
    assert [n for n, _ in patching.find_patch_embeds(patched)] == ["model.visual.patch_embed"]

    inputs = batch(device)
    g = torch.randn(inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] - 1, device=device)
    results = []
    for m, be in ((plain, "torch"), (patched, backend_name)):
        with engine.backend(be):
            logp = patching.token_logprobs_from_model(m, **inputs)
        (gw,) = torch.autograd.grad((logp * g).sum(), m.model.visual.patch_embed.proj.weight)
        results.append((logp, gw))
    (logp_a, gw_a), (logp_b, gw_b) = results
    torch.testing.assert_close(logp_b, logp_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw_b, gw_a, atol=1e-5, rtol=1e-4)


def test_patch_model_is_used_and_undone(model, device, monkeypatch):
    m = model.to(device)
    calls = []
    real = ops.patch_embed
    monkeypatch.setattr(ops, "patch_embed", lambda *a, **k: calls.append(1) or real(*a, **k))
    patching.patch_model(m)
    patching.patch_model(m)  # idempotent
    inputs = batch(device, sizes=((28, 28),), T=8)
    with torch.no_grad():
        a = patching.token_logprobs_from_model(m, **inputs)
    assert len(calls) == 1
    patching.unpatch_model(m)
    with torch.no_grad():
        b = patching.token_logprobs_from_model(m, **inputs)
    assert len(calls) == 1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_patch_qwen2_vl(device):
    torch.manual_seed(2)
    plain = tiny_qwen2_vl().to(device)
    patched = tiny_qwen2_vl().to(device)
    patched.load_state_dict(plain.state_dict())
    patching.patch_model(patched)
    inputs = batch(device)
    with torch.no_grad():
        a = patching.token_logprobs_from_model(plain, **inputs)
        b = patching.token_logprobs_from_model(patched, **inputs)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_op_errors_surface(model, device, monkeypatch):
    """token_logprobs_from_model calls engine.ops.linear_token_logprobs and nothing else: an op that
    fails to import or raises is an error, never a silent switch to the reference."""
    m = model.to(device)
    ids = torch.randint(0, V - 5, (2, 5), device=device)
    calls = []
    real = ops.linear_token_logprobs
    monkeypatch.setattr(ops, "linear_token_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        patching.token_logprobs_from_model(m, input_ids=ids)
    assert calls == [1]

    def broken(*a, **k):
        raise AttributeError("a bug inside the op")

    monkeypatch.setattr(ops, "linear_token_logprobs", broken)
    with pytest.raises(AttributeError, match="a bug inside the op"), torch.no_grad():
        patching.token_logprobs_from_model(m, input_ids=ids)
    # the op's module missing altogether: ImportError, not the reference
    monkeypatch.delattr(ops, "linear_token_logprobs")
    monkeypatch.setitem(ops._HOME, "linear_token_logprobs", "engine._no_such_module")
    with pytest.raises(ImportError), torch.no_grad():
        patching.token_logprobs_from_model(m, input_ids=ids)


def test_bad_input(model, device):
    with pytest.raises(ValueError, match="model .* has no Qwen-VL patch embedding"):
        patching.patch_model(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="model must have a Linear LM head"):
        patching.token_logprobs_from_model(torch.nn.Linear(3, 3), input_ids=torch.zeros(1, 4, dtype=torch.long))
    m = model.to(device)
    with pytest.raises(ValueError, match="input_ids must have 2 dims"):
        patching.token_logprobs_from_model(m, input_ids=torch.zeros(5, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="input_ids must hold at least 2 tokens"):
        patching.token_logprobs_from_model(m, input_ids=torch.zeros(2, 1, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="input_ids must have dtype"):
        patching.token_logprobs_from_model(m, input_ids=torch.zeros(2, 4, device=device))
    with pytest.raises(ValueError, match="temperature"):
        patching.token_logprobs_from_model(m, input_ids=torch.zeros(2, 4, dtype=torch.long, device=device), temperature=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_patched_module_matches_conv3d_in_each_dtype(device, dtype):
    # the module alone: fp32 pixel_values in (as the processor gives), the model's dtype out
    mod = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
    pe = mod.Qwen2_5_VisionPatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=40).to(device)
    pe = pe.to(dtype)
    x = ops.patchify(torch.randint(0, 256, (3, 56, 28), dtype=torch.uint8, device=device))[0]
    with torch.no_grad():
        want = pe(x)
        patching.patch_model(torch.nn.ModuleDict({"patch_embed": pe}))
        got = pe(x)
    xd, w = x.to(dtype).double(), pe.proj.weight.detach().double().reshape(40, -1)
    ref64 = torch.nn.functional.linear(xd, w)  # fp64 truth from the same (rounded) inputs
    assert got.dtype == want.dtype == dtype and got.shape == want.shape == (8, 40)
    # a dot product of K = 1176 terms: its rounding is relative to sum |x| |w| (the conditioning),
    # not to the result; fp32 sums K terms (k = 16 covers ~sqrt(K) growth), bf16/fp16 round the
    # fp32 sum once to the output dtype (k = 2)
    cond = float(torch.nn.functional.linear(xd.abs(), w.abs()).max())
    assert_matches_fp64("patched PatchEmbed", got, ref64, torch_out=want, dtype=dtype,
                        k=16 if dtype == torch.float32 else 2, scale=cond)
