"""The tiny served model of tests/serve (built locally, nothing downloaded) for the engine's tests."""

from tests.serve.conftest import tiny_model_dir  # noqa: F401 - a fixture, registered by being imported here
