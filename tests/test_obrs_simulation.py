"""The OBRS simulation (paper Fig. 2): a small run end to end, its CLI, and its config errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from configs.obrs_simulation import get_config
from jackpot_jax.config import ConfigError
from jackpot_jax.experiments import obrs_simulation

REPO = Path(__file__).resolve().parents[1]


def small_config():
    config = get_config()
    config.vocab_size, config.num_positions = 512, 8
    config.noise_strengths, config.sharpen_strengths = (0.1, 1.0, 3.0), (1.2, 2.0)
    config.ratio_panel_level = 1
    return config


def test_simulation_writes_plot_table_and_results(tmp_path):
    results = obrs_simulation.run(small_config(), tmp_path)
    png = (tmp_path / "obrs_simulation.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    table = (tmp_path / "obrs_simulation.md").read_text()
    assert table.count("\n| ") == 2 + 5  # a header row per family, one row per level
    assert json.loads((tmp_path / "results.json").read_text())["levels"] == results["levels"]
    for level in results["levels"]:
        assert 0 < level["classic_rs_accept"] <= 1
        for name, s in level["settings"].items():
            # Thm 3.3 (and, for lam >= max p/q, exactness): OBRS never moves p_inf away from p_target.
            assert s["kl_after"] <= level["kl_before"] * (1 + 1e-9), name
            if name.startswith("budget"):
                assert s["accept"] == pytest.approx(float(name.split("=")[1]), abs=1e-8)
    mismatch = [lv["kl_before"] for lv in results["levels"] if lv["family"] == "noise"]
    assert mismatch == sorted(mismatch)  # more noise, more mismatch


@pytest.mark.parametrize("key,value,match", [
    ("vocab_size", 1, r"config.vocab_size=1 is not allowed: it must be an integer >= 2"),
    ("budgets", (0.9, 1.5), r"config.budgets=\(0.9, 1.5\) is not allowed"),
    ("families", ("noise", "shuffle"), r"config.families=.*a non-empty subset of"),
])
def test_bad_config_names_the_key(tmp_path, key, value, match):
    config = small_config()
    config[key] = value
    with pytest.raises(ConfigError, match=match):
        obrs_simulation.run(config, tmp_path)


def test_unknown_config_key_is_rejected(tmp_path):
    config = small_config()
    config.vocab = 10
    with pytest.raises(ConfigError, match="config.vocab is not a known key"):
        obrs_simulation.run(config, tmp_path)


def test_command_line_with_overrides(tmp_path):
    args = [sys.executable, "-m", "jackpot_jax.experiments.obrs_simulation", "--out", str(tmp_path),
            "--config.vocab_size=256", "--config.num_positions=4", "--config.families=('sharpen',)",
            "--config.sharpen_strengths=(1.5,)", "--config.ratio_panel_family=sharpen",
            "--config.ratio_panel_level=0"]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "### Mismatch family: sharpen" in done.stdout
    assert (tmp_path / "obrs_simulation.png").exists()

    bad = subprocess.run(args + ["--config.num_positions=0"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0
    assert "error: config.num_positions=0 is not allowed" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_default_simulation_obeys_the_theorems(tmp_path):
    """The full demo configuration (32k vocabulary, about 70 s on 2 cores)."""
    results = obrs_simulation.run(get_config(), tmp_path)
    for level in results["levels"]:
        for name, s in level["settings"].items():
            assert s["kl_after"] <= level["kl_before"] * (1 + 1e-9), name
            if "budget" in name:
                assert s["accept"] == pytest.approx(float(name.split("=")[1]), abs=1e-8)
