"""The paper's findings as studies: arms x seeds of the trainer, resumable, and their report.

    python -m jackpot_jax.experiments.studies warm-start decoupled --out results  # optional: the warm starts alone
    python -m jackpot_jax.experiments.studies run decoupled --out results         # every arm, seeds 0 1 2
    python -m jackpot_jax.experiments.studies report decoupled --out results      # plots + a Markdown table

A study is a set of arms, each a few overrides of ``configs/demo.py`` on top of the study's own.
Each arm runs once per seed, into ``OUT/STUDY/ARM/seed_S`` (a trainer work dir). Every run starts
from the same warm-started models (``warm_start.seed = WARM_START_SEED``, as runs start from one
pretrained checkpoint: the seeds differ in RL's randomness only), trained once and shared across
studies too (``OUT/warm_start/GROUP/seed_0``, the study's warm-start group: same settings). All
runs share their compiled programs (JAX's persistent compilation cache, ``OUT/jax_cache``). ``run`` skips the runs that are complete and
resumes an interrupted one from its last checkpoint, so an interrupted study continues where it
stopped. ``report`` writes ``OUT/STUDY/report.md`` (a table over the seeds: mean and spread of each
arm's figures) and ``OUT/STUDY/curves.png`` (reward, actor-policy KL, acceptance, kappa and the
policy's evaluation against the step; each arm's mean over seeds, with its min-max band). Results
and the commands that made them: ``docs/results.md``.
``--set key=value`` overrides any config key for every arm (``--set train.steps=20``).
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import logging
import os
import pathlib
from typing import NamedTuple

import numpy as np

from jackpot_jax.train.metrics import METRICS_FILE, read_metrics

logger = logging.getLogger(__name__)

ROOT = pathlib.Path(__file__).resolve().parents[2]


class Study(NamedTuple):
    question: str  # the paper's claim the study tests
    base: dict  # overrides of configs/demo.py for every arm
    arms: dict  # arm name -> its own overrides
    warm_start: str = "demo"  # studies with one group share warm starts: the same warm-start settings


# the paper's "no alignment": no correction of the policy, no distillation of the actor
_UNCORRECTED = {"algorithm.mode": "off_policy", "algorithm.beta": 0.0}

STUDIES = {
    "decoupled": Study(
        "With a separate smaller actor, uncorrected training degrades; TIS (+ distillation) lags and its "
        "actor-policy KL grows; Jackpot keeps the KL small and matches on-policy training.",
        {"train.eval_every": 25},
        {"on_policy": {"algorithm.mode": "on_policy", "algorithm.train_actor": False},
         "off_policy": _UNCORRECTED,
         "tis": {"algorithm.mode": "tis", "algorithm.train_actor": False},
         "tis_distill": {"algorithm.mode": "tis_distill"},
         "jackpot": {}}),
    "staleness": Study(
        "With a rollout batch 32x the train batch and no PPO clipping, the uncorrected update collapses, "
        "clipped off-policy training is slow, and Jackpot stays stable.",
        # the policy at a quarter of the demo's lr: at 2e-5, 800 updates of 4 sequences overfit each
        # step's prompts and every arm degrades (docs/results.md)
        {"algorithm.train_batch_size": 4, "algorithm.micro_batch_size": 4, "train.steps": 25,
         "train.eval_every": 5, "optim.policy.lr": 5e-6},
        {"off_policy_clip": {"algorithm.mode": "off_policy"},
         "off_policy_no_clip": {"algorithm.mode": "off_policy", "algorithm.clip": False},
         "jackpot_no_clip": {"algorithm.clip": False}}),
    "small_mismatch": Study(
        "With an actor that is a stale copy of the policy (synced every 4 steps, 4 updates per rollout "
        "batch), Jackpot adds little over TIS: PPO's clip already bounds a small mismatch.",
        {"actor.preset": "tiny-qwen3-large", "actor.init": "policy", "algorithm.train_actor": False,
         "algorithm.actor_sync_every": 4, "algorithm.train_batch_size": 32, "algorithm.micro_batch_size": 32,
         "train.eval_every": 25},
        {"tis": {"algorithm.mode": "tis"}, "jackpot": {}, "off_policy": {"algorithm.mode": "off_policy"}}),
    "controller": Study(
        "Beyond the paper: the KL controller of the distillation weight and the actor's learning rate keeps "
        "Jackpot stable at an actor learning rate (100x the demo's) at which a fixed distillation weight "
        "fails; and what it costs at the demo's.",
        {"train.eval_every": 25},
        {f"{name}_actor_lr_{lr:g}": {**overrides, "optim.actor.lr": lr}
         for lr in (2e-5, 2e-3)
         for name, overrides in (("beta_0.1", {}),
                                 # the demo's target_kl (0.1); --set algorithm.controller.target_kl=0.2
                                 # is the variant in docs/results.md
                                 ("controller", {"algorithm.controller.kind": "kl",
                                                 "algorithm.controller.lr_rate": 1.0,
                                                 "algorithm.controller.lr_scale_min": 1e-3}))}),
}

CURVES = ("reward/mean", "mismatch/kl_full", "obrs/accept_rate", "obrs/kappa", "controller/beta",
          "controller/actor_lr_scale")
LOG_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
LAST = 10  # the table's "late" figures: the mean over the last LAST logged steps
# Every seed of a study starts from the warm starts of this seed, as the paper's runs start from one
# pretrained checkpoint: the seeds differ only in RL's randomness (rollouts, batches, OBRS masks).
WARM_START_SEED = 0


def _demo_config():
    spec = importlib.util.spec_from_file_location("jackpot_studies_demo", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _set(config, key: str, value):
    *sections, name = key.split(".")
    target = config
    for section in sections:
        if section not in target:
            raise KeyError(f"config key {key!r}: no section {section!r}.")
        target = target[section]
    if name not in target:
        raise KeyError(f"config key {key!r} is unknown: {'.'.join(sections) or 'config'} has {sorted(target.keys())}.")
    target[name] = value


def parse_override(text: str):
    """``"key=value"`` -> ``(key, value)``; the value as a Python literal when it is one, else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {text!r}: expected key=value, e.g. train.steps=20.")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def run_config(study: str, arm: str, seed: int, out: str, overrides=()):
    """The trainer config of one run: the demo's, the study's, the arm's, then ``overrides``; every
    seed starts from the warm starts of :data:`WARM_START_SEED` (unless ``overrides`` set
    ``warm_start.seed``)."""
    spec = STUDIES[study]
    config = _demo_config()
    config.warm_start.seed = WARM_START_SEED
    for key, value in [*spec.base.items(), *spec.arms[arm].items(), *overrides]:
        _set(config, key, value)
    config.seed = seed
    model_seed = seed if config.warm_start.seed == -1 else config.warm_start.seed  # build.model_seed
    config.warm_start.dir = os.path.join(os.path.abspath(out), "warm_start", spec.warm_start, f"seed_{model_seed}")
    config.train.progress = False
    return config


