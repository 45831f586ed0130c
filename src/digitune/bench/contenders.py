"""Who races (`digitune bench`), declared once as data: the tuning race's contenders, and the
ablation's cells, which take the default study's levers apart (the pruner, and epochs of a
quarter pass against whole passes over the training images).

Every contender tunes the default study's space for the same wall-clock budget; a field left
None keeps what the study file says.
"""

from __future__ import annotations

import dataclasses
import re

from digitune import config
from digitune.engines import keras_tuner_search


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    engine: str
    sampler: str | None = None
    pruner: str | None = None
    # Epochs of one whole pass each, as many passes as the study's full trial trains
    # (`keras_tuner_search.whole_passes`), instead of the study file's `epoch_images`.
    whole_passes: bool = False

    @property
    def slug(self) -> str:
        """The contender in a study name: "median pruner, whole passes" is
        "median-pruner-whole-passes"."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")

    def training(self, training: config.TrainingSettings) -> config.TrainingSettings:
        """The study's training, in whole passes where this contender trains them."""
        return keras_tuner_search.whole_passes(training) if self.whole_passes else training


DEFAULT_STUDY = Contender("default study", "optuna")

# The race: the default study against random search and a user's Keras Tuner Hyperband
# script (whole passes, as such a script has them).
HYPERBAND = Contender("Keras Tuner Hyperband", "keras-tuner", whole_passes=True)
CONTENDERS = (
    DEFAULT_STUDY,
    Contender("Optuna random, no pruning", "optuna", sampler="random", pruner="none"),
    HYPERBAND,
)

# The ablation: the default study's pruner (successive halving that judges a trial again
# until its next rung) against Optuna's, which judges it once on arrival; successive halving
# or the median pruner (3 complete trials first); quarter passes or whole passes. The last
# cell is the default study before issue 13's second round, the second the one before its
# third.
ABLATION = (
    DEFAULT_STUDY,
    Contender("successive halving judged on arrival", "optuna", pruner="successive_halving"),
    Contender("successive halving, whole passes", "optuna", whole_passes=True),
    Contender("median pruner, quarter passes", "optuna", pruner="median"),
    Contender("median pruner, whole passes", "optuna", pruner="median", whole_passes=True),
)


def chosen(racers: tuple[Contender, ...], slugs: list[str] | None) -> tuple[Contender, ...]:
    """The racers `slugs` names (all when None), in their declared order."""
    if not slugs:
        return racers
    known = [racer.slug for racer in racers]
    unknown = [slug for slug in slugs if slug not in known]
    if unknown:
        raise ValueError(
            f"--contenders: no contender {', '.join(unknown)} here; choose from {', '.join(known)}"
        )
    return tuple(racer for racer in racers if racer.slug in slugs)
