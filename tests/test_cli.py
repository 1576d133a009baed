"""The command lines of pebr.train, pebr.sample and pebr.eval, generated from the config fields:
every flag people script against still parses into the same field, --help shows the preset's
real defaults, and bad values fail with a sentence."""
import dataclasses
import re

import pytest

from pebr.recipe import config as C
from pebr import eval as pebr_eval
from pebr import sample as pebr_sample
from pebr import train

# Every flag of `python -m pebr.train` before the parser was generated from the config (collected
# from the hand-written argparse list), with a value and the config field it must land in.
TRAIN_FLAGS = [
    ("--stage", ["2"], "stage", 2),
    ("--preset", ["paper"], "preset", "paper"),
    ("--model", ["some/folder"], "model", "some/folder"),
    ("--data", ["d.jsonl"], "data", "d.jsonl"),
    ("--output-dir", ["out"], "output_dir", "out"),
    ("--max-steps", ["7"], "max_steps", 7),
    ("--resume", [], "resume", True),
    ("--seed", ["5"], "seed", 5),
    ("--device", ["cuda"], "device", "cuda"),
    ("--dtype", ["bfloat16"], "dtype", "bfloat16"),
    ("--lr", ["3e-4"], "lr", 3e-4),
    ("--warmup-steps", ["3"], "warmup_steps", 3),
    ("--weight-decay", ["0.1"], "optimizer.weight_decay", 0.1),
    ("--grad-clip", ["0.5"], "optimizer.grad_clip", 0.5),
    ("-n", ["4"], "group_size", 4),
    ("--group-size", ["4"], "group_size", 4),
    ("--rollout-batch", ["32"], "rollout_batch", 32),
    ("--mini-batch", ["4"], "mini_batch", 4),
    ("--micro-batch", ["2"], "micro_batch", 2),
    ("--ppo-epochs", ["2"], "ppo_epochs", 2),
    ("--epochs", ["3"], "epochs", 3),
    ("--temperature", ["0.7"], "temperature", 0.7),
    ("--top-p", ["0.9"], "top_p", 0.9),
    ("--max-new-tokens", ["64"], "max_new_tokens", 64),
    ("--kl-coef", ["0"], "kl_coef", 0.0),
    ("--kl-type", ["mse"], "kl_type", "mse"),
    ("--clip-low", ["0.1"], "clip_low", 0.1),
    ("--clip-high", ["0.4"], "clip_high", 0.4),
    ("--dual-clip", ["2.5"], "dual_clip", 2.5),
    ("--loss-agg", ["seq-mean-token-sum"], "loss_agg", "seq-mean-token-sum"),
    ("--adv-scale", ["none"], "adv_scale", "none"),
    ("--freeze-vision", [], "freeze_vision", True),
    ("--no-freeze-vision", [], "freeze_vision", False),
    ("--online-filter", [], "online_filter", True),
    ("--no-online-filter", [], "online_filter", False),
    ("--split", ["hard"], "split", "hard"),
    ("--min-split-items", ["10"], "min_split_items", 10),
    ("--clip-model", ["clip/folder"], "clip_model", "clip/folder"),
    ("--save-every", ["5"], "save_every", 5),
    ("--keep-checkpoints", ["3"], "keep_checkpoints", 3),
    ("--no-progress", [], "progress", False),
    ("--sft-items", ["12"], "sft.num_items", 12),
    ("--sft-epochs", ["3"], "sft.epochs", 3),
    ("--sft-lr", ["1e-3"], "sft.lr", 1e-3),
    ("--sft-batch", ["8"], "sft.batch_size", 8),
    ("--sampling-k", ["4"], "sampling.k", 4),
    ("--sampling-items", ["20"], "sampling.num_items", 20),
    ("--sampling-temperature", ["0.5"], "sampling.temperature", 0.5),
]

