"""Typed configuration of a PeBR-R1 run, one reason per field; presets are plain functions.

    cfg = preset("tiny", stage=1)              # sized for a 2-core CPU
    cfg = preset("paper", stage=2)             # docs/recipe.md (EasyR1 on Qwen2.5-VL-7B)
    cfg = dataclasses.replace(cfg, lr=3e-5)    # CLI overrides do this, field by field

Each field's reason is written once, in `opt(default, help)`: the command lines of `pebr.train`,
`pebr.sample` and `pebr.eval` take their flags, types, choices and help from it (`pebr.run.cli`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from pebr.data.scenes import DIFFICULTIES
from pebr.model.lora import DECODER_PROJECTIONS
from pebr.model.sizes import REAL_IMAGE_SIZE, REAL_SIZES
from pebr.rollout.factory import ROLLOUT_ENGINES

MODEL_SIZES = ("tiny", *REAL_SIZES)
TINY_IMAGE_SIZE = 112  # the tiny policy's images: 8 x 8 patches -> 16 image tokens

DIFFICULTY_LEVELS = tuple(DIFFICULTIES)
STAGES = (0, 1, 2)
STAGE_NAMES = {0: "warm-up SFT", 1: "perception GRPO", 2: "reasoning GRPO"}


def opt(default, help: str, *, choices: tuple | None = None):
    """A config field with its one-line reason (`help`) and, for a closed set, its `choices`
    (checked by `check_choices` and by the command line)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return field(default=default, metadata=meta)


def check_choices(cfg) -> None:
    """ValueError naming the field when a field with `choices` holds another value (None is
    accepted where it is the field's default)."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices and not (value is None and f.default is None):
            raise ValueError(f"{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")


@dataclass
class OptimizerConfig:
    """AdamW and the gradient clip: one section for the warm-up (stage 0) and GRPO (stages 1, 2)
    alike; each keeps its own learning rate and LR warm-up (--sft-lr, --lr)."""

    weight_decay: float = opt(1e-2, "AdamW weight decay")
    betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas")
    grad_clip: float = opt(1.0, "global gradient-norm clip")

    def __post_init__(self):
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")


@dataclass
class SFTConfig:
    """Stage 0: warm-up SFT on reference responses in the structured format."""

    num_items: int = opt(1024, "procedural warm-up items (a --data file replaces them)")
    epochs: int = opt(2, "warm-up epochs (the paper: 2)")
    lr: float = opt(1e-5, "warm-up learning rate (the paper: 1e-5, for a 7B model that already writes; the tiny one starts from noise)")
    batch_size: int = opt(16, "warm-up sequences per optimizer step")
    micro_batch: int = opt(16, "warm-up sequences per forward (gradient accumulation up to the batch size)")
    warmup_steps: int = opt(0, "warm-up SFT: linear LR warm-up steps, then constant")
    freeze_vision: bool = opt(True, "freeze the vision tower during the warm-up (as the paper does)")


@dataclass
class SamplingConfig:
    """Dataset-level sampling: k rollouts per item, split by how many are correct."""

    k: int = opt(8, "rollouts per item: k/k correct -> easy, 1..k-1 -> medium, 0 -> hard")
    num_items: int = opt(1024, "procedural items in the sampled pool (a --data file replaces them)")
    temperature: float = opt(1.2, "sampling temperature (the paper: 1.2)")
    top_p: float = opt(0.99, "sampling nucleus top-p (the paper: 0.99)")
    batch_prompts: int = opt(16, "prompts generated together (each with its k responses)")
    seed: int = opt(1, "seed of the procedural pool that is sampled and split (and of its rollouts)")


@dataclass
class EvalConfig:
    """`python -m pebr.eval`: held-out accuracy with the training grader."""

    num_items: int = opt(120, "procedural items (without --data)")
    kind: str = opt("mixed", "procedural item kind", choices=("mixed", "perception", "reasoning"))
    difficulty: str | None = opt(None, "procedural items: objects per scene and colours; none: the level the first "
                                       "--model was trained at (its trainer_state.json), else standard",
                                 choices=DIFFICULTY_LEVELS)
    seed: int = opt(999, "procedural item seed: keep it apart from the training pools (SFT 2, sampling 1)")
    temperature: float = opt(0.0, "sampling temperature (0: greedy)")
    max_new_tokens: int = opt(96, "response budget in tokens")

    def __post_init__(self):
        check_choices(self)


@dataclass
class LoRAConfig:
    """LoRA through PEFT (pebr/model/lora.py): rank-r adapters trained on a frozen base, the KL
    reference the same model with its adapters off (no second model). Stage 0 needs --model
    (a random-init base has nothing to adapt); each stage's final checkpoint holds the merged model."""

    rank: int | None = opt(None, "LoRA adapters of this rank on the targets below; none: full fine-tuning of every weight")
    alpha: float = opt(32.0, "LoRA scale: the update is (alpha / rank) B A")
    dropout: float = opt(0.0, "dropout on the adapters' input in training (the reference pass, adapters off, has none)")
    targets: tuple[str, ...] = opt(DECODER_PROJECTIONS, "decoder projections that get adapters (attention and MLP); "
                                                        "the embeddings, LM head and norms stay frozen")
    vision: bool = opt(False, "adapters on the vision blocks' attention and MLP too (off: the vision tower frozen)")

    def __post_init__(self):
        if self.rank is not None and int(self.rank) < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in DECODER_PROJECTIONS]
        if unknown or not self.targets:
            raise ValueError(f"lora targets must be among {', '.join(DECODER_PROJECTIONS)}, got "
                             f"{', '.join(self.targets) or 'none'}")

    @property
    def enabled(self) -> bool:
        return self.rank is not None