def run_dir(out: str, study: str, arm: str, seed: int) -> str:
    return os.path.join(out, study, arm, f"seed_{seed}")


def _complete(workdir: str, steps: int) -> bool:
    path = os.path.join(workdir, METRICS_FILE)
    return os.path.exists(path) and any(row["step"] == steps for row in read_metrics(path))


def _compilation_cache(out_dir: pathlib.Path) -> None:
    """The runs of a study compile the same programs (arms differ in a few settings, seeds not at
    all): JAX's persistent compilation cache, ``OUT/jax_cache``, compiles each once per results dir.
    Keyed by the program, it cannot change a result, only skip recompiling it."""
    import jax  # noqa: PLC0415

    jax.config.update("jax_compilation_cache_dir", str(out_dir / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _train(config, workdir: str) -> str:
    from jackpot_jax.train.loop import Trainer  # noqa: PLC0415 (JAX, TensorFlow Datasets)

    _compilation_cache(pathlib.Path(workdir).resolve().parents[2])  # OUT/STUDY/ARM/seed_S
    Trainer(config, workdir).run()
    return workdir


def _warm_start(config) -> str:
    from jackpot_jax.train.loop import warm_start_only  # noqa: PLC0415 (JAX, TensorFlow Datasets)

    directory = config.warm_start.dir
    _compilation_cache(pathlib.Path(directory).resolve().parents[2])  # OUT/warm_start/GROUP/seed_S
    logger.info("warm starts in %s", directory)
    warm_start_only(config, directory)
    return directory


def _warm_starts_both(config) -> bool:
    """Whether a run of ``config`` warm-starts every model the runs of its warm-start dir use: one
    with an actor (on-policy training builds the policy alone)."""
    return config.algorithm.mode != "on_policy"


def _warm_start_leaders(configs) -> list:
    """One config per warm-start dir of ``configs``: one whose run trains every model of that dir."""
    groups = {}
    for config in configs:
        groups.setdefault(config.warm_start.dir, []).append(config)
    return [next((c for c in group if _warm_starts_both(c)), group[0]) for group in groups.values()]


def warm_start(study: str, out: str, seeds=(0, 1, 2), overrides=()) -> list[str]:
    """Train the warm starts of ``study``'s runs without the runs (those cached with the same
    settings are kept); returns their dirs. The seeds share one warm start (:data:`WARM_START_SEED`),
    and the studies of one warm-start group share it too (docs/results.md, "Time")."""
    configs = [run_config(study, arm, seed, out, overrides) for seed in seeds for arm in STUDIES[study].arms]
    return [_warm_start(config) for config in _warm_start_leaders(configs)]


def run(study: str, out: str, seeds=(0, 1, 2), arms=None, overrides=(), jobs: int = 1) -> list[str]:
    """Run every (arm, seed) of ``study`` not yet complete; returns the work dirs run.

    ``jobs=1``: one after the other, in this process (the first run trains the warm starts, the
    others load them). ``jobs > 1``: the warm starts first, each in a worker process, then the runs,
    ``jobs`` worker processes at once, so that no two processes train one warm start. On small
    models one run leaves much of a CPU idle (Python, dispatch, decoding one token at a time): on
    the 2-core CPU, study 1's 15 runs took 32 min with ``jobs=2`` against about 4 min each alone.
    The warm starts are compute-bound: two at once take as long as two in a row (docs/results.md,
    "Time").
    """
    arms = list(STUDIES[study].arms) if arms is None else list(arms)
    unknown = [arm for arm in arms if arm not in STUDIES[study].arms]
    if unknown:
        raise ValueError(f"study {study!r} has no arm {unknown[0]!r}; its arms: {list(STUDIES[study].arms)}.")
    if jobs < 1:
        raise ValueError(f"jobs={jobs} is not allowed: give the number of worker processes, 1 or more.")
    todo = []  # (config, workdir), seed by seed in the arms' order
    for seed in seeds:
        for arm in arms:
            config = run_config(study, arm, seed, out, overrides)
            workdir = run_dir(out, study, arm, seed)
            if _complete(workdir, config.train.steps):
                logger.info("%s/%s/seed_%d is complete; skipped", study, arm, seed)
            else:
                todo.append((config, workdir))
    if jobs == 1 or not todo:
        ran = []
        for config, workdir in todo:
            logger.info("running %s", workdir)
            ran.append(_train(config, workdir))
        return ran
    return _run_parallel(todo, jobs)


def _log_like(level: int) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT)


def _run_parallel(todo: list, jobs: int) -> list[str]:
    import concurrent.futures  # noqa: PLC0415
    import multiprocessing  # noqa: PLC0415

    # spawn, not fork: a forked JAX runtime is not safe to use; the workers log as this process does
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_log_like,
                                                initargs=(logging.getLogger().getEffectiveLevel(),)) as pool:
        # the warm starts, then the runs that load them: a failure raises here, before any run starts
        list(pool.map(_warm_start, _warm_start_leaders([config for config, _ in todo])))
        futures = []
        for config, workdir in todo:
            logger.info("running %s", workdir)
            futures.append(pool.submit(_train, config, workdir))
        try:
            return [future.result() for future in futures]  # a failed run raises here
        except BaseException:
            for future in futures:  # the runs not started yet; the running ones finish (or resume later)
                future.cancel()
            raise


