"""The loop's FSDP/DeepSpeed paths that can be checked without GPUs: the loss when the model is
sharded (FSDP2) or the output head's weight is a shard, and the settings handed to DeepSpeed."""

from types import SimpleNamespace

import pytest
import torch

from tunelab.config.schema import TrainConfig
from tunelab.data.batching import collate
from tunelab.data.encode import encode_example
from tunelab.data.types import Example
from tunelab.errors import RunError
from tunelab.training import distributed
from tunelab.training.loss import token_loss_sum


def two_sentiment_rows(tokenizer) -> dict:
    items = [e for text in ("Great food.", "The battery died after a day, sadly.")
             for e in encode_example(Example(messages=[{"role": "user", "content": text},
                                                       {"role": "assistant", "content": "positive"}]),
                                     tokenizer, 128)]
    return collate(items, packing=False, pad_id=2)


def record_head_calls(model) -> list:
    """What the head's calls return, appended to the list: "loss" (tunelab's chunked loss ran in the
    call) or the logits' width (the model applied the head as it is)."""
    calls = []
    model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: calls.append("loss" if out.dim() == 0 else out.shape[-1]))
    return calls


@pytest.mark.parametrize("head_group_resharded", [False, True])
def test_fsdp2_as_accelerate_wraps_a_model_keeps_the_chunked_head(tiny_model_dir, tokenizer, tmp_path,
                                                                   head_group_resharded):
    """FSDP2 gathers the output head's weight for the head's call, where the chunked loss runs, so it
    runs under FSDP too (never holding the answer tokens' full logits), with the loss and gradients
    of the unwrapped model; whether the head's group (head, final norm, tied embedding, as accelerate
    groups them) is resharded after the forward or kept until backward. One gloo process."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    batch = two_sentiment_rows(tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loss, n = token_loss_sum(plain, batch)
    loss.backward()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        for layer in model.model.layers:  # as accelerate's fsdp2_prepare_model wraps a decoder
            fully_shard(layer)
        fully_shard([model.model.norm, model.get_input_embeddings(), model.get_output_embeddings()],
                    reshard_after_forward=head_group_resharded)
        fully_shard(model)
        with torch.no_grad():  # as validation runs it, before and between training steps
            assert token_loss_sum(model, batch)[0].item() == pytest.approx(loss.item(), rel=1e-6)
        calls = record_head_calls(model)
        sharded_loss, sharded_n = token_loss_sum(model, batch)
        sharded_loss.backward()
        assert calls == ["loss"]
        assert sharded_n == n > 0 and sharded_loss.item() == pytest.approx(loss.item(), rel=1e-6)
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)


def test_the_models_own_head_gives_the_same_loss_and_gradients(tiny_model_dir, tokenizer):
    """A head with extras (softcapping, a logit scale) goes through the model's own head and the
    answer positions' full logits, which must equal tunelab's chunked head; a head DeepSpeed ZeRO-3
    has partitioned (ds_id) is gathered inside its own call and keeps the chunked path."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = two_sentiment_rows(tokenizer)

    def loss_and_grad():
        model.zero_grad()
        loss, n = token_loss_sum(model, batch)
        loss.backward()
        return loss.item(), n, model.get_output_embeddings().weight.grad.clone()

    head = model.get_output_embeddings()
    calls = record_head_calls(model)
    head.weight.ds_id = 0  # what DeepSpeed ZeRO-3 sets on a partitioned parameter
    try:
        chunked = loss_and_grad()
    finally:
        del head.weight.ds_id
    assert calls == ["loss"]
    model.config.logit_scale = 1.0  # names an extra (which Llama's forward ignores: the same logits)
    try:
        by_model = loss_and_grad()
    finally:
        del model.config.logit_scale
    assert calls[1:] == [model.config.vocab_size]  # the other path really ran
    assert by_model[1] == chunked[1] > 0
    assert by_model[0] == pytest.approx(chunked[0], rel=1e-5)
    assert torch.allclose(by_model[2], chunked[2], rtol=1e-4, atol=5e-5)  # fp32 rounding: 7.4e-6 seen on AMD Zen 4