@dataclass
class TrainConfig:
    """One stage of the recipe. GRPO fields apply to stages 1 and 2; `sft` to stage 0."""

    stage: int = opt(1, "0 warm-up SFT, 1 perception GRPO (easy split), 2 reasoning GRPO (medium split)", choices=STAGES)
    preset: str = opt("tiny", "tiny: sized for a 2-core CPU; paper: the paper's values (Qwen2.5-VL-7B on GPUs); see docs/recipe.md")
    model: str | None = opt(None, "HF folder (safetensors) to start from, or a stage folder (OUT/stageK) or checkpoints folder: its latest checkpoint, or a run folder (OUT): its latest stage's; none: the previous stage's output, or the built-in tiny policy for stage 0")
    data: str | None = opt(None, "JSON/JSONL/parquet records (images, problem, answer, key_words); none: built-in procedural tasks")
    model_size: str = opt("tiny", "the policy a warm-up without --model builds at random init: tiny (the built-in default) or a real width, "
                                   "qwen2.5-vl-3b / qwen2.5-vl-7b (the published architecture, depth cut by --text-layers and --vision-blocks, "
                                   "our tokenizer padded to its vocabulary; pebr/model/sizes.py)", choices=MODEL_SIZES)
    text_layers: int = opt(2, "decoder layers of a real-width --model-size (the full models have 36 (3B) and 28 (7B))")
    vision_blocks: int = opt(1, "vision blocks of a real-width --model-size (the full tower has 32)")
    image_size: int | None = opt(None, "side in pixels of the built-in tasks' images; none: 112 for the tiny policy, 448 for a "
                                       "real-width --model-size (ignored with --data)")
    difficulty: str = opt("standard", "built-in tasks: objects per scene and colours (pebr/data/scenes.py DIFFICULTIES; ignored with --data)",
                          choices=DIFFICULTY_LEVELS)
    output_dir: str = opt("runs", "stage k writes OUT/stage{k}; sampling is cached in OUT/sampling")
    seed: int = opt(0, "seed of model init, data order and sampling")
    max_steps: int | None = opt(None, "optimizer steps of this stage; none: the epochs below (a warm-up run first "
                                      "by stage 1 is sized by the --sft-* flags)")
    resume: bool = opt(False, "continue from OUT/stage{k}'s latest checkpoint (same data order and RNG)")
    allow_changed_settings: bool = opt(False, "with --resume: go on where a setting that defines the run (learning rate, "
                                              "group size, data, --model ...) differs from the checkpoint's, instead of "
                                              "refusing; each change is logged and recorded, and the new values are what "
                                              "runs (the weights' shapes, --model-size, --text-layers, --vision-blocks and "
                                              "the LoRA rank, targets and vision, cannot change)")
    dtype: str = opt("float32", "parameter dtype", choices=("float32", "bfloat16", "float16"))
    device: str = opt("cpu", "cpu, cuda or cuda:N (the command line picks cuda when available)")

    # -- scale-out (docs/recipe.md)
    dist_backend: str = opt("auto", "torch.distributed backend: auto = nccl on CUDA, gloo on CPU", choices=("auto", "nccl", "gloo"))
    cpu_offload: bool = opt(False, "FSDP2 CPUOffloadPolicy: parameters, gradients and optimizer states on the CPU")
    gradient_checkpointing: bool = opt(False, "recompute decoder layers and vision blocks in backward (less memory, more compute)")

    # -- GRPO (docs/recipe.md)
    lr: float = opt(1e-6, "learning rate, constant after warm-up (the paper: 1e-6)")
    warmup_steps: int = opt(0, "linear LR warm-up steps")
    group_size: int = opt(8, "n responses per prompt (a GRPO group)")
    rollout_batch: int = opt(560, "prompts per rollout, one training step (the paper: 560 stage 1, 512 stage 2)")
    mini_batch: int = opt(112, "prompts per optimizer update, divides the rollout batch (the paper: 112 stage 1, 128 stage 2)")
    micro_batch: int = opt(8, "sequences per forward/backward (gradient accumulation)")
    rollout_engine: str = opt("hf", "what generates the rollouts, in training, dataset-level sampling and eval alike: hf = transformers' generate with a KV cache in this process (pebr.rollout.factory)",
                              choices=ROLLOUT_ENGINES)
    shared_prefix: bool = opt(True, "rollout and update: each group's prompt through the decoder once, its n responses attending to its keys/values (off: every sequence whole; same result, slower)")
    ppo_epochs: int = opt(1, "passes over each rollout batch")
    old_logprobs: str = opt("rollout", "old log-probs of a step with several updates: rollout = the sampler's (the same policy and temperature; checked against one recompute on the run's first such step, recomputed from then on if a token differs by more than 1e-3); recompute = a policy forward over the step's rollouts first (EasyR1)",
                            choices=("rollout", "recompute"))
    epochs: int = opt(1, "passes over the stage's data when max_steps is not set (the paper: 1 stage 1, 2 stage 2)")
    temperature: float = opt(1.2, "rollout sampling temperature, log-probs use the same (0: greedy)")
    top_p: float = opt(0.99, "rollout nucleus sampling")
    max_new_tokens: int = opt(2048, "response budget in tokens")
    kl_coef: float = opt(1e-2, "weight of the KL-to-reference loss term, the frozen starting policy (0: no reference model)")
    kl_type: str = opt("low_var_kl", "KL estimator (low_var_kl: k3)", choices=("low_var_kl", "kl", "abs", "mse"))
    clip_low: float = opt(0.2, "PPO ratio clip below (1 - clip_low)")
    clip_high: float = opt(0.3, "PPO ratio clip above (1 + clip_high; DAPO clip-higher)")
    dual_clip: float = opt(3.0, "dual-clip cap on the loss of negative-advantage tokens")
    loss_agg: str = opt("token-mean", "loss aggregation over masked tokens",
                        choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"))
    adv_scale: str = opt("group", "GRPO advantage std normalization (none: Dr.GRPO)", choices=("group", "batch", "none"))
    freeze_vision: bool = opt(False, "freeze the vision tower (the paper trains it in both RL stages)")
    online_filter: bool = opt(False, "DAPO: drop groups whose rewards are all equal (no signal)")
    split: str | None = opt(None, "sampling split to train on (all: every item, no dataset-level sampling); none: easy for stage 1, medium for stage 2",
                            choices=("easy", "medium", "hard", "all"))
    min_split_items: int = opt(0, "top a small split up from the next one to this many items")
    clip_model: str | None = opt(None, "CLIP-family HF folder for the perception reward's clip term; none: the scene term on built-in items")

    # -- bookkeeping
    save_every: int = opt(50, "checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = opt(2, "checkpoints kept on disk (older ones removed)")
    max_skipped_updates: int = opt(3, "stop with an error after this many optimizer updates in a row skipped for a non-finite "
                                      "gradient (a diverged run; 0: never stop)")
    max_weight_growth: float = opt(10.0, "refuse to save, and stop with an error, when the largest |weight| grew more than this "
                                         "many times since the last checkpoint (or the starting weights): a finite blow-up "
                                         "(0: never)")
    progress: bool = opt(True, "tqdm progress bar with the running reward")
    log_every: int = opt(10, "one line per this many steps (step, reward, accuracy, loss, kl, step time) to the log and train.log")
    tensorboard: bool = opt(False, "also write TensorBoard event files to <stage folder>/tensorboard (needs the tensorboard package)")

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        check_choices(self)
        for name in ("text_layers", "vision_blocks", "group_size", "rollout_batch", "mini_batch", "micro_batch", "ppo_epochs", "epochs", "max_new_tokens", "save_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rollout_batch % self.mini_batch != 0:
            raise ValueError(f"mini_batch ({self.mini_batch}) must divide rollout_batch ({self.rollout_batch})")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not self.max_weight_growth >= 0:
            raise ValueError(f"max_weight_growth must be >= 0 (0: never refuse), got {self.max_weight_growth}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def item_image_size(self) -> int:
        """The side of the built-in tasks' images (image_size, else the model size's own)."""
        if self.image_size is not None:
            return self.image_size
        return TINY_IMAGE_SIZE if self.model_size == "tiny" else REAL_IMAGE_SIZE

    @property
    def train_split(self) -> str:
        return self.split or {1: "easy", 2: "medium"}.get(self.stage, "all")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, *, train: dict | None = None, sft: dict | None = None, sampling: dict | None = None,
                       optimizer: dict | None = None, lora: dict | None = None) -> "TrainConfig":
        """This config with the given fields replaced, section by section, as the command lines give
        them ({field: value}). Derived values follow a changed batch: a --sft-batch smaller than the
        preset's micro-batch becomes the micro-batch too, and a --rollout-batch that the preset's
        mini-batch does not divide becomes the mini-batch (one update per rollout)."""
        train, sft = dict(train or {}), dict(sft or {})
        if "batch_size" in sft and "micro_batch" not in sft:
            sft["micro_batch"] = min(self.sft.micro_batch, sft["batch_size"])
        rb = train.get("rollout_batch")
        if rb and "mini_batch" not in train and (rb % self.mini_batch or self.mini_batch > rb):
            train["mini_batch"] = rb
        return dataclasses.replace(
            self,
            optimizer=dataclasses.replace(self.optimizer, **(optimizer or {})),
            sft=dataclasses.replace(self.sft, **sft),
            sampling=dataclasses.replace(self.sampling, **(sampling or {})),
            lora=dataclasses.replace(self.lora, **(lora or {})),
            **train,
        )


def paper(stage: int = 1) -> TrainConfig:
    """docs/recipe.md: the paper's values (EasyR1, Qwen2.5-VL-7B-Instruct, many GPUs)."""
    cfg = TrainConfig(stage=stage, preset="paper", dtype="bfloat16")
    if stage == 2:
        cfg = dataclasses.replace(cfg, rollout_batch=512, mini_batch=128, epochs=2)
    return cfg


def tiny(stage: int = 1) -> TrainConfig:
    """Sized for a 2-core CPU and the built-in tiny policy. Every departure from the paper, with
    the measurement behind it, is in docs/recipe.md ("The tiny preset's departures from the
    paper"); in short: the "simple" built-in world and a 24-epoch warm-up (so that the warm-up
    policy sees the image: 8 epochs left it at chance on colours, and no item 8/8 right), dataset-level
    sampling of 1,024 items at T = 0.7 (easy ~10%, medium ~60%), rollouts at T = 1.0, a far larger
    LR (5e-5), short responses, small batches and KL 0.05.
    """
    sft = SFTConfig(num_items=768, epochs=24, lr=2e-3, batch_size=32, micro_batch=32, warmup_steps=10)
    sampling = SamplingConfig(k=8, num_items=1024, temperature=0.7, top_p=1.0, batch_prompts=16)
    return TrainConfig(
        stage=stage,
        preset="tiny",
        difficulty="simple",
        lr=5e-5,  # 2e-4 raised the rewards as well but cut held-out perception accuracy (docs/recipe.md)
        warmup_steps=5,
        group_size=8,
        rollout_batch=16,
        mini_batch=8,
        micro_batch=64,
        epochs=8 if stage == 1 else 4,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=96,
        kl_coef=0.05,
        max_steps=150 if stage else None,  # stage 0 runs its epochs
        save_every=50,
        min_split_items=64,
        sft=sft,
        sampling=sampling,
    )


PRESETS = {"paper": paper, "tiny": tiny}


def preset(name: str, stage: int = 1) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name](stage)


# Fields a resumed run may change: where and how long it runs, how it reports and saves, how it is
# sharded. Every other field defines what the run computes and must match the run being resumed.
RESUME_MAY_CHANGE = frozenset({
    "resume", "allow_changed_settings", "max_steps", "save_every", "keep_checkpoints", "max_skipped_updates", "max_weight_growth", "progress",
    "log_every", "tensorboard", "device", "dist_backend", "cpu_offload", "gradient_checkpointing", "output_dir", "model",
})
_SECTION_FLAG = {"sft": "--sft-", "sampling": "--sampling-", "optimizer": "--", "lora": "--lora-"}


# Fields that set the weights' shapes: a checkpoint cannot load under other values, whatever
# --allow-changed-settings says.
RESUME_SHAPE_FIELDS = frozenset({"model_size", "text_layers", "vision_blocks", "lora.rank", "lora.targets", "lora.vision"})


@dataclasses.dataclass(frozen=True)
class SettingChange:
    """One setting of a resumed run that differs from its checkpoint's: `field` ("group_size",
    "lora.rank"), the `flag` that sets it, the `new` value and the checkpoint's `old` one (as JSON)."""

    field: str
    flag: str
    new: object
    old: object

    def __str__(self) -> str:
        return f"{self.flag} {_show_value(self.new)} (the run being resumed has {_show_value(self.old)})"


def resume_changes(cfg: TrainConfig, saved: dict) -> list[SettingChange]:
    """How `cfg` differs from the config a checkpoint recorded (its trainer_state.json "config"), in
    the fields that define the run. Fields the checkpoint does not record (written by an older
    version) are not compared."""
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, as the checkpoint holds them
    out = []
    for key, value in now.items():
        if key in RESUME_MAY_CHANGE or key not in saved:
            continue
        pairs = ([(f"{key}.{k}", f"{_SECTION_FLAG[key]}{k}", v, saved[key].get(k, v)) for k, v in value.items()]
                 if isinstance(value, dict) and isinstance(saved[key], dict) else [(key, f"--{key}", value, saved[key])])
        for name, flag, new, old in pairs:
            if new != old:
                out.append(SettingChange(name, flag.replace("_", "-"), new, old))
    return out


def resume_conflicts(cfg: TrainConfig, saved: dict) -> list[str]:
    """resume_changes as lines: ["--group-size 2 (the run being resumed has 4)", ...]."""
    return [str(c) for c in resume_changes(cfg, saved)]


def _show_value(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, list) else str(v)
