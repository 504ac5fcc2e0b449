"""The typed run configuration: one YAML file, one `RunConfig`.

Every field carries a description; `tuneforge reference` prints them, so this file is the reference.
Unknown keys are errors (`extra="forbid"`). Rules that involve more than one field live at the
bottom of this file, next to the models they check.
"""

from __future__ import annotations

import warnings
from typing import Annotated, Literal

from pydantic import Field, model_validator

from tuneforge.config.data import DataConfig, DatasetSource, DecontamConfig, DedupConfig, QualityConfig, SyntheticConfig
from tuneforge.config.objective import ObjectiveConfig
from tuneforge.config.section import Section

# the data section's models live in config/data.py and are public here too
__all__ = [
    "AdapterConfig",
    "CheckpointConfig",
    "DEFAULT_LR",
    "DataConfig",
    "DatasetSource",
    "DecontamConfig",
    "DedupConfig",
    "DistConfig",
    "EvalConfig",
    "FULL_LR_RANGE",
    "LORA_LR_RANGE",
    "LogConfig",
    "ModelConfig",
    "OutputConfig",
    "QualityConfig",
    "RunConfig",
    "Section",
    "SyntheticConfig",
    "TinyModelConfig",
    "TrainConfig",
]

LORA_LR_RANGE = (1e-4, 2e-3)
FULL_LR_RANGE = (1e-5, 5e-4)
DEFAULT_LR = {"lora": 2e-4, "dora": 2e-4, "qlora": 2e-4, "full": 2e-5}


# ---------------------------------------------------------------------------- model
class TinyModelConfig(Section):
    """A randomly initialised model built from sizes (quickstart and tests; no download)."""

    architecture: Literal["llama", "qwen2", "mistral"] = Field(
        "llama", description="Hugging Face architecture family of the tiny model."
    )
    hidden_size: int = Field(128, gt=0, description="Width of the residual stream.")
    num_layers: int = Field(2, gt=0, description="Number of decoder layers.")
    num_heads: int = Field(4, gt=0, description="Attention heads (hidden_size must divide by it).")
    num_kv_heads: int | None = Field(None, gt=0, description="Key/value heads (GQA); default = num_heads.")
    intermediate_size: int | None = Field(None, gt=0, description="MLP width; default 4 x hidden_size.")
    max_position_embeddings: int = Field(2048, gt=0, description="Longest sequence the model accepts.")
    tie_word_embeddings: bool = Field(True, description="Share input embeddings and LM head.")
    tokenizer_vocab_size: int = Field(
        1024, ge=300, description="Vocabulary size when tuneforge trains a byte-level BPE tokenizer on the data."
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "pick sizes such that hidden_size % num_heads == 0"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={kv}")
        return self


class ModelConfig(Section):
    name_or_path: str | None = Field(
        None, description="Hugging Face hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct) or local model directory."
    )
    init: TinyModelConfig | None = Field(
        None, description="Build a new, randomly initialised model of these sizes instead of loading one."
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer hub id or directory; default: name_or_path. With `init` and no tokenizer, "
        "a byte-level BPE tokenizer is trained on the training data.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    trust_remote_code: bool = Field(
        False, description="Run model code shipped in the checkpoint repository. Opt-in: it executes remote code."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto = flash_attention_2 on CUDA when installed, else sdpa."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.name_or_path is None) == (self.init is None):
            raise ValueError(
                "set exactly one of model.name_or_path (a hub id or local directory to load) "
                "or model.init (sizes of a new tiny model)"
            )
        return self


# ---------------------------------------------------------------------------- adapter
class AdapterConfig(Section):
    type: Literal["lora", "dora", "qlora", "full"] = Field(
        "lora",
        description="lora / dora train a low-rank adapter with peft; qlora trains LoRA on a base loaded in "
        "4 bits with bitsandbytes (CUDA or CPU; pip install 'tuneforge[qlora]'); full trains every weight.",
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="qlora: 4-bit data type of the frozen base weights.")
    double_quant: bool = Field(
        True, description="qlora: also quantise the quantisation constants (saves ~0.4 bit/weight)."
    )
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(
        32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)."
    )
    dropout: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Dropout on the LoRA input (on CPU runs the mask is "
        "drawn from 16 random bits per element, so p is rounded to a multiple of 1/65536).",
    )
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules to adapt: 'all-linear' or a list of module names (q_proj, v_proj, ...)."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained in full and saved with the adapter (e.g. lm_head, embed_tokens)."
    )


