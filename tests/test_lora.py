"""LoRA through PEFT (pebr/model/lora.py, --lora-rank): the reference is the base bit for bit, the
adapters' gradient is autograd's on an unfused fp64 path, the merged folder is the adapted model,
checkpoints load in PEFT and transformers, a killed run resumes exactly, and bad settings say why.
(The 2-rank FSDP2 LoRA step against the 1-rank one is in tests/test_distributed.py.)"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("peft")  # pinned in requirements; a machine that installs nothing may lack it

import engine.reference as ref_ops  # noqa: E402
from pebr import train
from pebr.data.tasks import generate_items
from pebr.model.context_limits import text_only_policy
from pebr.model.forward import image_features
from pebr.model.lora import (
    ADAPTER_DIR,
    adapters_disabled,
    add_lora,
    merged_state_dict,
    target_pattern,
)
from pebr.model.policy import build_tiny_policy, load_policy
from pebr.model.shared_prefix import shared_prefix_logprobs
from pebr.recipe import config as C
from pebr.recipe.builder import load_trained_policy
from pebr.rollout.hf_engine import generate_rollouts
from pebr.run.checkpoint import Checkpointer, load_trainer_state
from pebr.run.distributed import World
from pebr.run.metrics_log import read_metrics
from pebr.trainers.grpo import GRPOTrainer

MICRO = ["-n", "2", "--rollout-batch", "2", "--micro-batch", "4", "--max-new-tokens", "12", "--sampling-items", "4",
         "--sampling-k", "2", "--split", "all", "--no-progress", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def base_folder(tiny_folder):
    """The base the adapters adapt: the tiny policy's folder (tests/conftest.py)."""
    return tiny_folder


def _cfg(**kw):
    base = dict(group_size=2, rollout_batch=4, mini_batch=4, micro_batch=8, max_new_tokens=10, kl_coef=0.05,
                lr=1e-3, progress=False, temperature=1.0, top_p=1.0, warmup_steps=0)
    base.update(kw)
    cfg = dataclasses.replace(C.preset("tiny", stage=1), **base)
    return dataclasses.replace(cfg, lora=C.LoRAConfig(rank=4, alpha=8.0))


