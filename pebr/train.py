"""`python -m pebr.train --stage 0|1|2`: one stage of the PeBR-R1 recipe (`--help` lists every flag).

    stage 0  warm-up SFT of the policy on reference responses       -> OUT/stage0
    stage 1  perception GRPO on the easy split (from stage 0)        -> OUT/stage1
    stage 2  reasoning GRPO on the medium split (from stage 1)       -> OUT/stage2

With no --model, stage 1 starts from OUT/stage0's latest checkpoint and builds it first if there
is none (warm-up SFT of the built-in tiny policy); stage 2 starts from OUT/stage1. Dataset-level
sampling (k rollouts per item, easy/medium/hard) runs once and is cached in OUT/sampling.
Each stage folder holds checkpoints/ (HF folders + trainer state, `latest`), metrics.jsonl
(one line per step) and train.log. --model takes an HF folder, a stage folder (OUT/stageK: its
latest checkpoint), a checkpoints folder or its `latest` file, or a run folder (OUT: its latest stage's).
--split all trains on every item and skips dataset-level sampling.

Data parallel on one machine or many (FSDP2; nccl on CUDA, gloo on CPU):
    torchrun --nproc-per-node 8 -m pebr.train --stage 2 ...
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m pebr.train --stage 2 ...
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from pebr.recipe import config as C
from pebr.recipe.paths import stage_dir  # noqa: F401  (scripts import it from here)
from pebr.recipe.runner import run
from pebr.run.cli import (
    add_fields,
    auto_device,
    check_device,
    errors_as_exit,
    field_help,
    given,
)
from pebr.run.model_path import hold_model_path

# ---- command line (flags generated from the config fields: pebr.run.cli)

_RUN = ("model", "data", "output_dir", "max_steps", "resume", "allow_changed_settings", "seed", "device", "dtype", "save_every",
        "keep_checkpoints", "max_skipped_updates", "max_weight_growth", "progress", "log_every", "tensorboard")
_SCALE_OUT = ("dist_backend", "cpu_offload", "gradient_checkpointing")
_MODEL = ("model_size", "text_layers", "vision_blocks", "image_size")
_ALIASES = {"group_size": ["-n"]}
_SFT_ALIASES = {"num_items": ["--sft-items"], "batch_size": ["--sft-batch"]}  # the flags' first names
_SAMPLING_ALIASES = {"num_items": ["--sampling-items"]}


def build_parser(preset: str = "tiny", stage: int = 1) -> argparse.ArgumentParser:
    """The parser of `python -m pebr.train`; `--help` shows the defaults of `preset` at `stage`
    (`main` reads both from the command line first)."""
    cfg = dataclasses.replace(C.preset(preset, stage), device=auto_device())
    p = argparse.ArgumentParser(
        prog="python -m pebr.train",
        description=__doc__.split("\n\n")[0] + f" Defaults come from --preset (shown: --preset {preset} "
        f"--stage {stage}); every other flag overrides one field.",
    )
    p.add_argument("--stage", type=int, choices=C.STAGES, required=True, help=field_help(C.TrainConfig, "stage"))
    p.add_argument("--preset", choices=sorted(C.PRESETS), default="tiny",
                   help=field_help(C.TrainConfig, "preset") + " (default: tiny)")
    fields = {"": add_fields(p, C.TrainConfig, shown=cfg, only=_RUN, unset_default=True)}
    g = p.add_argument_group("model built at random init (no --model): the tiny default or a real width")
    fields[""] |= add_fields(g, C.TrainConfig, shown=cfg, only=_MODEL, unset_default=True)
    g = p.add_argument_group("scale-out")
    fields[""] |= add_fields(g, C.TrainConfig, shown=cfg, only=_SCALE_OUT, unset_default=True)
    g = p.add_argument_group("optimizer (every stage)")
    fields["optimizer"] = add_fields(g, C.OptimizerConfig, shown=cfg.optimizer, unset_default=True)
    g = p.add_argument_group("GRPO (stages 1, 2)")
    fields[""] |= add_fields(g, C.TrainConfig, shown=cfg, skip=("stage", "preset", *_RUN, *_MODEL, *_SCALE_OUT),
                             aliases=_ALIASES, unset_default=True)
    g = p.add_argument_group("LoRA (PEFT): adapters on a frozen base, the reference the base itself")
    fields["lora"] = add_fields(g, C.LoRAConfig, shown=cfg.lora, prefix="lora-", unset_default=True)
    g = p.add_argument_group("warm-up SFT (stage 0)")
    fields["sft"] = add_fields(g, C.SFTConfig, shown=cfg.sft, prefix="sft-", aliases=_SFT_ALIASES, unset_default=True)
    g = p.add_argument_group("dataset-level sampling")
    fields["sampling"] = add_fields(g, C.SamplingConfig, shown=cfg.sampling, prefix="sampling-",
                                    aliases=_SAMPLING_ALIASES, unset_default=True)
    p.set_defaults(_fields=fields)
    return p


def _preset_and_stage(argv) -> tuple[str, int]:
    """--preset and --stage read ahead of the full parse (tiny, 1 when absent or invalid)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="tiny")
    pre.add_argument("--stage", default="1")
    known, _ = pre.parse_known_args(argv)
    preset = known.preset if known.preset in C.PRESETS else "tiny"
    stage = int(known.stage) if str(known.stage) in {str(s) for s in C.STAGES} else 1
    return preset, stage


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser(*_preset_and_stage(sys.argv[1:] if argv is None else argv)).parse_args(argv)


def config_from_args(args) -> C.TrainConfig:
    """The preset's config with each given flag's field replaced."""
    train, sft, sampling, optimizer, lora = (given(args, args._fields[k])
                                             for k in ("", "sft", "sampling", "optimizer", "lora"))
    train.setdefault("device", auto_device())
    return C.preset(args.preset, args.stage).with_overrides(train=train, sft=sft, sampling=sampling, optimizer=optimizer,
                                                            lora=lora)


def main(argv=None) -> int:
    args = parse_args(argv)
    with errors_as_exit(settings=True):
        cfg = config_from_args(args)
        check_device(cfg.device)
        if cfg.tensorboard:  # missing package: one line now, not a traceback after loading and sampling
            from pebr.run.metrics_log import check_tensorboard

            check_tensorboard()
        held = None
        if cfg.model:  # a training run's checkpoint is kept from its pruning while this run reads it
            held = hold_model_path(cfg.model)
            cfg = dataclasses.replace(cfg, model=held.path)
    try:
        return _run_held(cfg)
    finally:
        if held is not None:
            held.release()


def _run_held(cfg: C.TrainConfig) -> int:
    from transformers.utils import logging as hf_logging

    from pebr.run.distributed import init_world

    hf_logging.disable_progress_bar()  # transformers' save/load bars would break the training bar
    with errors_as_exit(settings=True):
        world = init_world(device=cfg.device, backend=cfg.dist_backend)
    try:
        with errors_as_exit():
            run(cfg, world)
    except BaseException as exc:
        if world.distributed and not isinstance(exc, SystemExit):
            print(f"pebr.train: rank {world.rank} of {world.world_size} failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
        raise
    finally:
        world.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
