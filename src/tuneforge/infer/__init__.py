"""Inference on the live model: the KV-cached continuous-batching decode engine (`infer.engine`), used by serve
and by anything that generates many sequences at once (evaluation, GRPO rollouts); and the parser of the tool calls
in a model's output (`infer.tool_parsing`: serve's answers, eval's tool-call scores)."""
