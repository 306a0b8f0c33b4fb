"""Typed run configuration: one dataclass per concern; defaults live here and nowhere else.

Every field's comment says what it does and its effect, so `tunelab train --help-config` and
the resolved `config.yaml` of a run explain themselves.
"""

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    ref: str = "smollm2-135m-instruct"
    """Alias (see `tunelab models`), local Hugging Face folder, local .gguf file, or hub id."""
    dtype: str = "auto"
    """auto | bf16 | fp16 | fp32. auto: bf16 where the hardware is fast at it, fp16 on GPUs without
    bf16 (V100, T4; training then scales the loss, skipping a step whose gradients overflowed), else fp32."""
    chat_template: str | None = None
    """None: the model's own template. Or a named template (chatml, alpaca, llama2, ...) for
    base models that have none, or a path to a .jinja file."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model. Off unless you trust its author."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for hub ids; pin it for reproducibility."""
    quantization: str | None = None
    """None | nf4 | fp4 | int8: load the (frozen) base quantized with bitsandbytes. method=qlora
    uses nf4 when this is None."""
    double_quant: bool = True
    """4-bit only: quantize the quantization constants too (QLoRA's double quantization)."""


@dataclass
class DataConfig:
    train: str = ""
    """Training data: .jsonl, .json, .csv, .tsv, .parquet, .txt or a saved HF dataset folder."""
    validation: str | None = None
    """Validation file. None: hold out `val_fraction` of `train` (seeded)."""
    format: str = "auto"
    """auto | alpaca | prompt_completion | messages | sharegpt | text."""
    columns: dict[str, str] = field(default_factory=dict)
    """Map the format's field names to yours, e.g. {instruction: question, output: answer}."""
    val_fraction: float = 0.1
    """Share of `train` held out for validation when `validation` is not given (0 = none)."""
    max_seq_len: int = 1024
    """Longer examples are cut to this many tokens (counted and reported). Memory grows with it."""
    train_on_prompt: bool = False
    """Also learn the prompt tokens. Default: loss on assistant answers only."""
    system_prompt: str | None = None
    """A system message added to every example that has none."""
    drop_duplicates: bool = False
    """Drop exact duplicate training examples (they are always reported)."""
    limit: int | None = None
    """Use only the first N training examples (after the split); handy for a quick try."""
    val_limit: int | None = None
    """Use only the first N validation examples (of the file, or of the seeded split): every
    validation pass costs a forward over all of them, minutes on a CPU for a few hundred."""
    cache: bool = True
    """Keep the tokenized examples in ~/.cache/tunelab/tokenized (or $TUNELAB_CACHE/tokenized), so
    a later run on the same data, tokenizer and data settings skips tokenizing. false: always tokenize."""


@dataclass
class LoraConfig:
    rank: int = 16
    """Rank of the update matrices; higher learns more and costs more memory."""
    alpha: float = 32.0
    """Scale of the update (effective scale alpha/rank)."""
    dropout: float = 0.05
    """Dropout on the LoRA input; 0 for tiny datasets you want to memorise."""
    target_modules: list[str] | str = "all-linear"
    """Which linear layers get adapters: all-linear, or names such as [q_proj, v_proj]."""
    use_dora: bool = False
    """DoRA: split each adapted weight into a magnitude vector and a direction that LoRA updates.
    Often closer to full fine-tuning at the same rank; ~20-40% slower steps."""


@dataclass
class TrainConfig:
    max_steps: int | None = None
    """Optimizer steps to run. None: run `epochs` epochs."""
    epochs: float = 1.0
    """Passes over the training data when max_steps is None."""
    micro_batch_size: int = 8
    """Examples per forward/backward pass; lower it (and raise grad_accum_steps) if memory is short.
    One micro batch of 8 trained 24% faster than 2 of 4 on a CPU (bench/RESULTS.md), for the same result."""
    grad_accum_steps: int = 1
    """Micro batches per optimizer step. Effective batch = micro_batch_size * grad_accum_steps."""
    learning_rate: float = 2e-4
    """Peak learning rate (LoRA: ~1e-4..3e-4; full fine-tuning: ~1e-5..5e-5)."""
    lr_scheduler: str = "cosine"
    """cosine | linear | constant, after warmup."""
    warmup_steps: int | None = None
    """Linear warmup steps. None: 5% of the steps."""
    optimizer: str = "adamw"
    """adamw | adamw_8bit. adamw_8bit (bitsandbytes) keeps AdamW's two moments in 8 bits (2 bytes per
    trained parameter instead of 8): for full fine-tuning that is 6 bytes per parameter less memory."""
    weight_dtype: str = "fp32"
    """fp32 | bf16: the dtype of the weights that full fine-tuning trains. fp32: master weights and
    fp32 AdamW moments, matmuls in model.dtype under autocast (16 bytes per parameter with the
    gradient). bf16: weights, gradients and moments in bf16 (8 bytes per parameter), each update
    rounded stochastically so that small steps still count; ~900 MB less for a 135M model."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0 = no clipping)."""
    optimizer_in_backward: bool = False
    """Step each weight the moment backward has its gradient, and free that gradient at once, so
    the gradients of a step never all exist together: 4 bytes per trained parameter less at the
    peak (2 with bf16 weights), as torchtune's optimizer_in_bwd. It needs max_grad_norm 0 (a global
    norm needs every gradient at once), grad_accum_steps 1 and one process; sft and pretrain."""
    eval_every_n_steps: int = 50
    """Validation loss every N steps (0 = only at the end)."""
    save_every_n_steps: int = 100
    """Checkpoint every N steps (0 = only at the end and on Ctrl-C)."""
    keep_checkpoints: int = 2
    """Keep the newest N step checkpoints."""
    log_every_n_steps: int = 1
    """How often a line goes to metrics.jsonl."""
    packing: bool = True
    """Concatenate the examples of a micro batch without padding (attention never crosses
    examples). Faster; the loss is the same as padded batches."""
    group_by_length: bool = False
    """Batch examples of similar length together (less waste when packing is off)."""
    gradient_checkpointing: bool | None = None
    """Recompute each layer's activations in the backward pass: same result, less memory, slower
    (measured compiled: LoRA -40% peak memory for -30% speed; full fine-tuning -6-13% for -9-15%).
    None (auto): on only when the run is predicted not to fit in memory without it and to fit with
    it (`tunelab train` says so, and the run's config.yaml records true)."""
    compile: bool | None = None
    """torch.compile the transformer blocks, layer by layer: ~1.5x the tokens/s on this CPU after a
    one-time compile (~40-60 s; ~10 s from its cache in ~/.cache/tunelab/torch_compile). None (auto):
    on when the run trains at least 80k tokens, except for a bitsandbytes (QLoRA) base and for
    adapters under DeepSpeed ZeRO-3, which run faster eager."""
    threads: int | None = None
    """CPU threads for torch. None: the number of physical cores."""
    neftune_alpha: float | None = None
    """NEFTune: uniform noise of scale alpha/sqrt(seq_len * hidden) added to the input embeddings
    during training only (never in evaluation or generation). Typical: 5. None: off."""