# ---------------------------------------------------------------------------- report


def _runs(out: str, study: str) -> dict[str, dict[int, list[dict]]]:
    """``{arm: {seed: metrics rows}}`` of the study's runs present under ``out``."""
    found = {}
    for arm in STUDIES[study].arms:
        arm_dir = os.path.join(out, study, arm)
        if not os.path.isdir(arm_dir):
            continue
        for name in sorted(os.listdir(arm_dir)):
            path = os.path.join(arm_dir, name, METRICS_FILE)
            if name.startswith("seed_") and os.path.exists(path):
                found.setdefault(arm, {})[int(name[len("seed_"):])] = read_metrics(path)
    return found


def _series(rows: list[dict], key: str):
    points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
    return np.asarray([p[0] for p in points]), np.asarray([p[1] for p in points], np.float64)


def _eval_key(runs) -> str | None:
    for seeds in runs.values():
        for rows in seeds.values():
            for row in rows:
                for key in row:
                    if key.startswith("eval/policy/mean@"):
                        return key
    return None


def summarize(runs) -> dict:
    """Per arm: each seed's figures (policy evaluation at the first and last evaluated step, and
    the mean of each curve over its last LAST steps), for the table."""
    eval_key = _eval_key(runs)
    table = {}
    for arm, seeds in runs.items():
        figures = {}
        for seed, rows in sorted(seeds.items()):
            row = {}
            if eval_key:
                steps, values = _series(rows, eval_key)
                if len(values):
                    row["eval_first"], row["eval_last"] = values[0], values[-1]
                    row["eval_gain"] = values[-1] - values[0]
            for key in CURVES:
                _, values = _series(rows, key)
                if len(values):
                    row[key] = float(np.mean(values[-LAST:]))
            row["steps"] = max(r["step"] for r in rows)
            figures[seed] = row
        table[arm] = figures
    reference = next(iter(table.values()), {})  # the study's first arm present: paired by seed
    for figures in table.values():
        for seed, row in figures.items():
            if "eval_last" in row and "eval_last" in reference.get(seed, {}):
                row["eval_vs_reference"] = row["eval_last"] - reference[seed]["eval_last"]
    return table


