"""A study's training budget and search space sized for its data, where its file leaves them out.

digitune's defaults (`config.TrainingSettings`) were made for MNIST's 50,000 pictures: six
epochs are about 2,300 optimizer steps at batch 128. On 800 pictures the same six epochs are
about 40 steps, and trials stop while they are still learning. So for any dataset but MNIST,
each setting below that the study file does not give is sized for the data:

- the budget is counted in optimizer steps (`TARGET_STEPS`, MNIST's), turned into epochs of
  the training set at the middle batch size; early-stopping patience and the pruner's warm-up
  in proportion;
- with a time limit and no trial count, trials run until the time is up;
- a study file without [space] (for any dataset) searches a space for the data: as many
  convolution blocks as the picture allows (up to 3), batch sizes that suit the count, batch
  normalisation, and augmentation (shifts, small rotations, zoom, mirroring), with a
  configuration that a careful person would write by hand tried first.

What was chosen is printed in one line and logged with the study's parent run
(`StudyDefinition.resolved`); any of it is overridden by writing it in the study file.
"""

from __future__ import annotations

import dataclasses
import math

import optuna

from digitune import study_file

# Optimizer steps of a trial that is never pruned: MNIST's, six epochs of 391 batches of 128.
TARGET_STEPS = 2_346
MAX_EPOCHS = 300
# A time-boxed study runs trials until its time is up; this only bounds the count.
TRIALS_UNTIL_THE_TIME_IS_UP = 10_000


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the data asks for: its training count, picture shape and classes, and from them
    the budget and the space's sizes."""

    count: int
    shape: tuple[int, int, int]
    classes: int

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        if self.count < 2_000:
            return (16, 32, 64)
        if self.count < 20_000:
            return (32, 64, 128)
        return (64, 128, 256)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.count / self.batch_sizes[1])

    @property
    def max_epochs(self) -> int:
        return min(MAX_EPOCHS, max(6, math.ceil(TARGET_STEPS / self.steps_per_epoch)))

    @property
    def patience(self) -> int:
        return max(2, self.max_epochs // 3)

    @property
    def warmup_epochs(self) -> int:
        return max(1, self.max_epochs // 10)

    @property
    def max_blocks(self) -> int:
        """Convolution blocks the pictures allow (each halves them), at most 3."""
        return max(1, min(3, min(self.shape[:2]).bit_length() - 2))

    def space(self) -> tuple[dict, tuple[dict, ...]]:
        """(distributions, enqueued configurations) of the default space."""
        float_range = optuna.distributions.FloatDistribution
        blocks = self.max_blocks
        distributions = {
            "learning_rate": float_range(3e-4, 3e-3, log=True),
            "batch_size": optuna.distributions.CategoricalDistribution(self.batch_sizes),
            "num_conv_blocks": optuna.distributions.IntDistribution(max(1, blocks - 1), blocks),
            "num_filters": optuna.distributions.IntDistribution(16, 64, step=16),
            "dense_units": optuna.distributions.CategoricalDistribution((64, 128, 256)),
            "dropout_rate": float_range(0.0, 0.5),
            "batch_normalization": optuna.distributions.CategoricalDistribution((True, False)),
            "augment_shift": float_range(0.0, 0.15),
            "augment_rotation_degrees": float_range(0.0, 20.0),
            "augment_zoom": float_range(0.0, 0.15),
            # Mirrored pictures of some classes are pictures of others (digits, letters):
            # validation accuracy says whether these classes allow it.
            "augment_flip": optuna.distributions.CategoricalDistribution((False, True)),
        }
        # What a careful person writes by hand: batch normalisation, augmentation, the
        # deepest network the pictures allow. Tried first; the sampler takes over after it.
        careful = {
            "learning_rate": 1e-3,
            "batch_size": self.batch_sizes[1],
            "num_conv_blocks": blocks,
            "num_filters": 32,
            "dense_units": 128,
            "dropout_rate": 0.3,
            "batch_normalization": True,
            "augment_shift": 0.1,
            "augment_rotation_degrees": 10.0,
            "augment_zoom": 0.1,
            "augment_flip": False,
        }
        return distributions, (careful,)

    def describe(self, sized: list[str]) -> str:
        """The one line that says what was sized, and from what."""
        height, width, channels = self.shape
        return (
            f"sized for {self.count:,} training pictures of {height}x{width}x{channels} in "
            f"{self.classes} classes: {', '.join(sized)} (a study file setting overrides any)"
        )


def sized(
    definition: study_file.StudyDefinition,
    count: int,
    shape: tuple[int, int, int],
    classes: int,
    mnist: bool,
) -> tuple[study_file.StudyDefinition, str | None]:
    """The definition with what its file leaves out sized for the data (all of it but the
    space for MNIST, whose defaults are its own), and the line that says so (None when
    nothing was)."""
    plan = Plan(count, shape, classes)
    given = definition.given
    training, study, said = {}, {}, []
    if not mnist:
        if "training.max_epochs" not in given:
            training["max_epochs"] = plan.max_epochs
            said.append(f"{plan.max_epochs} epochs (about {TARGET_STEPS:,} steps)")
        if "training.early_stopping_patience" not in given:
            training["early_stopping_patience"] = plan.patience
            said.append(f"patience {plan.patience}")
        if "study.pruner_warmup_epochs" not in given:
            study["pruner_warmup_epochs"] = plan.warmup_epochs
        if "study.n_trials" not in given and definition.study.timeout_minutes:
            study["n_trials"] = TRIALS_UNTIL_THE_TIME_IS_UP
            said.append(f"trials until the {definition.study.timeout_minutes:g} minutes are up")
    changes: dict = {}
    if "space" not in given:
        distributions, enqueued = plan.space()
        changes.update(
            distributions=distributions,
            enqueued=enqueued,
        )
        said.append(
            f"a space of {len(distributions)} hyperparameters with augmentation and batch "
            f"normalisation, batch {'/'.join(map(str, plan.batch_sizes))}, "
            f"{distributions['num_conv_blocks'].low}-{plan.max_blocks} conv blocks"
        )
    if not said:
        return definition, None
    return (
        dataclasses.replace(
            definition,
            training=dataclasses.replace(definition.training, **training),
            study=dataclasses.replace(definition.study, **study),
            **changes,
        ),
        plan.describe(said),
    )
