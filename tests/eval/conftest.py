"""The tiny served model of tests/serve (a 2-layer random-init Llama with a ChatML template, built locally)."""

from tests.serve.conftest import tiny_model_dir  # noqa: F401 - a fixture, registered by being imported here
