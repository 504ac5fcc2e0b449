"""Inference on the live model: the KV-cached continuous-batching decode engine (`infer.engine`), used by serve
and by anything that generates many sequences at once (evaluation, GRPO rollouts)."""