# ---------------------------------------------------------------------------- train
class TrainConfig(Section):
    lr: float | None = Field(None, gt=0, description="Peak learning rate; default 2e-4 for LoRA/DoRA, 2e-5 for full.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run; overrides epochs.")
    micro_batch_size: int = Field(4, gt=0, description="Rows per micro-batch (per process); see pass_tokens.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Fraction of steps of linear warmup.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps; overrides warmup_ratio.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in backward to save memory (about 10-20% slower). auto = on when "
        "the memory plan's decoder activations exceed 1 GiB and the weights, gradients and optimizer state together "
        "(they would be most of the peak), or when the run would not fit the free device memory (RAM on a CPU) "
        "without it; the log and `tuneforge plan` say which and why. true / false: your choice stands.",
    )
    padding_free: bool = Field(
        True,
        description="Lay each micro-batch's rows end to end in one row (position_ids restarting per sample) "
        "instead of padding them to the longest: no padding token is ever computed, and each sample attends only to "
        "itself (SDPA per sample, or flash-attention varlen on CUDA). Same loss as padding (tested); false = padded "
        "micro-batches (for models whose attention ignores position_ids: tuneforge stops with that advice when it "
        "sees one).",
    )
    pass_tokens: Annotated[int, Field(gt=0)] | Literal["auto"] | None = Field(
        "auto",
        description="The micro-batches of one optimizer step run through the model together, as one "
        "forward/backward pass, while the pass holds at most this many token positions: fewer, larger matmuls and "
        "less per-operation overhead (1.1x on the CPU benchmark), the same gradient (the loss is normalised over the "
        "whole step; tested). auto = micro_batch_size x data.max_seq_len, the most one micro-batch can already "
        "hold, so a pass never needs more memory than the config allows; null = one micro-batch per pass. Only in "
        "single-process runs without DeepSpeed (other strategies need the same number of passes on every rank), "
        "and not for grpo (a prompt becomes G sequences only at the rollouts).",
    )
    group_by_length: bool = Field(
        False,
        description="Padded data: fill each optimizer step with rows of similar length (sorted within chunks of "
        "16 steps, steps shuffled), so micro-batches carry little padding: ~1.3x faster on Alpaca-like data, but less "
        "varied steps (measured: held-out loss 0.02-0.03 higher after 20 steps). A step holds the same rows however "
        "it is split into micro-batches, accumulation and processes. Ignored with data.packing.",
    )
    liger_kernels: bool = Field(
        False,
        description="Liger's fused Triton kernels for RMSNorm, RoPE and SwiGLU (CUDA only; pip install "
        "'tuneforge[liger]'); the LM head and loss stay train.logits'.",
    )
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer (dynamic shapes, so new lengths don't recompile). Off "
        "by default: the first steps pay a compile (20-40 s on a CPU) that short runs never earn back.",
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw",
        description="adamw (torch); adamw_8bit / paged_adamw_8bit keep Adam's moments in 8 bits "
        "(bitsandbytes; paged also pages them to CPU memory under GPU memory pressure).",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto = bf16 where the device runs it natively (recent GPUs), fp16 on older GPUs, fp32 on CPU.",
    )
    threads: int | None = Field(None, gt=0, description="CPU threads for torch; default: all cores.")
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="Device peak TFLOP/s for the MFU estimate; default: a datasheet value for known GPUs, "
        "else a measured matmul peak.",
    )
    logits: Literal["chunked", "trained", "full"] = Field(
        "chunked",
        description="chunked = the LM head only where loss is taken, fused with the cross-entropy in row "
        "chunks that compute the gradient in the same pass (never the full logits; the least memory and time; "
        "FSDP2 and ZeRO-3 runs and models that post-process their logits use `trained`); trained = the LM head "
        "only where loss is taken; full = logits at every position (for models whose LM head the selection "
        "cannot hook).",
    )
    seed: int = Field(42, description="Seed of model init, adapter init, shuffling and dropout.")
    max_bad_steps: int = Field(
        10,
        ge=0,
        description="Steps whose loss or gradient is NaN/inf are skipped (no weight update) and counted; "
        "the run stops after more than this many, keeping the last good checkpoint.",
    )
    loss_spike_factor: float | None = Field(
        3.0,
        gt=1.0,
        description="Log a loss spike when a step's loss exceeds this multiple of the recent average; null disables. "
        "Not for grpo (its loss is a policy-gradient surrogate around 0).",
    )


