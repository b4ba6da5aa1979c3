"""The studies' runner and report (jackpot_jax/experiments/studies.py): configs built from the arms,
runs that skip when complete, and a report whose table is the seeds' statistics of the metrics."""
import json
import os

import numpy as np
import pytest

from jackpot_jax.experiments import studies
from jackpot_jax.train.config import validate
from jackpot_jax.train.metrics import read_metrics
from tests.test_train_resume import OVERRIDES


def test_every_arm_of_every_study_is_a_valid_config(tmp_path):
    for name, study in studies.STUDIES.items():
        for arm in study.arms:
            config = studies.run_config(name, arm, 1, str(tmp_path))
            validate(config)
            assert (config.seed, config.warm_start.seed) == (1, studies.WARM_START_SEED)
            assert config.warm_start.dir == str(tmp_path / "warm_start" / study.warm_start / "seed_0")
    # per-seed warm starts on request: each seed's in its own dir
    config = studies.run_config("decoupled", "jackpot", 2, str(tmp_path), [("warm_start.seed", -1)])
    assert config.warm_start.dir == str(tmp_path / "warm_start" / "demo" / "seed_2")
    config = studies.run_config("decoupled", "off_policy", 0, str(tmp_path), [("train.steps", 7)])
    assert (config.algorithm.mode, config.algorithm.beta, config.train.steps) == ("off_policy", 0.0, 7)
    assert studies.run_config("decoupled", "tis", 0, str(tmp_path)).algorithm.train_actor is False
    with pytest.raises(KeyError, match="config key 'train.stepz' is unknown"):
        studies.run_config("decoupled", "jackpot", 0, str(tmp_path), [("train.stepz", 7)])


def test_runs_go_seed_by_seed_and_the_warm_starts_once_per_dir(tmp_path, monkeypatch):
    """One process: seed by seed in the arms' order, complete runs skipped. The warm starts are
    trained once per warm-start dir (in parallel, before the runs), by a run with an actor (on_policy
    builds none): one dir for all seeds, or one per seed with ``warm_start.seed=-1``."""
    started = []
    monkeypatch.setattr(studies, "_train", lambda config, workdir: started.append(workdir) or workdir)
    out = str(tmp_path)
    _write(tmp_path / "decoupled" / "tis" / "seed_1", [{"step": 100}])  # complete
    assert studies.run("decoupled", out, seeds=(0, 1)) == started
    arms = ["on_policy", "off_policy", "tis", "tis_distill", "jackpot"]
    assert started == [studies.run_dir(out, "decoupled", arm, seed) for seed in (0, 1) for arm in arms
                       if (arm, seed) != ("tis", 1)]
    with pytest.raises(ValueError, match="jobs=0 is not allowed"):
        studies.run("decoupled", out, jobs=0)

    def leaders(overrides=()):
        configs = [studies.run_config("decoupled", arm, seed, out, overrides) for seed in (0, 1) for arm in arms]
        return [(c.algorithm.mode, c.seed, os.path.basename(c.warm_start.dir)) for c in studies._warm_start_leaders(configs)]

    assert leaders() == [("off_policy", 0, "seed_0")]
    assert leaders([("warm_start.seed", -1)]) == [("off_policy", 0, "seed_0"), ("off_policy", 1, "seed_1")]


def test_smooth_is_a_trailing_moving_average():
    values = np.arange(1.0, 8.0) ** 2
    want = [np.mean(values[max(0, i - 2):i + 1]) for i in range(len(values))]
    np.testing.assert_allclose(studies._smooth(values, 3), want)


def test_parse_override():
    assert studies.parse_override("train.steps=20") == ("train.steps", 20)
    assert studies.parse_override("algorithm.clip=False") == ("algorithm.clip", False)
    assert studies.parse_override("algorithm.mode=tis") == ("algorithm.mode", "tis")
    with pytest.raises(ValueError, match="expected key=value"):
        studies.parse_override("train.steps")


