"""The two tuning engines, peers over one scaffold (`scaffold`): Optuna (`optuna`, with its
trial function in `objective` and worker processes in `workers`) and Keras Tuner
(`keras_tuner`, with the study as its hypermodel in `hypermodel`)."""
