"""Peak memory of one training run, term by term, for OUR training loop (training/loop.py).

Facts of the loop that the terms follow (each measured here, see bench/plan_accuracy.py):
- full: fp32 master weights, matmuls in bf16 under autocast; autocast keeps a bf16 copy of every
  weight from the forward to the backward (2 bytes/param); AdamW keeps two fp32 moments.
  With train.weight_dtype bf16: weights, gradients and both moments are bf16, and no copies.
  With train.optimizer_in_backward each gradient is freed at its weight's step inside backward.
- lora: the frozen base is loaded in the compute dtype (bf16: 2 bytes/param); adapters, their
  gradients and moments are fp32. qlora: the base's linear layers in 4-bit nf4.
- the loss never holds [tokens x vocab] logits: the head runs CHUNK (256) answer rows at a time,
  its gradient made in the forward (training/loss.py), so the logits term is bounded by the chunk.
- packed rows: a micro batch is micro_batch_size * max_seq_len tokens at most, without padding.
- activations are the tensors autograd saves per token and layer (counted with saved-tensor hooks
  on this loop: full 26h+6q+4kv+8i bytes, bf16 LoRA 12h+6q+4kv+8i, h hidden, q/kv attention
  widths, i MLP width). On a CPU, glibc's heap keeps freed activation memory mapped, so peak RSS
  is ~1.6x (full) / ~1.8x (LoRA) the saved bytes, plus ~2 bytes x vocab per token: fitted to runs
  of this loop on a 4-layer and a 30-layer model, applied on CPUs only.
- compiled (train.compile), torch.compile's partitioner saves far less for the backward (it
  recomputes the cheap elementwise work instead), so on a CPU a compiled run's activation term is a
  measured share of the eager one's (COMPILED_ACTIVATION_SHARE; not with gradient checkpointing,
  whose saved inputs are the same either way).
- over several processes (Setup.strategy, as `accelerate launch` or torchrun set it; world processes
  in all) each process holds, besides its own activations:
  ddp: everything, and DDP's gradient buckets (a second copy of the trained gradients);
  zero1 / zero2: whole weights; AdamW's moments and DeepSpeed's fp32 copy of the trained weights
  split world ways (zero2: the gradients too, reduced through a bucket of hidden^2 elements);
  fsdp / zero3: weights, gradients and moments split world ways (a LoRA base in fp32: FSDP2 and
  ZeRO-3 shard one dtype per layer; DeepSpeed's bf16 mode, below, holds all in bf16), plus the
  weights gathered at once: FSDP2 the root's (embeddings, head, final norm: kept from forward to
  backward) and two layers' (the one running
  and the one prefetched), gathered in the compute dtype (its mixed precision: no autocast copies),
  with their whole gradients while they are reduced; ZeRO-3 keeps what it gathered alive up to
  stage3_max_live_parameters (1e9 elements by default: all of a small model).
  With bf16 compute DeepSpeed runs in its bf16 mode (training/distributed.deepspeed_mixed_precision):
  the weights are bf16 (ZeRO-3: their shards and what it gathers), the fp32 masters sit with the
  moments, and autocast has nothing to cast; in fp32 ZeRO-3 gathers fp32 weights, and with fp16
  compute autocast's copies of them are whole in every process.
  On a CPU, fitted to two-process runs (bench/fsdp_cpu.py): under fsdp / zero3 the main process
  gathers every weight once more to save them, and glibc's heap keeps every trained weight's whole
  gradient (made before its reduce-scatter); every launched process holds CPU_LAUNCHED_BYTES more.
  The plan assumes fsdp_reshard_after_forward true and no offloading (examples/accelerate/):
  offloaded shards are in CPU memory, so for a GPU the plan errs high.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from tunelab.planning.arch import Arch

GiB = 2 ** 30
MiB = 2 ** 20
CHUNK = 256  # rows of the chunked cross-entropy (training/loss.py)

# Measured on this loop (bench/plan_accuracy.py, SmolLM2-135M, 2-core Zen 5, torch 2.13 CPU):
CPU_RUNTIME_BYTES = 441 * MiB       # python + torch + transformers + peft + accelerate, imported
CPU_MISC_BYTES = 30 * MiB           # tokenizer, encoded data, accelerate state
CPU_HEAP_FACTOR = {"full": 1.63, "lora": 1.83, "qlora": 1.83}
# A compiled run's activation term over the eager one's, on a CPU: bench/plan_accuracy.py --compile
# against the same rows eager, SmolLM2-135M, AMX Xeon, 2026-12-07 (bench/RESULTS.md): LoRA 0.39-0.52,
# full 0.26-0.41 over 256-4096 tokens a micro batch; the share falls as the batch grows, so the
# figures below err long at large batches and short by <5% of the total at small ones
COMPILED_ACTIVATION_SHARE = {"full": 0.30, "lora": 0.42}
CPU_VOCAB_BYTES_PER_TOKEN = 2       # x vocab, per token of the micro batch: measured on a 4-layer and a
                                    # 30-layer model (the per-token growth that is not per layer)
ADAMW_8BIT_BYTES = 2 + 2 * 4 / 256  # two uint8 moments, each with one fp32 scale per block of 256
ADAMW_8BIT_CPU_TEMP = 20            # x the largest trained tensor's elements: bitsandbytes' CPU step
                                    # dequantizes one tensor's moments to fp32 and works on fp32 copies
LOGITS_BYTES_PER_CELL = 10          # per (row x vocab) of one loss chunk: bf16 logits, fp32 copy, softmax, grad
GPU_CONTEXT_BYTES = int(0.75 * GiB)  # CUDA context + cuBLAS workspace
GPU_ALLOCATOR_FACTOR = 1.10         # caching allocator fragmentation

NF4_BYTES = 0.5                     # 4 bits per weight
QUANT_CONST_BYTES = 4 / 64          # one fp32 absmax per block of 64
QUANT_CONST_DQ_BYTES = 1 / 64 + 4 / (64 * 256)  # double quantization: 8-bit absmax + fp32 per 256 blocks

GATHERED = "gathered weights, buckets"  # the breakdown's term for them
STRATEGIES = ("single", "ddp", "fsdp", "zero1", "zero2", "zero3")
# What a launched CPU process holds beyond the terms, for any strategy (gloo, the process group; not
# taken apart): fitted with bench/fsdp_cpu.py to 12 runs of 2 processes (bench/RESULTS.md)
CPU_LAUNCHED_BYTES = 500 * MiB
ZERO3_LIVE_PARAMS = 1e9             # DeepSpeed's stage3_max_live_parameters default: gathered weights kept alive


@dataclass
class Setup:
    """One run's choices that memory depends on (the names are the config's)."""

    method: str = "lora"                 # full | lora | qlora
    compute_dtype: str = "bf16"          # bf16 | fp16 | fp32 (resolved; never "auto" here)
    max_seq_len: int = 1024
    micro_batch_size: int = 4
    grad_accum_steps: int = 2
    gradient_checkpointing: bool = False
    lora_rank: int = 16
    lora_targets: "list[str] | str" = "all-linear"
    lora_dropout: float = 0.05
    optimizer: str = "adamw"             # adamw | adamw_8bit (train.optimizer)
    weight_dtype: str = "fp32"           # fp32 | bf16 (train.weight_dtype): full fine-tuning's trained weights
    optimizer_in_backward: bool = False  # train.optimizer_in_backward: each gradient freed at its weight's step
    double_quant: bool = True
    answer_fraction: float = 1.0         # share of tokens that are answers (1.0: worst case)
    batch_tokens: int | None = None      # the data's largest micro batch, once the loop knows its data
    mean_batch_tokens: float | None = None  # the data's mean micro batch (where the plan read the data), for the time
    attention_len: float | None = None   # the data's sum(L^2) / sum(L) (where the plan read the data); else max_seq_len
    compiled: bool = False               # train.compile as the loop resolves it (the plan: where it can know)
    strategy: str = "single"             # single | ddp | fsdp | zero1 | zero2 | zero3 (STRATEGIES)
    world: int = 1                       # processes of the run on all machines: what fsdp/zero split over
    # (rows, max_seq_len) -> the data's largest micro batch batched so (where the plan read the data): the advice's plans
    batch_tokens_for: "Callable[[int, int], int] | None" = field(default=None, repr=False, compare=False)

    @property
    def bf16_weights(self) -> bool:
        """Full fine-tuning of bf16 weights: weights, gradients and moments bf16, no autocast copies."""
        return self.method == "full" and self.weight_dtype == "bf16"

    @property
    def deepspeed_bf16(self) -> bool:
        """DeepSpeed's bf16 mode (ZeRO 1-3 with bf16 compute): bf16 weights, fp32 masters with the moments."""
        return self.strategy.startswith("zero") and self.compute_dtype == "bf16"

    @property
    def shards_weights(self) -> bool:
        """FSDP and ZeRO-3 split the weights themselves (and keep a LoRA base in fp32, but for
        DeepSpeed's bf16 mode)."""
        return self.strategy in ("fsdp", "zero3")

    @property
    def shards_gradients(self) -> bool:
        return self.strategy in ("fsdp", "zero2", "zero3")

    @property
    def shards_optimizer(self) -> bool:
        return self.strategy in ("fsdp", "zero1", "zero2", "zero3")

    @property
    def tokens(self) -> int:
        """Tokens in one packed micro batch, at most: the data's largest when known, else the worst
        case of micro_batch_size rows of max_seq_len tokens."""
        return self.batch_tokens or self.micro_batch_size * self.max_seq_len