# Flags added for the scale-out work and the ones generated for fields that had none.
NEW_TRAIN_FLAGS = [
    ("--dist-backend", ["gloo"], "dist_backend", "gloo"),
    ("--cpu-offload", [], "cpu_offload", True),
    ("--gradient-checkpointing", [], "gradient_checkpointing", True),
    ("--betas", ["0.9", "0.95"], "optimizer.betas", (0.9, 0.95)),
    ("--sft-num-items", ["12"], "sft.num_items", 12),
    ("--sft-batch-size", ["8"], "sft.batch_size", 8),
    ("--sft-micro-batch", ["4"], "sft.micro_batch", 4),
    ("--no-sft-freeze-vision", [], "sft.freeze_vision", False),
    ("--sampling-num-items", ["20"], "sampling.num_items", 20),
    ("--sampling-top-p", ["0.5"], "sampling.top_p", 0.5),
    ("--sampling-seed", ["9"], "sampling.seed", 9),
    ("--log-every", ["3"], "log_every", 3),
    ("--lora-rank", ["16"], "lora.rank", 16),
    ("--lora-alpha", ["8"], "lora.alpha", 8.0),
    ("--lora-dropout", ["0.05"], "lora.dropout", 0.05),
    ("--lora-targets", ["q_proj", "v_proj"], "lora.targets", ("q_proj", "v_proj")),
    ("--lora-vision", [], "lora.vision", True),
]

# pebr.sample and pebr.eval before: flag -> (argparse dest, default).
SAMPLE_FLAGS = {"--model": ("model", None), "--data": ("data", None), "--num-items": ("num_items", 128),
                "--seed": ("seed", 1), "-k": ("k", 8), "--k": ("k", 8), "--temperature": ("temperature", 1.2),
                "--top-p": ("top_p", 0.99), "--max-new-tokens": ("max_new_tokens", 96),
                "--batch-prompts": ("batch_prompts", 16), "--output-dir": ("output_dir", "runs"),
                "--device": ("device", None)}
EVAL_FLAGS = {"--model": ("model", None), "--data": ("data", None), "--num-items": ("num_items", 120),
              "--kind": ("kind", "mixed"), "--seed": ("seed", 999), "--temperature": ("temperature", 0.0),
              "--max-new-tokens": ("max_new_tokens", 96), "--output": ("output", None), "--output-dir": ("output_dir", "runs"),
              "--device": ("device", None)}


def _field(cfg, path):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _config(argv):
    return train.config_from_args(train.parse_args(argv))


@pytest.mark.parametrize("flag, values, path, expected", TRAIN_FLAGS + NEW_TRAIN_FLAGS, ids=lambda x: x if isinstance(x, str) and x.startswith("-") else "")
def test_train_flag_lands_in_its_field(flag, values, path, expected):
    argv = [flag, *values] if flag == "--stage" else ["--stage", "1", flag, *values]
    cfg = _config(argv)
    assert _field(cfg, path) == expected
    if flag not in ("--stage", "--preset"):  # nothing else moved
        default = _config(["--stage", "1"])
        changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}
        assert changed <= {path.split(".")[0]}


def test_every_old_train_flag_is_listed_and_accepted():
    options = {o for a in train.build_parser()._actions for o in a.option_strings}
    old = {flag for flag, *_ in TRAIN_FLAGS}
    assert old <= options
    assert len(old) == 48


def test_every_config_field_has_a_flag():
    options = {o for a in train.build_parser()._actions for o in a.option_strings}
    for cls, prefix in ((C.TrainConfig, ""), (C.SFTConfig, "sft-"), (C.SamplingConfig, "sampling-"),
                        (C.OptimizerConfig, ""), (C.LoRAConfig, "lora-")):
        for f in dataclasses.fields(cls):
            if f.name not in ("sft", "sampling", "optimizer", "lora"):
                assert "--" + prefix + f.name.replace("_", "-") in options, f.name
                assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no reason"


def test_unset_flags_keep_the_preset_and_derived_values():
    cfg = _config(["--stage", "2", "--preset", "paper"])
    expected = dataclasses.replace(C.preset("paper", 2), device=cfg.device)
    assert cfg == expected
    cfg = _config(["--stage", "1", "--rollout-batch", "3", "--sft-batch", "8"])
    assert cfg.mini_batch == 3 and cfg.sft.micro_batch == 8  # the preset's values did not fit
    assert _config(["--stage", "1", "--sft-batch", "64"]).sft.micro_batch == C.preset("tiny", 1).sft.micro_batch


@pytest.mark.parametrize("module, flags", [(pebr_sample, SAMPLE_FLAGS), (pebr_eval, EVAL_FLAGS)], ids=["sample", "eval"])
def test_sample_and_eval_flags_and_defaults(module, flags):
    parser = module.build_parser()
    by_option = {o: a for a in parser._actions for o in a.option_strings}
    base = ["--model", "m"] if module is pebr_eval else []
    defaults = parser.parse_args(base)
    for flag, (dest, default) in flags.items():
        assert by_option[flag].dest == dest, flag
        if default is not None:
            assert getattr(defaults, dest) == default, flag
    assert defaults.device in ("cpu", "cuda")
    assert "cpu, cuda or cuda:N" in " ".join(parser.format_help().split())  # --device is explained
    args = parser.parse_args([*base, "--num-items", "4", "--seed", "3", "--temperature", "0.5"])
    assert (args.num_items, args.seed, args.temperature) == (4, 3, 0.5)


