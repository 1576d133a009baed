"""What the curriculum ablation can see and how long it will take, said before it starts
(`python -m pebr.experiment curriculum` prints it; `--plan` prints it and stops).

    p = plan(cc, base_cfg)          # {"kinds": {kind: {"pairs", "discordance", "detectable", ...}}, "wall": {...}}
    print("\\n".join(plan_lines(p)))

The power of the comparison that decides (arm b against a and c, pooled over seeds on the same
held-out items; pebr.report.paired) depends on the pairs, items x seeds, and on the discordance
rate: the share of pairs one arm gets right and the other wrong (pebr.report.power). The rate is
--pilot-discordance when given, else the one measured on the arms already evaluated in OUT (a
resumed run), else the pilot's below. The wall time counts only what OUT does not already hold.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace

from pebr.recipe.config import opt
from pebr.recipe.curriculum import ARMS, CurriculumConfig
from pebr.recipe.paths import latest_policy_path
from pebr.report.curriculum_report import KINDS
from pebr.report.paired import discordant
from pebr.report.power import (
    ALPHA,
    POWER,
    detectable_difference,
    pairs_needed,
    power_at,
)
from pebr.report.stats import wilson_interval

TARGET = 0.03  # the difference in held-out reasoning accuracy the defaults are sized to detect (issue 26)

# The discordance rate of two arms, per kind, before any arm of this run is evaluated. No pilot has
# graded two arms item by item; the paired tables of the 2026-11-30 recipe runs (bench/RESULTS.md,
# 1,000 held-out items of each kind, one seed) graded each stage against the one before: reasoning
# warm-up -> stage 1 -> stage 2 discordant on 156 then 97 of 1,000 items (a second run: 153, 113);
# perception 229 then 199 (214, 192). Discordance is a distance (the share of items on which two
# policies differ), so the triangle inequality bounds it: warm-up to the end of that 150 + 150-step
# trajectory (arm b at the defaults) at most 0.27 on reasoning, 0.43 on perception; two arms, each
# that far from the same warm-up, at most twice that, and never more than the accuracies allow
# (p_a + p_b: about 0.79 on perception at 0.37-0.42). An upper bound makes the statement err on
# the side of too little power: the arms' true rate is lower wherever they share what the warm-up
# already gets right or wrong.
PILOT_DISCORDANCE = {"perception": 0.79, "reasoning": 0.53}


@dataclass(frozen=True)
class Timing:
    """Seconds of each part of the ablation on one machine, at the tiny preset's settings."""

    machine: str = opt("", "where and when it was measured, and how loaded the machine was")
    warmup_s: float = opt(0.0, "the warm-up (stage 0), when OUT holds none and --warmup is not given")
    sampling_s: float = opt(0.0, "the shared dataset-level sampling, when OUT holds none")
    grpo_step_s: float = opt(0.0, "one GRPO step, any stage (perception, reasoning and union steps were within 10% "
                                  "of each other in the 2026-11-30 ablation: 2.3-3.0 s)")
    eval_item_s: float = opt(0.0, "one held-out item decoded greedily")


# The 2-core CPUs the tiny preset is sized for. Quiet figures are from the 2026-11-30 runs on a
# 2-core Xeon (bench/RESULTS.md: warm-up 3 min 33 s; sampling 58 s; 9 arm-seeds of 60 steps in
# 160-180 s, b's stages 70-83 s a 30-step half; 10 evals of 985 items in 205 s).
TIMING = {("tiny", "cpu"): Timing(
    machine="2-core CPU, tiny preset, quiet (2026-11-30 Xeon: bench/RESULTS.md)",
    warmup_s=213.0, sampling_s=58.0, grpo_step_s=2.8, eval_item_s=205.0 / 9850.0)}


