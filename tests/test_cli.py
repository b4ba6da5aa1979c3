"""What jackpot-train, jackpot-export and jackpot-eval share (jackpot_jax.console): a user error is one line
``prog: message`` (exit status 1) unless debugging, a bug keeps its traceback, and TensorFlow's start-up logs
are silenced by default."""
import os
import subprocess
import sys

import pytest

from jackpot_jax import console
from jackpot_jax.data import evaluate as evaluate_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "data")


@pytest.fixture
def clean_env(monkeypatch):
    """No debug switch, and the quiet defaults unset (restored after the test: main() sets them)."""
    for key in (console.DEBUG_ENV, *console.QUIET_ENV):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_user_errors_one_line_and_bugs_keep_their_traceback(clean_env):
    class Stopped(RuntimeError):
        pass

    def library_value_error():  # raised outside jackpot_jax (here: this test file), like a ValueError in JAX
        raise ValueError("incompatible shapes")

    for error, shown in [(FileNotFoundError("no such file /x"), True), (Stopped("stopped at step 3"), True),
                         (TypeError("a bug"), False), (AttributeError("a bug"), False)]:
        with pytest.raises(SystemExit if shown else type(error)) as info:
            with console.user_errors("jackpot-x", debug=False, own=(Stopped,)):
                raise error
        if shown:
            assert info.value.code == f"jackpot-x: {error}"  # sys.exit(message): stderr, status 1
    with pytest.raises(ValueError, match="incompatible shapes"):
        with console.user_errors("jackpot-x", debug=False):
            library_value_error()
    with pytest.raises(FileNotFoundError):  # debug: every error whole
        with console.user_errors("jackpot-x", debug=True):
            raise FileNotFoundError("no such file /x")
    assert not console.debug_requested([]) and console.debug_requested(["--debug"])
    assert console.debug_requested(["--debug=true"]) and not console.debug_requested(["--nodebug"])
    for value, debug in [("1", True), ("yes", True), ("0", False), ("", False)]:
        clean_env.setenv(console.DEBUG_ENV, value)
        assert console.debug_requested([]) is debug


def test_quiet_startup_sets_defaults_a_user_value_wins(clean_env):
    console.quiet_startup(debug=True)
    assert not any(key in os.environ for key in console.QUIET_ENV)  # JACKPOT_DEBUG: the logs stay
    clean_env.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    console.quiet_startup(debug=False)
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == console.QUIET_ENV["TF_ENABLE_ONEDNN_OPTS"]


def test_quiet_startup_silences_tensorflow():
    """The defaults are effective: TensorFlow's import notices are gone with them, there without."""
    pytest.importorskip("tensorflow")
    code = ("import sys; from jackpot_jax import console; console.quiet_startup(sys.argv[1] == 'debug'); "
            "import tensorflow")
    env = {k: v for k, v in os.environ.items() if k not in (console.DEBUG_ENV, *console.QUIET_ENV)}
    runs = {mode: subprocess.Popen([sys.executable, "-c", code, mode], stderr=subprocess.PIPE, text=True, env=env)
            for mode in ("quiet", "debug")}  # at once: an import of TensorFlow takes seconds
    logs = {mode: run.communicate(timeout=120)[1] for mode, run in runs.items()}
    assert all(run.returncode == 0 for run in runs.values()), logs
    if "oneDNN custom operations" not in logs["debug"]:
        pytest.skip("this TensorFlow build prints no oneDNN notice: nothing to silence")
    assert "oneDNN" not in logs["quiet"] and "cpu_feature_guard" not in logs["quiet"], logs["quiet"]


def test_jackpot_eval_errors(clean_env, tmp_path):
    args = ["--model", str(tmp_path / "none"), "--dataset", "gsm9k", "--data-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as info:  # reported before the model is loaded
        evaluate_lib.main(args)
    assert info.value.code.startswith("jackpot-eval: Unknown dataset 'gsm9k': the datasets are (")
    assert "\n" not in info.value.code
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == console.QUIET_ENV["TF_CPP_MIN_LOG_LEVEL"]
    with pytest.raises(ValueError, match="Unknown dataset 'gsm9k'"):
        evaluate_lib.main([*args, "--debug"])
    clean_env.setenv(console.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="Unknown dataset 'gsm9k'"):
        evaluate_lib.main(args)
    with pytest.raises(SystemExit) as info:  # argparse: --save-completions needs --out
        evaluate_lib.main([*args, "--save-completions"])
    assert info.value.code == 2


def test_jackpot_export_error_is_one_line(clean_env, tmp_path):
    from jackpot_jax.train.cli import export_main

    with pytest.raises(SystemExit) as info:
        export_main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert info.value.code.startswith("jackpot-export: ") and str(tmp_path / "nowhere") in info.value.code


def test_jackpot_train_demo_config_on_gsm8k_is_one_line(tmp_path):
    """The demo's data.config="d1" left on dataset gsm8k: one line naming the key, no traceback."""
    env = {k: v for k, v in os.environ.items() if k not in (console.DEBUG_ENV, *console.QUIET_ENV)}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", "from jackpot_jax.train.cli import train_main; train_main()",
         f"--workdir={tmp_path / 'run'}", "--config.data.dataset=gsm8k", f"--config.data.manual_dir={FIXTURES}",
         f"--config.data.data_dir={tmp_path / 'tfds'}"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "jackpot-train: Dataset 'gsm8k' has no config 'd1': its configs are ('default', 'skip_bad_lines') "
        "(config.data.config in a training config; empty or None: the default, 'default')."], result.stderr
    assert not (tmp_path / "tfds").exists()  # nothing prepared