class EvalConfig(Section):
    every_steps: int | None = Field(
        None, gt=0, description="Evaluate the loss every N optimizer steps (and at the end)."
    )
    at_start: bool = Field(True, description="Evaluate before the first step, for a before/after comparison.")
    batch_size: int = Field(8, gt=0, description="Rows per eval forward pass.")
    generate_rows: int = Field(
        0,
        ge=0,
        description="Held-out rows scored by generation (exact match, normalised match, ROUGE-L, chrF, "
        "BLEU) before and after training; `tuneforge eval` uses all held-out rows when this is 0.",
    )
    max_new_tokens: int = Field(64, gt=0, description="Generation length limit for eval and samples.")
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature for eval generations; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold when temperature > 0.")
    show_samples: int = Field(3, ge=0, description="Sample generations printed after training.")
    general_text: str | None = Field(
        None,
        description="Forgetting check: a UTF-8 text file of general text (e.g. wikitext) whose perplexity is "
        "scored before and after training (general_ppl in the before/after table and the report); a rise means the "
        "model lost some of what it knew.",
    )
    general_text_tokens: int = Field(
        16384, gt=0, description="Tokens of eval.general_text scored (from its start), in windows of data.max_seq_len."
    )
    metric: str = Field("eval_loss", description="Metric that decides the best checkpoint and early stopping.")
    greater_is_better: bool | None = Field(
        None, description="Whether a larger `metric` is better; default: false for *loss/*ppl, true otherwise."
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many evaluations without an improvement of at least min_delta."
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0.0, description="Smallest change of `metric` that counts as an improvement."
    )
    load_best_at_end: bool = Field(
        False, description="Save final/ from the best evaluated checkpoint instead of the last step."
    )

    @property
    def higher_is_better(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not self.metric.endswith(("loss", "ppl"))


# tracker name -> (module that must be importable, what to pip install); jsonl needs nothing
TRACKER_PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tuneforge[tensorboard]"),
    "mlflow": ("mlflow", "tuneforge[mlflow]"),
    "wandb": ("wandb", "tuneforge[wandb]"),
    # other trackers accelerate integrates, driven through accelerate's tracker classes
    "aim": ("aim", "aim"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
    "trackio": ("trackio", "trackio"),
}


class LogConfig(Section):
    every_steps: int = Field(10, gt=0, description="Write a metrics line (and refresh the bar) every N steps.")
    progress: Literal["auto", "bar", "plain", "json", "none"] = Field(
        "auto",
        description="auto = a live bar on a terminal, plain lines otherwise (CI logs); "
        "json = one JSON object per logged record on stderr; none = quiet.",
    )
    report_to: list[
        Literal[
            "jsonl", "tensorboard", "mlflow", "wandb", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio"
        ]
    ] = Field(
        default_factory=lambda: ["jsonl"],
        description="Metric trackers. jsonl (<run>/metrics.jsonl) is always written; tensorboard writes "
        "<run>/tensorboard, mlflow a local store (<run>/mlruns unless mlflow_tracking_uri / MLFLOW_TRACKING_URI), "
        "wandb an offline run in <run>/wandb unless wandb_mode=online; others go through accelerate.",
    )
    project: str = Field("tuneforge", description="Project (W&B) / experiment (MLflow) name the run is filed under.")
    run_name: str | None = Field(None, description="Run name shown by trackers; default: the run directory's name.")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else a file store in <run>/mlruns."
    )
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline writes <run>/wandb with no network (upload later with `wandb sync`)."
    )


class CheckpointConfig(Section):
    every_steps: int | None = Field(
        500, gt=0, description="Write a resumable checkpoint every N optimizer steps (and at the last step)."
    )
    every_minutes: float | None = Field(
        None, gt=0, description="Also write one when this many minutes passed since the last."
    )
    save_total_limit: int = Field(
        3, ge=1, description="Checkpoints kept (the newest); older ones are deleted after a save succeeds."
    )
    keep_best: bool = Field(True, description="Also keep the checkpoint with the best eval `metric`.")


class DistConfig(Section):
    """Several processes (`tuneforge train CONFIG --nproc N`, or started by torchrun / accelerate launch / SLURM)."""

    strategy: Literal["auto", "ddp", "fsdp2", "deepspeed"] = Field(
        "auto",
        description="auto = DDP when there is more than one process: each rank holds the whole model and "
        "gradients are averaged. fsdp2 = PyTorch FSDP2 (`fully_shard` per decoder layer, then the root): parameters, "
        "gradients and optimizer state sharded over the ranks. deepspeed = DeepSpeed ZeRO (dist.zero_stage; "
        "`pip install 'tuneforge[deepspeed]'`). Every strategy keeps the step's loss = sum of token losses / trained "
        "tokens over all ranks, so the numbers match one process with the same global batch.",
    )
    timeout_minutes: float = Field(
        30.0,
        gt=0,
        description="How long a rank waits in a collective (or for rank 0's data preparation) before "
        "the job fails instead of hanging.",
    )
    zero_stage: Literal[1, 2, 3] | None = Field(
        None,
        description="deepspeed: ZeRO stage (1 = optimizer state sharded, 2 = + gradients, 3 = + parameters). "
        "Default 2, or the stage of dist.deepspeed_config.",
    )
    deepspeed_config: str | None = Field(
        None,
        description="deepspeed: a DeepSpeed JSON (e.g. configs/deepspeed/zero3-offload.json, or your own). Its "
        '"auto" values are filled from this config (micro-batch, grad_accum, clipping, precision, bucket sizes); '
        "an explicit value that contradicts this config is an error. Optimizer and schedule always come from train.*.",
    )
    offload_optimizer: bool = Field(
        False,
        description="deepspeed: keep optimizer state (and the fp32 master weights) in CPU RAM. fsdp2: offload "
        "parameters, gradients and optimizer state to the CPU (FSDP2's CPUOffloadPolicy).",
    )
    offload_params: bool = Field(
        False, description="deepspeed ZeRO-3: keep the parameters in CPU RAM too (slowest, smallest GPU footprint)."
    )
    fsdp_reshard_after_forward: bool = Field(
        True,
        description="fsdp2: free each layer's gathered parameters after its forward (ZeRO-3 like; least "
        "memory) instead of keeping them until the backward (ZeRO-2 like; less communication).",
    )
    fsdp_reduce_dtype: Literal["fp32", "same"] = Field(
        "fp32",
        description="fsdp2 with bf16: reduce gradients in fp32 (exact sums) or in the compute dtype (half the "
        "traffic).",
    )