def _nominal_items(cc: CurriculumConfig) -> dict[str, int]:
    """Held-out items per kind before any is dropped as equal to a training item: the built-in
    mixed items alternate perception, reasoning, so perception gets the odd one."""
    return {"perception": (cc.eval_items + 1) // 2, "reasoning": cc.eval_items // 2}


def _read_outcomes(folder: str) -> dict[str, tuple[bool, str]] | None:
    """folder/heldout.jsonl -> {item id: (correct, kind)}, or None when it is not there or unreadable."""
    path = os.path.join(folder, "heldout.jsonl")
    out = {}
    try:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                out[str(r["id"])] = (bool(r["correct"]), str(r.get("kind") or r.get("task_type", "")).split("/")[0])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return out or None


def observed_discordance(cc: CurriculumConfig) -> dict[str, dict]:
    """Per kind, the discordance of arm b against a and against c on the seeds OUT already holds
    evals of both for -> {kind: {"rate", "discordant", "pairs", "comparisons"}}: "rate" is the upper
    end of the 95% Wilson interval of the larger comparison's discordant / pairs (an estimate from
    a few seeds errs on the side of too little power; 0 of a toy run's 8 pairs is not 0), and
    "comparisons" the plain rates; kinds with no pairs left out."""
    found = {k: {"b-a": [0, 0], "b-c": [0, 0]} for k in KINDS}  # kind -> comparison -> [discordant, pairs]
    by_key = {a.key: a for a in ARMS}
    for seed in range(cc.seeds):
        res = {k: _read_outcomes(os.path.join(cc.output_dir, a.folder, f"seed{seed}", "eval")) for k, a in by_key.items()}
        if res["b"] is None:
            continue
        for other in ("a", "c"):
            if res[other] is None:
                continue
            for kind in KINDS:
                ids = [i for i, (_, k) in res["b"].items() if k == kind]
                first = {i: c for i, (c, _) in res[other].items()}
                second = {i: c for i, (c, _) in res["b"].items()}
                n, g, l = discordant(first, second, ids)
                found[kind][f"b-{other}"][0] += g + l
                found[kind][f"b-{other}"][1] += n
    out = {}
    for kind, comps in found.items():
        rates = {c: d / n for c, (d, n) in comps.items() if n}
        if rates:
            worst = max(rates, key=lambda c: wilson_interval(*comps[c])[1])
            d, n = comps[worst]
            out[kind] = {"rate": wilson_interval(d, n)[1], "discordant": d, "pairs": n, "comparisons": rates}
    return out


def _stage_done(sdir: str, steps: int) -> bool:
    """A stage whose stage.json (written when it finished) records `steps` steps."""
    try:
        with open(os.path.join(sdir, "stage.json")) as f:
            return json.load(f).get("steps") == steps
    except (OSError, ValueError, AttributeError):
        return False


def _eval_done(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "heldout.summary.json"))


def remaining_work(cc: CurriculumConfig, base_cfg) -> dict:
    """What a run of `cc` still has to do, given what OUT holds -> {"warmup", "sampling": bool,
    "grpo_steps", "evals", "eval_items": int} (a stage trained in part counts as not started)."""
    out = cc.output_dir
    warmup = cc.warmup is None and latest_policy_path(replace(base_cfg, output_dir=os.path.join(out, "warmup")), 0) is None
    sampling = not os.path.isfile(os.path.join(out, "sampling", "splits.json"))
    steps, evals = 0, int(not _eval_done(os.path.join(out, "eval", "warmup")))
    for seed in range(cc.seeds):
        for arm in ARMS:
            adir = os.path.join(out, arm.folder, f"seed{seed}")
            steps += sum(n for st, n in zip(arm.stages, arm.steps(cc.steps)) if not _stage_done(os.path.join(adir, st.name), n))
            evals += int(not _eval_done(os.path.join(adir, "eval")))
    return {"warmup": warmup, "sampling": sampling, "grpo_steps": steps, "evals": evals,
            "eval_items": evals * cc.eval_items}