@dataclass
class Breakdown:
    """Peak memory in bytes, by term; `peak` is what the device must hold."""

    terms: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    peak: float = 0.0
    trainable_params: int = 0


def weight_bytes(arch: Arch, s: Setup) -> float:
    """The weights one process holds between steps (under FSDP and ZeRO-3 its shard)."""
    n = arch.n_params
    if s.method == "qlora":
        const = QUANT_CONST_DQ_BYTES if s.double_quant else QUANT_CONST_BYTES
        rest = arch.embedding_params + arch.norm_params  # embeddings, head and norms stay in bf16
        return (NF4_BYTES + const) * arch.linear_params + 2.0 * rest
    if s.shards_weights:  # fp32, the LoRA base too, but for DeepSpeed's bf16 mode
        return (2.0 if s.deepspeed_bf16 else 4.0) * n / s.world
    if s.method == "full":  # the weights the optimizer updates (DeepSpeed's bf16 mode: its masters' copies)
        return 2.0 * n if s.bf16_weights or s.deepspeed_bf16 else 4.0 * n
    return _dtype_bytes(s.compute_dtype) * n  # lora: the frozen base in the compute dtype


def layer_params(arch: Arch) -> int:
    """One decoder layer's weights (what FSDP gathers as a unit)."""
    return (arch.n_params - arch.embedding_params) // arch.num_layers