@dataclass
class PretrainConfig:
    from_scratch: str | None = None
    """stage pretrain only. None: continue pretraining model.ref. Else a new randomly initialised
    model: a named size (llama-tiny, llama-small, smollm2-135m) or a path to an architecture
    config.json; its tokenizer is trained on data.train and saved in the run."""
    vocab_size: int = 8000
    """Vocabulary of the byte-level BPE tokenizer trained for a from-scratch model."""


@dataclass
class PreferenceConfig:
    beta: float = 0.1
    """dpo/kto: strength of the pull towards the reference model (higher: stay closer).
    orpo: weight of the odds-ratio term (lambda in the paper)."""
    loss_type: str = "sigmoid"
    """dpo: sigmoid | ipo | hinge | robust. Others ignore it."""
    max_prompt_len: int = 512
    """orpo: room for the prompt; answers get max_seq_len minus this. (dpo/kto/reward cut the whole
    sequence at data.max_seq_len, keeping its end.)"""


@dataclass
class RLConfig:
    reward_model: str | None = None
    """grpo/ppo: a reward model (run directory of a `stage: reward` run, or a folder)."""
    reward_function: str | None = None
    """grpo/ppo: a Python reward "module:function" or "path/to/file.py:function", called as
    fn(prompts=[...], completions=[...], **columns) -> list of floats."""
    num_generations: int = 4
    """grpo: completions sampled per prompt, compared to each other (group baseline). ppo samples one
    per prompt and learns a value function instead."""
    ppo_epochs: int = 4
    """ppo: optimizer updates on each rollout (clipped, so the policy cannot move far from it)."""
    max_new_tokens: int = 64
    """Length limit of each sampled completion."""
    temperature: float = 1.0
    """Sampling temperature of the completions."""
    beta: float = 0.0
    """KL penalty towards the starting model (0: none, no reference model kept in memory). For ppo a
    per-token penalty in the reward; 0.05 is TRL's usual value."""


@dataclass
class EvalConfig:
    """Generation evaluation during training (answers scored like `tunelab eval`), logged to metrics.jsonl."""
    data: str | None = None
    """Test file (any training format; the answer is the reference). None: no generation evaluation."""
    every_n_steps: int = 0
    """Generate and score every N steps (0 = only after training, when `data` is set)."""
    metrics: list[str] = field(default_factory=list)
    """exact_match, f1, rouge_l, bleu. Empty: all of them (or the label metrics when `labels` is set)."""
    labels: list[str] = field(default_factory=list)
    """A label set (e.g. [positive, negative]): score as a label task (accuracy, macro-F1)."""
    limit: int | None = 50
    """Score the first N items only (generation is slow on a CPU); None = all."""
    max_new_tokens: int = 64
    """Answer length cap for these evaluations."""
    batch_size: int = 8
    gather_weights: bool = True
    """Under FSDP and DeepSpeed ZeRO-3: gather the whole weights on every process once for these
    answers (each then holds the whole model meanwhile). false: gather layer by layer for every new
    token, far slower, for models whose whole weights do not fit on one device."""


@dataclass
class RunConfig:
    name: str | None = None
    """Run name; the run directory is `<output_dir>/<name>-<timestamp>`. None: the config file's name."""
    output_dir: str = "runs"
    """Where run directories are made."""
    method: str = "lora"
    """full | lora | qlora: train all weights, low-rank adapters on a frozen base, or adapters on a
    4-bit (nf4) base."""
    stage: str = "sft"
    """sft | pretrain | dpo | orpo | kto | reward | grpo | ppo: what the run trains (see docs/stages.md)."""
    seed: int = 42
    """Seeds data order, the validation split, LoRA init and dropout."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    @property
    def uses_adapter(self) -> bool:
        """Adapters on a frozen base (lora, qlora) rather than all weights (full)."""
        return self.method in ("lora", "qlora")

    @property
    def base_quantization(self) -> str | None:
        """How the base loads: model.quantization, else nf4 for qlora, else unquantized."""
        return self.model.quantization or ("nf4" if self.method == "qlora" else None)