def plan(cc: CurriculumConfig, base_cfg, *, alpha: float = ALPHA, power: float = POWER) -> dict:
    """The power statement and the wall-time estimate of a run of `cc` (base_cfg: its stage-1
    TrainConfig, for the preset and the warm-up's folder) -> a JSON-safe dict; plan_lines says it."""
    items = _nominal_items(cc)
    seen = observed_discordance(cc)
    kinds = {}
    for kind in KINDS:
        if cc.pilot_discordance is not None:
            rate, source = cc.pilot_discordance, "--pilot-discordance"
        elif kind in seen:
            rate = seen[kind]["rate"]
            source = (f"upper 95% bound of {seen[kind]['discordant']} of {seen[kind]['pairs']} pairs discordant "
                      f"in the arms OUT already holds")
        else:
            rate, source = PILOT_DISCORDANCE[kind], "pilot bound (pebr/recipe/curriculum_plan.py, bench/RESULTS.md)"
        pairs = items[kind] * cc.seeds
        kinds[kind] = {"items_per_seed": items[kind], "seeds": cc.seeds, "pairs": pairs, "discordance": rate,
                       "discordance_source": source,
                       "detectable": detectable_difference(pairs, rate, alpha=alpha, power=power),
                       "power_at_target": power_at(TARGET, pairs, rate, alpha=alpha),
                       "pairs_for_target": pairs_needed(TARGET, rate, alpha=alpha, power=power) if TARGET <= rate else None}
    work = remaining_work(cc, base_cfg)
    timing = TIMING.get((base_cfg.preset, str(cc.device).split(":")[0]))
    wall = {"work": work, "timing": asdict(timing) if timing else None, "seconds": None}
    if timing is not None:
        parts = {"warmup": timing.warmup_s * work["warmup"], "sampling": timing.sampling_s * work["sampling"],
                 "grpo": timing.grpo_step_s * work["grpo_steps"], "evals": timing.eval_item_s * work["eval_items"]}
        wall.update(parts=parts, seconds=sum(parts.values()))
    return {"alpha": alpha, "power": power, "target": TARGET, "kinds": kinds, "wall": wall,
            "test": "pooled exact paired test of b against a (and c), pooled over seeds (pebr.report.paired)"}


def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min"


def plan_lines(p: dict) -> list[str]:
    """The plan as the lines the experiment prints before it starts."""
    lines = [f"power statement (two-sided alpha {p['alpha']}, power {p['power']:.0%}; {p['test']}):"]
    for kind, k in p["kinds"].items():
        det = k["detectable"]
        det_s = f"{det:.3f} ({det * 100:.1f} points)" if math.isfinite(det) else "none"
        need = "" if k["pairs_for_target"] is None else \
            f"; {p['target']:.2f} needs {k['pairs_for_target']:,} pairs ({math.ceil(k['pairs_for_target'] / k['seeds']):,} items a seed)"
        lines.append(f"  {kind}: {k['items_per_seed']:,} held-out items x {k['seeds']} seed{'s' * (k['seeds'] != 1)} "
                     f"= {k['pairs']:,} pairs, "
                     f"discordance {k['discordance']:.2f} ({k['discordance_source']}): smallest difference detected "
                     f"{det_s}; power at {p['target']:.2f}: {k['power_at_target']:.2f}{need}")
    w = p["wall"]
    work = w["work"]
    todo = (f"{work['grpo_steps']:,} GRPO steps, {work['evals']} evals of {work['eval_items'] // max(work['evals'], 1):,} items"
            + (", the warm-up" if work["warmup"] else "") + (", the sampling" if work["sampling"] else ""))
    if w["seconds"] is None:
        lines.append(f"  to do: {todo}; no timing recorded for this preset and device")
    else:
        parts = ", ".join(f"{k} {_hours(v)}" for k, v in w["parts"].items() if v)
        lines.append(f"  to do: {todo}: about {_hours(w['seconds'])} ({parts}) on a {w['timing']['machine']}")
    lines.append("  (items per kind before dropping those equal to a training item; a stage trained in part counts as not started)")
    return lines


__all__ = ["TARGET", "PILOT_DISCORDANCE", "Timing", "TIMING", "observed_discordance", "remaining_work", "plan", "plan_lines"]