def gathered_bytes(arch: Arch, s: Setup, kind: str = "cpu") -> float:
    """Whole weights (and gradients) that a sharded run holds at once beside its shards, in the dtype
    it gathers them in (see the module docstring); DDP's and ZeRO-2's gradient buckets."""
    n_train = trainable_params(arch, s)
    # on a CPU the main process gathers every weight once more to save them (a GPU's go to CPU memory),
    # and glibc's heap keeps every trained weight's whole gradient, made before its reduce-scatter
    on_cpu = 4.0 * (arch.n_params + n_train) if kind == "cpu" and s.shards_weights else 0.0
    if s.strategy == "fsdp":  # gathered in the compute dtype (training/distributed.fsdp_mixed_precision)
        root = arch.embedding_params + arch.norm_params
        grads = (4.0 * (root + layer_params(arch)) * n_train / arch.n_params)  # a LoRA run's are its adapters'
        return _dtype_bytes(s.compute_dtype) * (root + 2 * layer_params(arch)) + grads + on_cpu
    if s.strategy == "zero3":
        live = (2.0 if s.deepspeed_bf16 else 4.0) * min(arch.n_params, ZERO3_LIVE_PARAMS)
        return live + 4.0 * 2 * arch.hidden_size ** 2 + on_cpu
    if s.strategy == "zero2":
        return 4.0 * 2 * arch.hidden_size ** 2  # the reduce bucket, double-buffered
    if s.strategy == "ddp":
        return 4.0 * n_train
    return 0.0


