"""`python -m pebr.experiment curriculum`: the paper's ablation in one command. Does perception
GRPO before reasoning GRPO help, against reasoning GRPO alone and one GRPO stage on both rewards?

The arms, what OUT holds and how a killed run resumes: pebr/recipe/curriculum.py (its docstring is
this command's --help).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

import torch

from pebr.recipe import config as C
from pebr.recipe import curriculum
from pebr.recipe.builder import make_reward_fn  # noqa: F401  (scripts import it from here)
from pebr.recipe.curriculum import (  # noqa: F401
    _SAMPLING_FLAGS,
    _SFT_FLAGS,
    _TRAIN_FLAGS,
    ARMS,
    Arm,
    CurriculumConfig,
    Overrides,
    Stage,
    aggregate,
    check_eval_seed,
    eval_cached,
    held_out_items,
    kind_scores,
    markdown,
    plot,
    run_curriculum,
    stage_config,
    stage_items,
    train_stage,
)
from pebr.recipe.curriculum_plan import plan, plan_lines
from pebr.report.curriculum_report import KINDS  # noqa: F401
from pebr.rewards import UNION_FORMULA, union_reward  # noqa: F401  (scripts import them from here)
from pebr.run.cli import add_fields, check_device, errors_as_exit, given

# ---- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pebr.experiment", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    c = sub.add_parser("curriculum", help="a: stage 2 alone, b: stage 1 then stage 2, c: one stage on the union "
                                          "reward; held-out accuracy over seeds, b against a and c paired on "
                                          "the same items",
                       description="\n\n".join(curriculum.__doc__.split("\n\n")[1:6]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {"": add_fields(c, CurriculumConfig)}
    shown = C.preset("tiny", 2)
    g = c.add_argument_group("training settings, every stage alike (default: the preset's; shown: tiny)")
    fields["train"] = add_fields(g, C.TrainConfig, shown=shown, only=_TRAIN_FLAGS, aliases={"group_size": ["-n"]},
                                 unset_default=True)
    fields["sft"] = add_fields(g, C.SFTConfig, shown=shown.sft, prefix="sft-", only=_SFT_FLAGS,
                               aliases={"num_items": ["--sft-items"], "batch_size": ["--sft-batch"]}, unset_default=True)
    fields["sampling"] = add_fields(g, C.SamplingConfig, shown=shown.sampling, prefix="sampling-", only=_SAMPLING_FLAGS,
                                    aliases={"num_items": ["--sampling-items"]}, unset_default=True)
    c.set_defaults(_fields=fields)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    f = args._fields
    with errors_as_exit(settings=True):
        cc = CurriculumConfig(**given(args, f[""]))
        if cc.device is None:
            cc.device = "cuda" if torch.cuda.is_available() else "cpu"
        check_device(cc.device)
        over = Overrides(given(args, f["train"]), given(args, f["sft"]), given(args, f["sampling"]))
        base = stage_config(cc, over, stage=1, seed=0, output_dir=cc.output_dir)
        check_eval_seed(cc, base)  # bad values: one line now
    with errors_as_exit():
        power = plan(cc, base)  # said before anything runs: what these items x seeds can detect, and how long
        power["lines"] = plan_lines(power)
    print("\n".join(power["lines"]), flush=True)
    if cc.plan:
        return 0
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with errors_as_exit():
        run_curriculum(cc, over, command="python -m pebr.experiment " + shlex.join(argv), plan=power)
    print(f"table: {os.path.join(cc.output_dir, 'curriculum.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