class OutputConfig(Section):
    dir: str = Field("runs/default", description="Run directory: config.yaml, data/, final/, metrics.jsonl.")
    overwrite: bool = Field(False, description="Allow training into a run directory that already holds final/.")


# ---------------------------------------------------------------------------- run
class RunConfig(Section):
    model: ModelConfig = Field(..., description="What to fine-tune.")
    data: DataConfig = Field(..., description="What to train and evaluate on.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="LoRA / DoRA / full fine-tuning.")
    objective: ObjectiveConfig = Field(
        default_factory=ObjectiveConfig, description="What the run optimises: sft, or a preference objective."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation during and after training.")
    log: LogConfig = Field(default_factory=LogConfig, description="Metrics and progress.")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Resumable checkpoints under <run>/checkpoints."
    )
    dist: DistConfig = Field(default_factory=DistConfig, description="Training on several processes / GPUs / nodes.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where the run is written.")

    @model_validator(mode="after")
    def _cross_field(self) -> RunConfig:
        kind = "full" if self.adapter.type == "full" else "lora"
        if self.train.lr is None:
            self.train.lr = DEFAULT_LR[self.adapter.type]
        lo, hi = LORA_LR_RANGE if kind == "lora" else FULL_LR_RANGE
        if self.model.init is None and not lo <= self.train.lr <= hi:  # a new model trains from scratch
            warnings.warn(
                f"train.lr={self.train.lr:g} is outside the usual range {lo:g}-{hi:g} for "
                f"{self.adapter.type} fine-tuning",
                UserWarning,
                stacklevel=2,
            )
        if self.model.init is not None and self.model.init.max_position_embeddings < self.data.max_seq_len:
            raise ValueError(
                f"data.max_seq_len={self.data.max_seq_len} exceeds model.init.max_position_embeddings="
                f"{self.model.init.max_position_embeddings}; lower data.max_seq_len or raise the model's limit"
            )
        if self.eval.generate_rows and self.data.eval is None and self.data.eval_fraction == 0:
            raise ValueError(
                f"eval.generate_rows={self.eval.generate_rows} needs held-out rows: set data.eval "
                "or data.eval_fraction > 0"
            )
        for key in ("early_stopping_patience", "load_best_at_end"):
            if getattr(self.eval, key) and not self.eval.every_steps:
                raise ValueError(f"eval.{key} needs periodic evaluation: set eval.every_steps (e.g. 100)")
            if getattr(self.eval, key) and self.data.eval is None and self.data.eval_fraction == 0:
                raise ValueError(f"eval.{key} needs held-out rows: set data.eval or data.eval_fraction > 0")
        d = self.dist
        if d.strategy != "deepspeed":
            used = [k for k in ("zero_stage", "deepspeed_config", "offload_params") if getattr(d, k)]
            if used:
                raise ValueError(f"dist.{used[0]} only applies to dist.strategy=deepspeed (it is {d.strategy})")
        elif d.offload_params and d.zero_stage not in (3, None):
            raise ValueError(f"dist.offload_params needs ZeRO-3 (dist.zero_stage=3), not {d.zero_stage}")
        if d.strategy in ("fsdp2", "deepspeed") and self.adapter.type == "qlora":
            raise ValueError(
                f"adapter.type=qlora with dist.strategy={d.strategy} is not supported: bitsandbytes 4-bit "
                "weights cannot be sharded here; use dist.strategy=ddp (each rank holds the 4-bit base)"
            )
        if self.adapter.type == "full" and self.adapter.modules_to_save:
            raise ValueError("adapter.modules_to_save only applies to lora/dora; full fine-tuning trains every module")
        return self