def trainable_params(arch: Arch, s: Setup) -> int:
    return arch.n_params if s.method == "full" else arch.lora_params(s.lora_rank, s.lora_targets)


def held_gradient_params(arch: Arch, s: Setup) -> int:
    """Parameters whose gradients exist at once at the peak: all trained ones, or stepped in
    backward (train.optimizer_in_backward) one decoder block's and the embedding's (its gradient
    is made in the forward, by the fused loss through the tied head, and stepped last)."""
    n_train = trainable_params(arch, s)
    if s.shards_gradients:
        return n_train // s.world
    if not s.optimizer_in_backward:
        return n_train
    return min(n_train, layer_params(arch) + arch.embedding_params)


def activation_bytes_per_token_layer(arch: Arch, s: Setup) -> float:
    """Bytes autograd saves per token in one decoder layer (see the module docstring)."""
    h, q, kv, i = arch.hidden_size, arch.q_dim, arch.kv_dim, arch.intermediate_size
    low = s.compute_dtype != "fp32"
    if s.bf16_weights:  # bf16 all through, as a LoRA base
        per = 20 * h + 6 * q + 4 * kv + 8 * i
    elif s.method == "full":
        per = (26 * h + 6 * q + 4 * kv + 8 * i) if low else (24 * h + 12 * q + 8 * kv + 16 * i)
    else:
        # dropout keeps a dropped copy of each adapter input and its mask; tunelab's hashed dropout
        # (training/lora.py) 11h + q + i, measured with saved-tensor hooks at three widths (tests/test_plan.py)
        if s.method == "lora" and low:  # tunelab's LoRA forward: the adapters share the base's bf16 input
            per, dropped = 12 * h + 6 * q + 4 * kv + 8 * i, 11 * h + q + i
        elif low:  # peft's forward (qlora) casts each adapter's input to fp32 first
            per, dropped = 18 * h + 6 * q + 4 * kv + 8 * i, 20 * h + 4 * q + 4 * i
        else:
            per, dropped = 40 * h + 12 * q + 8 * kv + 16 * i, 40 * h + 8 * q + 8 * i
        if s.lora_dropout > 0:
            per += dropped
        per += 2 * s.lora_rank * len(arch.linears()) * (1 if low else 2)
    return float(per)


def activations(arch: Arch, s: Setup) -> float:
    t = s.tokens
    per_layer = activation_bytes_per_token_layer(arch, s)
    fp32_residual = (s.method == "full" and not s.bf16_weights) or s.compute_dtype == "fp32"
    residual = 4 * arch.hidden_size if fp32_residual else 2 * arch.hidden_size
    if s.gradient_checkpointing:
        # each layer keeps only its input; one layer's activations exist again during its recompute
        body = t * (arch.num_layers * residual + per_layer)
    else:
        body = t * arch.num_layers * per_layer
    final = t * (2 * residual + residual * s.answer_fraction)  # final norm, hidden states at answers
    return body + final


