"""The study as Keras Tuner sees it: its search space as Keras Tuner hyperparameters, and a
hypermodel that builds with `model.build_model` and trains with `trainer.fit`, exactly as
Optuna trials do.
"""

from __future__ import annotations

import keras
import keras_tuner
import optuna

from digitune import data, model, space, trainer


def hyperparameters(definition: space.StudyDefinition) -> keras_tuner.HyperParameters:
    """The study's [space] as Keras Tuner hyperparameters (fixed values stay out: the
    hypermodel adds them to every trial's params, as `space.suggest` does for Optuna)."""
    hp = keras_tuner.HyperParameters()
    for name, distribution in definition.distributions.items():
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            hp.Choice(name, list(distribution.choices), ordered=False)
            continue
        low, high = distribution.low, distribution.high
        sampling = "log" if distribution.log else "linear"
        if isinstance(distribution, optuna.distributions.FloatDistribution):
            hp.Float(name, low, high, step=distribution.step, sampling=sampling)
        else:
            # Keras Tuner reads an int range's step as a factor under log sampling, where
            # Optuna only allows step 1; so a log range has no step here.
            step = None if distribution.log else distribution.step
            hp.Int(name, low, high, step=step, sampling=sampling)
    return hp


class CnnHyperModel(keras_tuner.HyperModel):
    """Builds with `model.build_model` and trains with `trainer.fit`, as Optuna trials do."""

    def __init__(self, definition: space.StudyDefinition, split: data.Split):
        super().__init__(name="mnist_cnn")
        self.definition = definition
        self.split = split

    def params(self, hp: keras_tuner.HyperParameters) -> dict:
        """The trial's plain params: the file's fixed values plus the sampled ones."""
        sampled = {name: hp.get(name) for name in self.definition.distributions}
        return {**self.definition.fixed, **sampled}

    def build(self, hp):
        # Keras Tuner clears the Keras session before every build, and with it the dtype
        # policy, so the study's precision is set here.
        keras.mixed_precision.set_global_policy(
            trainer.precision_policy(self.definition.training.precision)
        )
        cnn = model.build_model(self.params(hp))
        # Hyperband continues a trial from its checkpoint, optimizer state included; a built
        # optimizer loads that state instead of warning that it skipped it.
        cnn.optimizer.build(cnn.trainable_variables)
        return cnn

    def fit(self, hp, cnn, *args, epochs=1, initial_epoch=0, callbacks=(), **kwargs):
        return trainer.fit(
            cnn,
            self.params(hp),
            self.split,
            epochs,
            callbacks,
            initial_epoch=initial_epoch,
            settings=self.definition.training,
        )