def _write(path, rows):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def test_report_table_is_the_mean_and_spread_over_seeds(tmp_path):
    rng = np.random.default_rng(0)
    want = {}
    for arm in ("jackpot", "off_policy"):
        for seed in (0, 1, 2):
            rows = [{"step": s, "reward/mean": float(rng.random()), "mismatch/kl_full": float(rng.random()),
                     "obrs/accept_rate": float(rng.random()), "obrs/kappa": float(rng.random())} for s in range(1, 31)]
            rows[0]["eval/policy/mean@4"], rows[-1]["eval/policy/mean@4"] = float(rng.random()), float(rng.random())
            _write(tmp_path / "decoupled" / arm / f"seed_{seed}", rows)
            want.setdefault(arm, []).append((rows[-1]["eval/policy/mean@4"],
                                             np.mean([r["mismatch/kl_full"] for r in rows[-studies.LAST:]]),
                                             rows[0]["eval/policy/mean@4"]))
    path = studies.report("decoupled", str(tmp_path))
    text = open(path, encoding="utf-8").read()
    assert os.path.getsize(tmp_path / "decoupled" / "curves.png") > 10_000
    for arm, figures in want.items():
        line = next(line for line in text.splitlines() if line.startswith(f"| {arm} |"))
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        assert cells[1] == "0, 1, 2" and cells[2] == "30"
        last = np.asarray([f[0] for f in figures])
        assert cells[4] == f"{100 * last.mean():.1f}% ± {100 * last.std(ddof=1):.1f}"
        gain = last - np.asarray([f[2] for f in figures])
        assert cells[5] == f"{100 * gain.mean():.1f}% ± {100 * gain.std(ddof=1):.1f}"
        vs_first = last - np.asarray([f[0] for f in want["off_policy"]])  # the study's first arm present
        assert cells[6] == ("0" if arm == "off_policy" else f"{100 * vs_first.mean():.1f}% ± {100 * vs_first.std(ddof=1):.1f}"
                            f" ({', '.join(f'{100 * v:+.1f}' for v in vs_first)})")
        kl = np.asarray([f[1] for f in figures])
        assert cells[8] == f"{kl.mean():.3f} ± {kl.std(ddof=1):.3f}"
        # the per-seed table: each seed's first and last evaluation, in percent
        assert "Policy Mean@4 (%) at steps 1 / 30:" in text
        line = [line for line in text.splitlines() if line.startswith(f"| {arm} |")][1]
        assert line == f"| {arm} | " + " | ".join(f"{100 * f[2]:.1f} / {100 * f[0]:.1f}" for f in figures) + " |"
    assert "| on_policy |" not in text  # arms without runs are left out
    with pytest.raises(FileNotFoundError, match="no run of study 'staleness'"):
        studies.report("staleness", str(tmp_path))


def test_warm_start_trains_what_the_runs_then_load(tmp_path, monkeypatch, caplog):
    """``studies warm-start``: the warm starts of both models, once for all seeds, without a run; a
    run of the study, of another seed too, then loads them instead of training its own."""
    tiny = studies.Study("a test", {**OVERRIDES, "data.data_dir": str(tmp_path / "data")},
                         {"on_policy": {"algorithm.mode": "on_policy"}, "jackpot": {}})
    monkeypatch.setitem(studies.STUDIES, "tiny", tiny)
    out = str(tmp_path / "results")
    assert studies.warm_start("tiny", out, seeds=(0, 1)) == [os.path.join(out, "warm_start", "demo", "seed_0")]
    seed_dir = os.path.join(out, "warm_start", "demo", "seed_0")
    assert os.listdir(os.path.join(out, "warm_start", "demo")) == ["seed_0"]  # one for both seeds
    assert sorted(os.listdir(seed_dir)) == ["actor", "policy"]  # from the arm with an actor
    assert not os.path.exists(os.path.join(out, "tiny"))  # no run
    specs = {name: json.load(open(os.path.join(seed_dir, name, "spec.json"))) for name in ("actor", "policy")}
    assert specs["policy"]["steps"] == specs["actor"]["steps"] == 5

    from jackpot_jax.train.loop import Trainer  # noqa: PLC0415

    caplog.set_level("INFO", logger="jackpot_jax.train.loop")
    Trainer(studies.run_config("tiny", "jackpot", 1, out), studies.run_dir(out, "tiny", "jackpot", 1))
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warm start of the")]
    assert loaded == [f"warm start of the {name}: {{'cached': True, 'final_loss': {specs[name]['final_loss']}}}"
                      for name in ("policy", "actor")]


@pytest.mark.slow  # ~3 min: python -m pytest -m slow tests/test_studies.py
def test_a_study_runs_each_arm_and_seed_once(tmp_path, monkeypatch):
    """Two arms x one seed of a tiny study, then the same command again: nothing left to run."""
    tiny = studies.Study("a test", {**OVERRIDES, "train.steps": 2, "data.data_dir": str(tmp_path / "data")},
                         {"jackpot": {}, "off_policy": {"algorithm.mode": "off_policy"}})
    monkeypatch.setitem(studies.STUDIES, "tiny", tiny)
    out = str(tmp_path / "results")
    ran = studies.run("tiny", out, seeds=(0,))
    assert ran == [studies.run_dir(out, "tiny", arm, 0) for arm in ("jackpot", "off_policy")]
    for workdir in ran:
        assert [row["step"] for row in read_metrics(workdir)] == [1, 2]
    # the two arms of seed 0 shared one warm start of each model
    assert sorted(os.listdir(os.path.join(out, "warm_start", "demo", "seed_0"))) == ["actor", "policy"]
    assert not os.path.exists(os.path.join(ran[0], "warm_start"))
    assert studies.run("tiny", out, seeds=(0,)) == []
    # two worker processes, seed 1 with its own warm starts: trained first, then loaded by both runs
    ran = studies.run("tiny", out, seeds=(1,), jobs=2, overrides=[("warm_start.seed", -1)])
    assert sorted(ran) == [studies.run_dir(out, "tiny", arm, 1) for arm in ("jackpot", "off_policy")]
    for workdir in ran:
        assert [row["step"] for row in read_metrics(workdir)] == [1, 2]
    assert sorted(os.listdir(os.path.join(out, "warm_start", "demo", "seed_1"))) == ["actor", "policy"]
    with pytest.raises(ValueError, match="study 'tiny' has no arm 'tis'"):
        studies.run("tiny", out, arms=["tis"])
