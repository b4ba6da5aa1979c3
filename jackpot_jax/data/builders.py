"""TFDS builders (``GeneratorBasedBuilder``) of the datasets in :mod:`jackpot_jax.data.datasets`; the file
datasets read their records with :mod:`jackpot_jax.data.manual_files`.

This module imports TensorFlow Datasets; :func:`jackpot_jax.data.datasets.load_split` imports it
lazily. The builders are not added to the global TFDS registry (``skip_registration``), so their
names (``gsm8k``, ``math``, ...) never clash with other TFDS datasets; use them through
:data:`BUILDERS` or ``load_split``. Every builder has the features ``problem``, ``answer``,
``solution`` (text) and keeps its records in source / generation order (no shuffling at write time).
"""
from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from jackpot_jax.data import arithmetic
from jackpot_jax.data import manual_files

_FEATURES = ("problem", "answer", "solution")


def _features():
    return tfds.features.FeaturesDict({key: tfds.features.Text() for key in _FEATURES})


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common base. ``code_path = None``: nothing is downloaded, so there is no checksums file to
    look for next to the code (and TFDS's lookup of the code's path would import
    ``importlib_resources``, which TFDS does not declare as a dependency)."""

    code_path = None
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}


# ------------------------------------------------------------------------------------------------
# jackpot_arithmetic
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class ArithmeticConfig(tfds.core.BuilderConfig):
    """``difficulty``: number of operations per problem; ``form``: ``"word"`` or ``"expression"``
    (:mod:`jackpot_jax.data.arithmetic`); split sizes and seeds (the train split never contains a
    test problem)."""
    difficulty: int = 1
    form: str = "word"
    train_size: int = 2000
    test_size: int = 200
    train_seed: int = 0
    test_seed: int = 1


class JackpotArithmetic(_Builder, skip_registration=True):
    """Procedurally generated arithmetic problems (:mod:`jackpot_jax.data.arithmetic`).

    ``d1``-``d4``: word problems with 1-4 operations (``d1``: ``"What is 7 + 5?"``). ``d1`` has
    12,000 train problems (of about 15,000 distinct ones): fitted on 2,000, a tiny model memorizes
    them (99.5% greedy accuracy on them, 29% held out), on 11,000 it learns the digit procedures
    (56.5% held out; ``docs/training.md``). ``d2``-``d4`` have 2,000. ``e2``, ``e3``: expressions
    with 2 and 3 additions / subtractions (``"What is 12 + 30 - 7?"``), 12,000 train problems of
    315,025 (``e2``) and millions (``e3``), so that no split can be memorized
    (``docs/arithmetic.md``).
    """

    name = "jackpot_arithmetic"
    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.0.0": "First version.", "1.1.0": "d1: 12,000 train problems instead of 2,000.",
                     "1.2.0": "e2, e3: expression problems."}
    BUILDER_CONFIGS = [
        ArithmeticConfig(name=f"d{d}", description=f"{d} operation(s) per problem", difficulty=d,
                         train_size=12000 if d == 1 else 2000, train_seed=1000 * d, test_seed=1000 * d + 1)
        for d in (1, 2, 3, 4)
    ] + [
        ArithmeticConfig(name=f"e{d}", description=f"{d} additions / subtractions in one expression", difficulty=d,
                         form="expression", train_size=12000, train_seed=1000 * d + 500, test_seed=1000 * d + 501)
        for d in (2, 3)
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=_features(),
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        config = self.builder_config
        for split, size in (("train", config.train_size), ("test", config.test_size)):
            if size <= 0:
                raise ValueError(f"Dataset 'jackpot_arithmetic', config {config.name!r}: empty split "
                                 f"{split!r} ({split}_size={size}); sizes must be >= 1.")
        test = arithmetic.make_split(config.test_seed, config.test_size, config.difficulty, form=config.form)
        train = arithmetic.make_split(config.train_seed, config.train_size, config.difficulty, form=config.form,
                                      exclude=[problem["problem"] for problem in test])
        return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

    def _generate_examples(self, problems):
        for index, problem in enumerate(problems):
            yield index, {key: problem[key] for key in _FEATURES}


# ------------------------------------------------------------------------------------------------
# Datasets read from local files: gsm8k, math, deepscaler
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class ManualConfig(tfds.core.BuilderConfig):
    """``skip_bad_lines``: skip (log and count) malformed lines and records with missing fields
    instead of raising."""
    skip_bad_lines: bool = False


_MANUAL_CONFIGS = [
    ManualConfig(name="default", description="A bad record raises ValueError naming file and line."),
    ManualConfig(name="skip_bad_lines", description="Bad records are skipped, logged and counted "
                 "(info.metadata['skipped_records']).", skip_bad_lines=True),
]


class _ManualBuilder(_Builder, skip_registration=True):
    """Reads ``problem`` / ``answer`` / ``solution`` records from files in ``manual_dir``; prepares
    the splits whose files are present (at least one)."""

    BUILDER_CONFIGS = _MANUAL_CONFIGS

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.MANUAL_DOWNLOAD_INSTRUCTIONS = manual_files.manual_instructions(cls.name)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=_features(),
                                     disable_shuffling=True, metadata=tfds.core.MetadataDict())

    def _manual_dir(self, dl_manager) -> str:
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError as err:  # TFDS: "Manual directory ... does not exist or is empty."
            raise FileNotFoundError(f"Dataset {self.name!r}: {err}") from None
        return manual_files.resolve_manual_dir(self.name, manual_dir)

    def _split_generators(self, dl_manager):
        manual_dir = self._manual_dir(dl_manager)
        splits = manual_files.available_splits(self.name, manual_dir)
        if not splits:
            expected = ", ".join(f"{manual_dir}/{manual_files.MANUAL_FILES[self.name][split][0]}"
                                 for split in manual_files.MANUAL_SPLITS[self.name])
            raise FileNotFoundError(f"Dataset {self.name!r}: no data file in {manual_dir} (expected "
                                    f"{expected}).\n" + manual_files.manual_instructions(self.name, manual_dir))
        generators, skipped = {}, {}
        for split in splits:
            records, skipped[split] = manual_files.read_manual_split(
                self.name, split, manual_dir, skip_bad_lines=self.builder_config.skip_bad_lines)
            generators[split] = self._generate_examples(records)
        self.info.metadata["skipped_records"] = skipped
        return generators

    def _generate_examples(self, records):
        for index, record in enumerate(records):
            yield index, record


class Gsm8k(_ManualBuilder, skip_registration=True):
    """GSM8K: ``answer`` is the number after ``####`` (commas removed), ``solution`` the official
    answer text."""
    name = "gsm8k"


class Math(_ManualBuilder, skip_registration=True):
    """MATH / MATH-500: ``answer`` is the ``answer`` field when present, else the last ``\\boxed{}``
    of the solution."""
    name = "math"


class Deepscaler(_ManualBuilder, skip_registration=True):
    """DeepScaleR (train only): ``problem``, ``answer``, ``solution`` as in the source."""
    name = "deepscaler"


BUILDERS = {"jackpot_arithmetic": JackpotArithmetic, "gsm8k": Gsm8k, "math": Math,
            "deepscaler": Deepscaler}
