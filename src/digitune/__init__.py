"""digitune: tune and track Keras CNNs on MNIST with Optuna and MLflow."""

__version__ = "0.1.0"