def _cell(values, percent=False):
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if not len(values):
        return "n/a"
    scale, unit = (100.0, "%") if percent else (1.0, "")
    mean = scale * values.mean()
    spread = scale * (values.std(ddof=1) if len(values) > 1 else 0.0)
    digits = 1 if percent else 3
    return f"{mean:.{digits}f}{unit} ± {spread:.{digits}f}"


def _per_seed(values) -> str:
    """``" (+1.2, -0.4, ...)"``: each seed's value in points, after a cell of their mean and spread."""
    values = [v for v in values if v is not None and np.isfinite(v)]
    return f" ({', '.join(f'{100 * v:+.1f}' for v in values)})" if len(values) > 1 else ""


def markdown(study: str, runs) -> str:
    """The study's tables: one row per arm, mean ± standard deviation over its seeds (the same-seed
    differences also seed by seed); then each run's policy evaluations, step by step."""
    eval_key = _eval_key(runs) or "eval/policy/mean@k"
    k = eval_key.rsplit("@", 1)[-1]
    table = summarize(runs)
    reference = next(iter(table), "the first arm")
    lines = [f"### Study `{study}`", "", f"The paper's claim tested here: {STUDIES[study].question}", "",
             f"| arm | seeds | steps | policy Mean@{k}, first eval | policy Mean@{k}, last eval | gain (last - first) "
             f"| last eval - {reference}'s | reward (last {LAST}) | KL actor-policy (last {LAST}) "
             f"| acceptance (last {LAST}) | kappa (last {LAST}) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, figures in table.items():
        rows = list(figures.values())
        get = lambda key: [row.get(key) for row in rows]  # noqa: E731
        lines.append(f"| {arm} | {', '.join(str(s) for s in figures)} | {min(get('steps'))} | "
                     f"{_cell(get('eval_first'), True)} | {_cell(get('eval_last'), True)} | "
                     f"{_cell(get('eval_gain'), True)} | "
                     f"{'0' if arm == reference else _cell(get('eval_vs_reference'), True) + _per_seed(get('eval_vs_reference'))} | "
                     f"{_cell(get('reward/mean'))} | {_cell(get('mismatch/kl_full'))} | "
                     f"{_cell(get('obrs/accept_rate'))} | {_cell(get('obrs/kappa'))} |")
    lines += ["", f"Mean ± standard deviation over the seeds. \"gain\": each seed's last evaluation minus its first "
              f"(the step-0 evaluations differ by sampling only: one warm start); \"- {reference}'s\": the "
              f"difference to the first arm's last evaluation with the same seed; \"last {LAST}\": the mean over "
              f"a run's last {LAST} logged steps."]
    evaluated = sorted({int(step) for seeds in runs.values() for rows in seeds.values()
                        for step in _series(rows, eval_key)[0]})
    if evaluated:
        seeds = sorted({seed for figures in runs.values() for seed in figures})
        lines += ["", f"Policy Mean@{k} (%) at steps {' / '.join(map(str, evaluated))}:", "",
                  f"| arm | {' | '.join(f'seed {seed}' for seed in seeds)} |", "|---" * (len(seeds) + 1) + "|"]
        for arm, figures in runs.items():
            cells = []
            for seed in seeds:
                steps, values = _series(figures.get(seed, []), eval_key)
                at = dict(zip(steps.tolist(), values.tolist()))
                cells.append(" / ".join(f"{100 * at[step]:.1f}" if step in at else "-" for step in evaluated))
            lines.append(f"| {arm} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _smooth(values, window: int):
    """Trailing moving average over ``window`` points (the first ones over what there is)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.maximum(np.arange(1, len(values) + 1) - window, 0)]) / counts


def plot(study: str, runs, path: str, smooth: int = 5) -> str:
    """``path`` (PNG): each curve against the step, per arm the mean over seeds and its min-max band
    (per-step curves smoothed over ``smooth`` steps); the evaluation also as each seed's gain over
    its first evaluation. One colour per arm in every panel."""
    from matplotlib.figure import Figure  # noqa: PLC0415

    eval_key = _eval_key(runs)
    present = lambda key: any(len(_series(rows, key)[1]) for seeds in runs.values() for rows in seeds.values())  # noqa: E731
    panels = [(key, key, False) for key in CURVES if present(key)]
    if eval_key:
        panels += [(eval_key, eval_key, False), (eval_key, f"{eval_key} gain over the first evaluation", True)]
    colors = {arm: f"C{i}" for i, arm in enumerate(STUDIES[study].arms)}
    columns = 3
    rows_count = (len(panels) + columns - 1) // columns
    figure = Figure(figsize=(5 * columns, 3.6 * rows_count), layout="constrained")
    axes = figure.subplots(rows_count, columns, squeeze=False).ravel()
    for ax, (key, title, gain) in zip(axes, panels):
        for arm, seeds in runs.items():
            curves = [_series(rows, key) for rows in seeds.values()]
            curves = [(s, v - v[0] if gain else v if key == eval_key else _smooth(v, smooth)) for s, v in curves
                      if len(v)]
            if not curves:
                continue
            steps = np.unique(np.concatenate([c[0] for c in curves]))
            stack = np.stack([np.interp(steps, s, v, left=np.nan, right=np.nan) for s, v in curves])
            ax.plot(steps, np.nanmean(stack, axis=0), label=arm, color=colors[arm])
            ax.fill_between(steps, np.nanmin(stack, axis=0), np.nanmax(stack, axis=0), color=colors[arm], alpha=0.15)
        ax.set_title(title if key == eval_key else f"{title} (moving average of {smooth})", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    figure.suptitle(f"study {study}: mean over seeds, band = min-max over seeds")
    figure.savefig(path, dpi=90)
    return path


def report(study: str, out: str) -> str:
    """Write ``OUT/STUDY/report.md`` and ``curves.png``; returns the report's path."""
    runs = _runs(out, study)
    if not runs:
        raise FileNotFoundError(f"no run of study {study!r} under {out}: run `studies run {study} --out {out}` first.")
    directory = os.path.join(out, study)
    plot(study, runs, os.path.join(directory, "curves.png"))
    path = os.path.join(directory, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(markdown(study, runs) + "\n![curves](curves.png)\n")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run the paper's studies (arms x seeds) and report them.")
    parser.add_argument("command", choices=("warm-start", "run", "report"))
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--out", required=True, help="results directory (one subdirectory per study)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=None, help="a subset of the study's arms (default: all)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, each in its own process (2 on the 2-core CPU: docs/results.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every arm, e.g. train.steps=20 (repeatable)")
    args = parser.parse_args(argv)
    _log_like(logging.INFO)
    overrides = [parse_override(text) for text in args.overrides]
    if args.command == "warm-start":
        warm_start(args.study, args.out, seeds=args.seeds, overrides=overrides)
        return
    if args.command == "run":
        run(args.study, args.out, seeds=args.seeds, arms=args.arms, overrides=overrides, jobs=args.jobs)
    print(report(args.study, args.out))


if __name__ == "__main__":
    main()