def fake_deepspeed(zero_stage: int, **ds_config):
    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(zero_stage=zero_stage, deepspeed_config={
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", **ds_config})
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2,
                           state=SimpleNamespace(deepspeed_plugin=plugin), gradient_accumulation_steps=1)


def test_deepspeed_takes_batch_accumulation_and_clipping_from_the_config():
    acc = fake_deepspeed(2)
    train = TrainConfig(micro_batch_size=4, grad_accum_steps=3, max_grad_norm=0.5)
    distributed.configure_deepspeed(acc, train)
    ds = acc.state.deepspeed_plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (4, 3, 0.5)
    # DeepSpeed divides each micro batch's loss by its accumulation steps; the loop multiplies it back
    assert acc.gradient_accumulation_steps == 3 and distributed.loss_scale(acc) == 3
    assert distributed.shards_optimizer(acc) and not distributed.shards_parameters(acc)
    assert distributed.shards_parameters(fake_deepspeed(3))
    # DeepSpeed's 5e8-element buckets (2 GB per process) left to accelerate's sizing by hidden size;
    # a size the config sets is kept
    acc = fake_deepspeed(3, zero_optimization={"stage": 3, "reduce_bucket_size": 1000})
    distributed.configure_deepspeed(acc, train)
    zero = acc.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
    assert zero == {"stage": 3, "reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": "auto",
                    "stage3_param_persistence_threshold": "auto"}


def test_a_deepspeed_config_that_disagrees_with_train_stops_with_the_fix():
    acc = fake_deepspeed(2, gradient_accumulation_steps=8)
    with pytest.raises(RunError, match="gradient_accumulation_steps=8 but train.grad_accum_steps=2; remove"):
        distributed.configure_deepspeed(acc, TrainConfig(grad_accum_steps=2))


def test_ddp_and_one_process_keep_the_plain_paths():
    from accelerate.utils import DistributedType

    for n, kind in ((1, "single"), (2, "ddp")):
        acc = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU if n > 1 else DistributedType.NO,
                              num_processes=n, gradient_accumulation_steps=1)
        assert distributed.strategy(acc) == kind
        assert not distributed.shards_optimizer(acc) and not distributed.shards_parameters(acc)
        assert distributed.loss_scale(acc) == 1 and distributed.full_state_dict(acc, None) is None


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_compute_under_zero_turns_on_deepspeeds_bf16_mode(stage):
    """bf16 weights with fp32 masters beside AdamW, gradients reduced in fp32."""
    acc = fake_deepspeed(stage, bf16={"enabled": "auto"})
    assert distributed.deepspeed_mixed_precision(acc, torch.bfloat16) and distributed.deepspeed_bf16(acc)
    ds = acc.state.deepspeed_plugin.deepspeed_config
    assert ds["bf16"] == {"enabled": True} and ds["communication_data_type"] == "fp32"
    # summed over micro batches in fp32 under ZeRO-2/3; for ZeRO-1 that setting swaps in another optimizer
    assert ds.get("data_types") == (None if stage == 1 else {"grad_accum_dtype": "fp32"})


def test_deepspeeds_bf16_mode_stays_off_where_it_does_not_apply():
    for acc, dtype in [(fake_deepspeed(3), torch.float32), (fake_deepspeed(0), torch.bfloat16)]:
        assert not distributed.deepspeed_mixed_precision(acc, dtype)
        assert "bf16" not in acc.state.deepspeed_plugin.deepspeed_config
    # the user's own DeepSpeed config may turn it on: saving and resuming then go through the masters
    assert distributed.deepspeed_mixed_precision(fake_deepspeed(2, bf16={"enabled": "true"}), torch.float32)


def test_zero_stage_0_and_deepspeeds_fp16_are_refused_with_the_way_out():
    """Stage 0 wraps the optimizer in DeepSpeed's own, which checkpoints cannot read: the first save
    had failed after training; it stops before anything runs, pointing at DDP or a ZeRO stage. A
    config's own fp16 mode would save fp16 roundings: refused, pointing at model.dtype."""
    with pytest.raises(RunError, match="zero_stage 0 .*examples/accelerate/ddp.yaml"):
        distributed.check_deepspeed(fake_deepspeed(0))
    with pytest.raises(RunError, match="turns fp16 on.*remove its fp16 section.*model.dtype"):
        distributed.check_deepspeed(fake_deepspeed(2, fp16={"enabled": True}))
    for stage in (1, 2, 3):
        distributed.check_deepspeed(fake_deepspeed(stage, fp16={"enabled": "auto"}, bf16={"enabled": True}))


def test_auto_compile_leaves_adapters_under_zero3_eager(tiny_config):
    """DeepSpeed's per-module gathering hooks split the compiled layers at every adapter: eager ran
    41% faster there, while full fine-tuning ran as fast compiled, in less memory (bench/RESULTS.md)."""
    from tunelab.config import load_config
    from tunelab.training.loop import AUTO_COMPILE_TOKENS, auto_compile

    lora = load_config(tiny_config)
    full = load_config({**tiny_config, "method": "full", "train": {**tiny_config["train"], "learning_rate": 1e-5}})
    qlora = load_config({**tiny_config, "method": "qlora"})
    long = AUTO_COMPILE_TOKENS
    assert auto_compile(lora, fake_deepspeed(2), long) == (True, None)
    assert auto_compile(full, fake_deepspeed(3), long) == (True, None)
    compiles, why = auto_compile(lora, fake_deepspeed(3), long)
    assert not compiles and "ZeRO-3" in why
    assert not auto_compile(qlora, fake_deepspeed(2), long)[0]
    assert auto_compile(lora, fake_deepspeed(3), long - 1) == (False, None)  # too short to pay for it anyway