def _help_entry(help_text: str, flag: str) -> str:
    """The help text of one option (its lines up to the next option), whitespace collapsed."""
    lines = help_text.splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(rf"\s+(-\w+ \w+, )?{re.escape(flag)}\b", ln))
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"\s{2}-|\S|$", lines[i])), len(lines))
    return " ".join(" ".join(lines[start:end]).split())


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        train.main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_shows_the_chosen_presets_defaults(capsys):
    out = _help(["--preset", "paper", "--stage", "2"], capsys)
    assert "(default: None)" not in out
    assert _help_entry(out, "--rollout-batch").endswith("(default: 512)")
    assert _help_entry(out, "--mini-batch").endswith("(default: 128)")
    assert _help_entry(out, "--lr").endswith("(default: 1e-06)")
    assert _help_entry(out, "--dtype").endswith("(default: bfloat16)")
    assert _help_entry(out, "--max-steps").endswith("(default: none)")
    assert _help_entry(out, "--sft-epochs").endswith("(default: 2)")
    assert _help_entry(out, "--dist-backend").endswith("(default: auto)")
    assert "--preset paper --stage 2" in " ".join(out.split())
    out = _help(["--stage", "1"], capsys)
    assert _help_entry(out, "--rollout-batch").endswith("(default: 16)")
    assert _help_entry(out, "--max-steps").endswith("(default: 150)")
    assert _help_entry(out, "--sft-epochs").endswith("(default: 24)")
    assert _help_entry(out, "--progress").endswith("(default: True)")
    entry = _help_entry(out, "--kl-coef")
    assert entry.startswith("--kl-coef KL_COEF weight of the KL-to-reference") and entry.endswith("(default: 0.05)")
    assert _help_entry(_help([], capsys), "--rollout-batch").endswith("(default: 16)")  # no --stage: tiny, 1


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["--dist-backend", "mpi"], "argument --dist-backend: invalid choice: 'mpi'"),
    (["--kl-type", "k3"], "argument --kl-type: invalid choice: 'k3'"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--group-size", "2.5"], "argument -n/--group-size: invalid int value: '2.5'"),
    (["--learning-rate", "1"], "unrecognized arguments: --learning-rate"),
])
def test_bad_values_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "1", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_inconsistent_values_fail_with_the_fields_named():
    with pytest.raises(SystemExit, match=r"error: mini_batch \(3\) must divide rollout_batch \(16\)"):
        train.main(["--stage", "1", "--mini-batch", "3"])
    with pytest.raises(ValueError, match="dist_backend must be one of auto, nccl, gloo, got 'mpi'"):
        C.TrainConfig(dist_backend="mpi")
    with pytest.raises(ValueError, match="kind must be one of"):
        C.EvalConfig(kind="all")
    with pytest.raises(SystemExit):
        pebr_eval.build_parser().parse_args(["--model", "m", "--kind", "all"])


def test_scale_out_fields_default_off():
    for cfg in (C.TrainConfig(), C.preset("tiny", 1), C.preset("paper", 2)):
        assert (cfg.dist_backend, cfg.cpu_offload, cfg.gradient_checkpointing) == ("auto", False, False)


def test_sample_preset_takes_the_trainers_sampling_settings():
    """`pebr.sample --preset tiny` samples as a default `pebr.train --stage 1` does (its cache's settings);
    flags given on the command line still win; without --preset the defaults stay what they were."""
    cfg = C.preset("tiny", 1)
    argv = ["--preset", "tiny", "--seed", "5"]
    args = pebr_sample.apply_preset(pebr_sample.build_parser().parse_args(argv), argv)
    assert (args.temperature, args.top_p, args.num_items, args.k, args.max_new_tokens) == (
        cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.num_items, cfg.sampling.k, cfg.max_new_tokens)
    assert args.seed == 5 and args.rollout_seed == cfg.seed  # pool seed given; draws under the run's seed
    plain = pebr_sample.apply_preset(pebr_sample.build_parser().parse_args([]), [])
    assert (plain.temperature, plain.top_p) == (1.2, 0.99)