def logits_bytes(arch: Arch, s: Setup) -> float:
    rows = min(CHUNK, max(1, int(s.tokens * s.answer_fraction)))
    return LOGITS_BYTES_PER_CELL * rows * arch.vocab_size


def breakdown(arch: Arch, s: Setup, kind: str = "cpu") -> Breakdown:
    """Peak memory for `kind` cpu (RSS of the training process) or gpu (device memory)."""
    n_train = trainable_params(arch, s)
    w = weight_bytes(arch, s)
    adapters = 4.0 * n_train / (s.world if s.shards_weights else 1) if s.method != "full" else 0.0  # fp32 adapters
    grads = (2.0 if s.bf16_weights else 4.0) * held_gradient_params(arch, s)
    opt = (4.0 if s.bf16_weights else 8.0 if s.optimizer == "adamw" else ADAMW_8BIT_BYTES) * n_train
    if s.shards_optimizer:  # DeepSpeed steps an fp32 copy of its shard of the trained weights
        opt = (opt + (4.0 * n_train if s.strategy.startswith("zero") else 0.0)) / s.world
    gathered = gathered_bytes(arch, s, kind)
    if s.optimizer == "adamw" or kind != "cpu":
        step_temp = 0.0  # fused AdamW: updated in place, one tensor at a time
    else:  # one tensor at a time; for full fine-tuning the largest is the embedding matrix
        step_temp = ADAMW_8BIT_CPU_TEMP * (arch.vocab_size * arch.hidden_size if s.method == "full" else 0)
    low = s.compute_dtype != "fp32"
    # autocast's bf16 copy of each trained weight (whose cast it caches), and under ZeRO-3 of the fp32
    # LoRA base (each cast saved for the backward): whole, since they are made of gathered weights.
    # FSDP gathers in bf16 itself, and DeepSpeed's bf16 mode holds bf16 weights: nothing to cast.
    copied = (0 if s.strategy == "fsdp" or s.deepspeed_bf16 else arch.n_params if s.shards_weights
              else n_train)
    copies = 2.0 * copied if low and not s.bf16_weights else 0.0
    if s.method == "qlora":  # bitsandbytes dequantizes one weight at a time to bf16
        copies += 2.0 * max(a * b for a, b in arch.linears().values())
    act_live = activations(arch, s)
    heap = CPU_HEAP_FACTOR.get(s.method, 1.9) if kind == "cpu" else 1.0
    act = act_live * heap
    compiled_share = (COMPILED_ACTIVATION_SHARE.get(s.method) if kind == "cpu" and s.compiled
                      and not s.gradient_checkpointing else None)
    if kind == "cpu":
        act = (act + CPU_VOCAB_BYTES_PER_TOKEN * arch.vocab_size * s.tokens) * (compiled_share or 1.0)
    lg = logits_bytes(arch, s)
    # Peak is the larger of two moments: the start of backward (activations, logits chunk, the
    # bf16 weight copies; gradients exist only under accumulation) and the optimizer step (all
    # gradients plus the step's temporaries; on a CPU the activations' heap is still mapped).
    # Stepped in backward, the few gradients that exist at once are there during backward, and
    # no step follows.
    during_backward = copies + lg + (grads if s.grad_accum_steps > 1 or s.optimizer_in_backward else 0.0)
    during_step = 0.0 if s.optimizer_in_backward else grads + step_temp
    if kind == "cpu":  # the activations' heap stays mapped through the optimizer step
        moment = act + max(during_backward, during_step)
    else:
        moment = max(act + during_backward, during_step)
    runtime = CPU_RUNTIME_BYTES + CPU_MISC_BYTES if kind == "cpu" else GPU_CONTEXT_BYTES
    if kind == "cpu" and s.world > 1:
        runtime += CPU_LAUNCHED_BYTES
    b = Breakdown(trainable_params=n_train)
    b.terms = {"weights": w, "trainable parameters": adapters, "gradients": grads, "optimizer states": opt,
               GATHERED: gathered,
               "weight copies (autocast/dequant)": copies, "activations": act, "logits and loss": lg,
               "optimizer step temporaries": step_temp, "framework overhead": float(runtime)}
    b.notes = {
        "weights": _weights_note(arch, s),
        "optimizer states": ("AdamW: 2 bf16 moments, stochastic rounding" if s.bf16_weights
                             else "AdamW: 2 fp32 moments" if s.optimizer == "adamw"
                             else "8-bit AdamW: 2 x 1 byte + block scales")
                            + (" + DeepSpeed's fp32 copy of the trained weights" if s.strategy.startswith("zero") else "")
                            + (f", split {s.world} ways" if s.shards_optimizer else ""),
        GATHERED: {"fsdp": f"embeddings, head and 2 layers gathered in {s.compute_dtype}, with their gradients",
                   "zero3": f"weights gathered {'in bf16 ' if s.deepspeed_bf16 else ''}and kept alive (up to 1e9) + reduce bucket",
                   "zero2": "gradient reduce bucket", "ddp": "DDP's gradient buckets"}.get(s.strategy, "")
                  + ("; the main process's whole copy to save, the whole gradients the heap keeps"
                     if kind == "cpu" and s.shards_weights else ""),
        "activations": (f"{activation_bytes_per_token_layer(arch, s) / 1024:.1f} KiB/token/layer x {s.tokens} tokens"
                        + (" (checkpointed: layer inputs + one layer)" if s.gradient_checkpointing else "")
                        + (f", x{heap:.2f} CPU heap + {CPU_VOCAB_BYTES_PER_TOKEN} B x vocab per token" if kind == "cpu" else "")
                        + (f"; compiled: x{compiled_share:.2f}" if compiled_share else "")),
        **({"gradients": "stepped in backward: one block's and the embedding's at once"} if s.optimizer_in_backward
           else {"gradients": f"split {s.world} ways"} if s.shards_gradients else {}),
        "logits and loss": f"{min(CHUNK, int(s.tokens * s.answer_fraction))} rows x {arch.vocab_size} vocab, chunked",
        "framework overhead": ("python, torch, transformers, peft imported"
                               + (", a launched process's extra (gloo, process group)" if s.world > 1 else "")
                               if kind == "cpu" else "CUDA context"),
    }
    held = w + adapters + opt + gathered + moment
    b.peak = runtime + (held if kind == "cpu" else GPU_ALLOCATOR_FACTOR * held)
    return b


