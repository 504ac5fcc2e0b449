"""tuneforge: one YAML file drives every stage of fine-tuning a causal language model."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes (imported by peft whenever it is installed) warns on every start on CPUs with AVX-512 BF16 that
# an optional kernel from the Hugging Face Hub is missing; tuneforge never downloads kernels at run time.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
