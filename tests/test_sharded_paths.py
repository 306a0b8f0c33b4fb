"""The loop's FSDP/DeepSpeed paths that can be checked without GPUs: the loss when the output head's
weight is a shard, and the settings handed to DeepSpeed."""

from types import SimpleNamespace

import pytest
import torch

from tunelab.config.schema import TrainConfig
from tunelab.data.batching import collate
from tunelab.data.encode import encode_example
from tunelab.data.types import Example
from tunelab.errors import RunError
from tunelab.training import distributed
from tunelab.training.loss import _plain_head, token_loss_sum


def test_a_sharded_head_gives_the_same_loss_and_gradients(tiny_model_dir, tokenizer):
    """ZeRO-3 marks its partitioned weights (ds_id) and leaves a placeholder outside forward; the loss
    then lets the model apply its head itself, which must equal tunelab's chunked head."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    items = [e for text in ("Great food.", "The battery died after a day, sadly.")
             for e in encode_example(Example(messages=[{"role": "user", "content": text},
                                                       {"role": "assistant", "content": "positive"}]),
                                     tokenizer, 128)]
    batch = collate(items, packing=False, pad_id=2)

    def loss_and_grad():
        model.zero_grad()
        loss, n = token_loss_sum(model, batch)
        loss.backward()
        return loss.item(), n, model.get_output_embeddings().weight.grad.clone()

    chunked = loss_and_grad()
    head = model.get_output_embeddings().weight
    head.ds_id = 0  # what DeepSpeed ZeRO-3 sets on a partitioned parameter
    try:
        assert _plain_head(model) is None  # the other path really runs
        by_model = loss_and_grad()
    finally:
        del head.ds_id
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