def _randomize_adapters(model, seed: int):
    """B starts at zero (the adapted model is the base): give both factors random values, so that the
    adapters change what the model computes and their gradients are not the zero-B special case."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))


def _rollouts(policy, items, *, n=2, max_new_tokens=10):
    torch.manual_seed(0)
    ro = generate_rollouts(policy, items, n=n, temperature=1.0, max_new_tokens=max_new_tokens)
    L = ro.prompt_len  # responses of different lengths, as end-of-turn tokens would cut them
    for row in range(len(ro.texts)):
        k = 1 + (3 * row + 2) % max_new_tokens
        ro.response_mask[row, k:] = 0
        ro.attention_mask[row, L + k:] = 0
        ro.num_tokens[row] = k
    return ro


def _trainer(cfg, policy, items, tmp_path, name="run"):
    return GRPOTrainer(cfg, policy=policy, reference=None, items=items, reward_fn=None, run_dir=str(tmp_path / name),
                       init_model=None, world=World())


def test_target_pattern_and_bad_settings():
    import re

    pat = re.compile(target_pattern())
    assert pat.fullmatch("model.language_model.layers.3.self_attn.q_proj")
    assert pat.fullmatch("model.language_model.layers.0.mlp.down_proj")
    assert not pat.fullmatch("model.visual.blocks.0.mlp.down_proj")  # the vision MLP has the same names
    assert not pat.fullmatch("lm_head") and not pat.fullmatch("model.language_model.embed_tokens")
    assert re.fullmatch(target_pattern(vision=True), "model.visual.blocks.1.attn.qkv")
    for bad in (dict(rank=0), dict(rank=4, alpha=0.0), dict(rank=4, dropout=1.0), dict(rank=4, targets=("lm_head",)),
                dict(rank=4, targets=())):
        with pytest.raises(ValueError):
            C.LoRAConfig(**bad)
    with pytest.raises(SystemExit, match="needs --model"):  # stage 0 from random init: nothing to adapt
        train.main(["--stage", "0", "--lora-rank", "4", "--max-steps", "1", "--no-progress", "--output-dir", "/nonexistent-x"])


def test_only_adapters_train_and_head_stays_frozen(base_folder):
    cfg = _cfg()
    policy = load_trained_policy(cfg, World(), init_model=base_folder, latest=None)
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and "language_model.layers." in n for n in trainable)
    head = policy.model.get_output_embeddings()
    assert not head.weight.requires_grad and type(head) is torch.nn.Linear  # full-rank, not adapted
    assert all(not p.requires_grad for p in policy.model.model.visual.parameters())  # vision frozen by default
    with_vision = load_trained_policy(dataclasses.replace(cfg, lora=C.LoRAConfig(rank=4, vision=True)), World(),
                                      init_model=base_folder, latest=None)
    adapted = {n.split(".lora_")[0] for n, p in with_vision.model.named_parameters() if p.requires_grad}
    blocks = len(with_vision.model.model.visual.blocks)
    assert sum("visual.blocks." in n for n in adapted) == 5 * blocks  # qkv, proj, gate, up, down per block
    assert not any("merger" in n or "patch_embed" in n for n in adapted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_with_adapters_off_is_the_base_bit_for_bit(base_folder, tmp_path, dtype):
    cfg = _cfg(dtype="float32" if dtype == torch.float32 else "bfloat16")
    policy = load_trained_policy(cfg, World(), init_model=base_folder, latest=None)
    _randomize_adapters(policy.model, seed=1)
    items = generate_items(4, seed=3)
    ro = _rollouts(policy, items)
    trainer = _trainer(cfg, policy, items, tmp_path)
    assert trainer.reference_is_base and trainer.reference is None
    width = ro.response_mask.shape[1]
    groups = list(range(len(items)))
    ref = trainer._logprobs("reference", ro, groups, width, grad=False, entropy=False)
    adapted = trainer._logprobs("policy", ro, groups, width, grad=False, entropy=False)[0]
    base = load_policy(base_folder, dtype=dtype).model
    with torch.no_grad():  # the trainer's own computation, on the plain base model
        want = shared_prefix_logprobs(
            base, ro.prompt.input_ids, ro.prompt.attention_mask, ro.sequences[:, ro.prompt_len:], ro.response_mask,
            group_size=2, image_feats=image_features(base, ro.prompt.pixel_values, ro.prompt.image_grid_thw),
            image_grid_thw=ro.prompt.image_grid_thw, image_token_id=policy.image_token_id, temperature=1.0)
    assert torch.equal(ref, want), float((ref - want).abs().max())
    mask = ro.response_mask.bool()
    assert float((adapted - want).abs()[mask].max()) > 1e-3  # the adapters do change the policy
    assert all(p.requires_grad for n, p in policy.model.named_parameters() if ".lora_" in n)  # back on after


def _unfused_loss_fp64(model, ro, adv, cfg, image_token_id):
    """The GRPO loss of one update on the HF forward in fp64: full logits, log_softmax, gather (no fused
    head, no shared prefix), the reference from the same model with its adapters off."""
    n, L = ro.group_size, ro.prompt_len
    rows = [g for g in range(len(ro.items)) for _ in range(n)]
    prompt = ro.prompt.select(rows)  # every row with its own copy of its prompt's pixels

    def logp_of():
        out = model(input_ids=ro.sequences, attention_mask=ro.attention_mask,
                    pixel_values=prompt.pixel_values.double(), image_grid_thw=prompt.image_grid_thw,
                    mm_token_type_ids=(ro.sequences == image_token_id).to(torch.int32))
        logits = out.logits[:, L - 1 : -1].double() / cfg.temperature
        return torch.log_softmax(logits, -1).gather(-1, ro.sequences[:, L:].unsqueeze(-1)).squeeze(-1)

    with torch.no_grad(), adapters_disabled(model):
        ref = logp_of()
    logp = logp_of()
    loss, _ = ref_ops.grpo_loss(logp, adv.double(), ro.response_mask.double(), ref_logp=ref, clip_low=cfg.clip_low,
                                clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, kl_coef=cfg.kl_coef,
                                kl_type=cfg.kl_type, loss_agg="token-mean")
    return loss


# The error allowed of the fused path's adapter gradients against fp64 autograd, as a share of the
# largest gradient: fp32 rounds at ~1e-7 a step (a few 1e-6 measured); bf16 weights and activations at
# ~4e-3 (the adapters' branch computed in bf16 from fp32 master weights, pebr.model.lora.compute_in_base_dtype).
GRAD_TOL = {"float32": 2e-5, "bfloat16": 2e-2}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adapter_gradients_equal_autograd_on_an_unfused_fp64_path(base_folder, tmp_path, dtype):
    cfg = dataclasses.replace(_cfg(dtype=dtype), optimizer=C.OptimizerConfig(grad_clip=1e9))  # the gradient before any clip
    policy = load_trained_policy(cfg, World(), init_model=base_folder, latest=None)
    _randomize_adapters(policy.model, seed=2)
    start = {k: v.clone() for k, v in policy.model.state_dict().items() if ".lora_" in k}
    items = generate_items(4, seed=4)
    ro = _rollouts(policy, items)
    adv = torch.randn(len(ro.texts), generator=torch.Generator().manual_seed(5))
    trainer = _trainer(cfg, policy, items, tmp_path)
    grads = {}
    trainer.opt.step = lambda *a, **k: grads.update(
        {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None})
    trainer.update(ro, adv)
    assert grads and all(".lora_" in n for n in grads)  # nothing else got a gradient: the base is frozen

    from transformers import Qwen2_5_VLForConditionalGeneration

    # transformers' own model, without the engine's kernels (they take fp32/bf16/fp16 only)
    truth_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_folder, dtype=torch.float64)
    base_weights = {k: v.double() for k, v in load_policy(base_folder, dtype=getattr(torch, dtype)).model.state_dict().items()}
    truth_model.load_state_dict(base_weights)  # the very weights the fused path ran (bf16-rounded in bf16)
    add_lora(truth_model, rank=4, alpha=8.0)
    missing = truth_model.load_state_dict({k: v.double() for k, v in start.items()}, strict=False)
    assert not missing.unexpected_keys
    loss = _unfused_loss_fp64(truth_model, ro, adv, cfg, policy.image_token_id)
    loss.backward()
    truth = {n: p.grad for n, p in truth_model.named_parameters() if p.grad is not None}
    assert truth.keys() == grads.keys()
    gmax = max(float(g.abs().max()) for g in truth.values())
    assert gmax > 0
    worst = 0.0
    for name, g in truth.items():
        # a wrong reference (adapters left on: KL 0), temperature or mask moves them by far more
        assert grads[name].dtype == torch.float32  # fp32 master adapters in both dtypes
        err = float((grads[name].double() - g).abs().max())
        worst = max(worst, err / gmax)
        assert err <= GRAD_TOL[dtype] * gmax, f"{name}: {err:.2e} (largest gradient {gmax:.2e})"
    print(f"{dtype}: largest adapter-gradient error {worst:.2e} of the largest gradient")


def test_merged_folder_and_peft_adapter_equal_the_adapted_model(base_folder, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = _cfg()
    policy = load_trained_policy(cfg, World(), init_model=base_folder, latest=None)
    _randomize_adapters(policy.model, seed=3)
    items = generate_items(3, seed=6)
    batch = policy.encode_items(items)

    def logits(model):
        with torch.no_grad():
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                         mm_token_type_ids=batch.mm_token_type_ids).logits

    adapted = logits(policy.model)
    policy.save(tmp_path / "final", merged=True)
    policy.save(tmp_path / "mid", merged=False)
    assert not (tmp_path / "mid" / "model.safetensors").exists()  # mid-stage: the adapter alone
    alone = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "final")  # transformers alone
    assert not any(".lora_" in k or "base_layer" in k for k in alone.state_dict())
    # the merged weights are W + (alpha/r) B A: fp32 rounding of the adapted model's logits
    scale = float(adapted.abs().max())
    assert float((logits(alone) - adapted).abs().max()) <= 1e-5 * scale
    with open(tmp_path / "mid" / ADAPTER_DIR / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.realpath(base_folder)
    peft = PeftModel.from_pretrained(load_policy(base_folder).model, str(tmp_path / "mid" / ADAPTER_DIR))
    assert torch.equal(logits(peft), adapted)  # PEFT's own loader: the same layers, bit for bit
    assert float((logits(load_policy(tmp_path / "mid").model) - adapted).abs().max()) <= 1e-5 * scale
    # what a stage reads of its starting policy before loading weights
    assert text_only_policy(tmp_path / "mid").image_token_id == policy.image_token_id
    # merging is computed independently of PEFT's merge_and_unload: compare the two
    ours = merged_state_dict(policy.model.state_dict(), scaling=8.0 / 4)
    theirs = peft.merge_and_unload().state_dict()
    for k, v in theirs.items():
        torch.testing.assert_close(ours[k], v, atol=1e-6, rtol=1e-6, msg=k)


def test_adapter_checkpoint_without_its_base_says_so(base_folder, tmp_path):
    import shutil

    from pebr.errors import CheckpointError

    shutil.copytree(base_folder, tmp_path / "base")
    policy = load_trained_policy(_cfg(), World(), init_model=str(tmp_path / "base"), latest=None)
    policy.save(tmp_path / "mid", merged=False)
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(CheckpointError, match="base model folder"):
        load_policy(tmp_path / "mid")


def test_resume_refuses_another_lora_setting(base_folder, tmp_path):
    saved = json.loads(json.dumps(_cfg().to_dict()))
    now = dataclasses.replace(_cfg(), lora=C.LoRAConfig(rank=8, alpha=8.0))
    assert C.resume_conflicts(now, saved) == ["--lora-rank 8 (the run being resumed has 4)"]


# pebr.train with a reward that varies with the text (a random-init policy writes no keyword, no
# format, no answer: every built-in reward would be equal, the advantages 0, and nothing would move)
VARIED_REWARD_TRAIN = """
import sys, zlib
import pebr.recipe.runner as runner
runner.make_reward_fn = lambda cfg, kind=None: (lambda text, item, k: {"overall": (zlib.crc32(text.encode()) % 7) / 6})
from pebr import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigkill_then_resume_is_exact(base_folder, tmp_path):
    """4 steps uninterrupted == 4 steps killed with SIGKILL after a checkpoint and resumed: the same
    rewards and losses each step and the same adapter and merged model at the end."""
    script = tmp_path / "train_varied_reward.py"
    script.write_text(VARIED_REWARD_TRAIN)
    common = [sys.executable, str(script), "--stage", "1", "--model", base_folder, "--lora-rank", "4",
              "--max-steps", "4", "--save-every", "1", *MICRO]
    first = subprocess.run([*common, "--output-dir", str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "b"
    cmd = [*common, "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "stage1" / "checkpoints" / "latest"
    deadline = time.time() + 180
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert latest.exists(), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = Checkpointer(out / "stage1" / "checkpoints")
    killed_at = load_trainer_state(ck.latest())["step"]
    assert killed_at < 4
    assert not os.path.isfile(os.path.join(ck.latest(), "model.safetensors"))  # mid-stage: the adapter alone
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"at step {killed_at}" in done.stderr
    ma = read_metrics(str(tmp_path / "a" / "stage1" / "metrics.jsonl"))
    mb = read_metrics(str(out / "stage1" / "metrics.jsonl"))
    assert [m["step"] for m in mb] == [1, 2, 3, 4]
    assert all(m["grad_norm"] > 0 for m in ma)  # the adapters did move: there is something to compare
    for x, y in zip(ma, mb):
        assert x["reward/overall"] == y["reward/overall"] and x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        assert x["kl"] == pytest.approx(y["kl"], abs=1e-7)
    assert ma[-1]["kl"] > 0  # the policy left its base: the reference (adapters off) is not the policy
    fa, fb = (p / "stage1" / "checkpoints" / "step_0000004" for p in (tmp_path / "a", out))
    from safetensors.torch import load_file

    for f in (os.path.join(ADAPTER_DIR, "adapter_model.safetensors"), "model.safetensors"):
        wa, wb = load_file(fa / f), load_file(fb / f)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("change", [dict(gradient_checkpointing=True), dict(shared_prefix=False)])
def test_checkpointing_and_shared_prefix_change_nothing_under_lora(base_folder, tmp_path, change):
    """--gradient-checkpointing (non-reentrant: the frozen base's inputs need no gradient) and the
    unshared path give the adapters the gradient of the default path, to fp32 rounding."""
    cfg = dataclasses.replace(_cfg(), optimizer=C.OptimizerConfig(grad_clip=1e9))
    items = generate_items(4, seed=7)
    adv = torch.randn(8, generator=torch.Generator().manual_seed(8))
    grads, ro = [], None
    for c in (cfg, dataclasses.replace(cfg, **change)):
        policy = load_trained_policy(c, World(), init_model=base_folder, latest=None)
        _randomize_adapters(policy.model, seed=4)
        ro = ro or _rollouts(policy, items)
        trainer = _trainer(c, policy, items, tmp_path, name=str(len(grads)))
        got = {}
        trainer.opt.step = lambda *a, _g=got, _m=policy.model, **k: _g.update(
            {n: p.grad.clone() for n, p in _m.named_parameters() if p.grad is not None})
        trainer.update(ro, adv)
        grads.append(got)
    a, b = grads
    assert a.keys() == b.keys() and a
    gmax = max(float(g.abs().max()) for g in a.values())
    for name in a:
        assert float((a[name] - b[name]).abs().max()) <= 1e-5 * gmax, name


def test_warm_up_with_lora_leaves_a_merged_policy(base_folder, tmp_path):
    """Stage 0 with --lora-rank on a pretrained --model: the final checkpoint is a plain HF folder
    (the merged model) that stage 1 starts from; its adapter is there too, in PEFT's format."""
    train.main(["--stage", "0", "--model", base_folder, "--lora-rank", "4", "--max-steps", "2", "--sft-items", "8",
                "--sft-batch", "4", "--no-progress", "--output-dir", str(tmp_path)])
    final = Checkpointer(tmp_path / "stage0" / "checkpoints").latest()
    assert os.path.isfile(os.path.join(final, "model.safetensors"))
    assert os.path.isfile(os.path.join(final, ADAPTER_DIR, "adapter_model.safetensors"))
    trained, base = load_policy(final).model.state_dict(), load_policy(base_folder).model.state_dict()
    assert trained.keys() == base.keys()
    moved = [k for k in base if not torch.equal(trained[k], base[k])]
    assert moved and all("language_model.layers." in k and k.endswith("proj.weight") for k in moved)


def _saved_activation_bytes(model, batch) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one forward."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
              image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids)
    return total


def test_bf16_base_keeps_no_fp32_copies_of_the_adapted_inputs():
    """Over a bf16 base, PEFT's default casts each adapted projection's input to fp32 and autograd keeps
    the copy; ours runs the adapter branch in bf16 from fp32 master weights (compute_in_base_dtype)."""
    from peft import LoraConfig, get_peft_model

    ours, theirs = build_tiny_policy(seed=0), build_tiny_policy(seed=0)
    for p in (ours, theirs):
        p.model.to(torch.bfloat16)
    add_lora(ours.model, rank=4, alpha=8.0)
    get_peft_model(theirs.model, LoraConfig(r=4, lora_alpha=8.0, target_modules=target_pattern()))
    assert all(p.dtype == torch.float32 for n, p in ours.model.named_parameters() if ".lora_" in n)
    batch = ours.encode_items(generate_items(4, seed=1))
    tokens, cfg = batch.input_ids.numel(), ours.model.config.text_config
    # the fp32 copies PEFT keeps: q, k, v, o, gate, up read H wide, down reads the MLP width
    copies = 4 * tokens * (6 * cfg.hidden_size + cfg.intermediate_size) * cfg.num_hidden_layers
    saved_ours, saved_theirs = _saved_activation_bytes(ours.model, batch), _saved_activation_bytes(theirs.model, batch)
    assert saved_theirs - saved_ours >= 0.5 * copies, (saved_ours, saved_theirs, copies)