def _weights_note(arch: Arch, s: Setup) -> str:
    if s.shards_weights and s.method != "qlora":
        if s.deepspeed_bf16:
            return f"{arch.n_params / 1e9:.2f}B params x 2 bytes (bf16, DeepSpeed's), split {s.world} ways"
        return f"{arch.n_params / 1e9:.2f}B params x 4 bytes (fp32), split {s.world} ways"
    if s.method == "full" and s.deepspeed_bf16:
        return f"{arch.n_params / 1e9:.2f}B params x 2 bytes (bf16, DeepSpeed's; its fp32 masters with the moments)"
    if s.method == "full":
        return (f"{arch.n_params / 1e9:.2f}B params x 2 bytes (bf16, updated with stochastic rounding)"
                if s.bf16_weights else f"{arch.n_params / 1e9:.2f}B params x 4 bytes (fp32 master)")
    if s.method == "qlora":
        return (f"{arch.linear_params / 1e9:.2f}B in nf4 ({NF4_BYTES} byte + constants"
                f"{', double-quantized' if s.double_quant else ''}), embeddings/norms bf16")
    return f"{arch.n_params / 1e9:.2f}B params x {_dtype_bytes(s.compute_dtype)} bytes ({s.compute_dtype}, frozen)"


def _dtype_bytes(name: str) -> int:
    return {"fp32": 4, "bf16": 2, "fp16": 2}.get(name, 2)
