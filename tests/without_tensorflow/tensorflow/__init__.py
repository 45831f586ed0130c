"""Stands in for TensorFlow in the JAX pass of the tests (`make test`): on PYTHONPATH, it makes
`import tensorflow` fail, in the test process and in every process it starts, as on a GPU
machine whose image has JAX but no TensorFlow."""

raise ModuleNotFoundError(
    "TensorFlow is blocked in this test run (KERAS_BACKEND=jax, as on a machine without it)",
    name="tensorflow",
)
