"""examples/accelerate/*.yaml: accelerate's own loader reads each one, and every nested key is an
option `accelerate launch` knows (it ignores a misspelt one silently, so a typo would only show up
as a run that quietly does something else). The GPU strategies themselves cannot run here."""

from pathlib import Path

import pytest

CONFIG_DIR = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
EXPECTED = {"ddp.yaml": ("MULTI_GPU", None), "fsdp.yaml": ("FSDP", None),
            "deepspeed_zero2.yaml": ("DEEPSPEED", 2), "deepspeed_zero3.yaml": ("DEEPSPEED", 3)}


def test_the_four_strategies_are_shipped():
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_accelerate_reads_the_config_and_knows_every_key(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    cfg = load_config_from_file(str(path))  # raises on an unknown top-level key or a bad distributed_type
    kind, zero_stage = EXPECTED[path.name]
    assert cfg.distributed_type.value == kind
    assert cfg.mixed_precision == "no"  # tunelab applies model.dtype itself; accelerate must not cast too
    known = {action.dest for action in launch_command_parser()._actions}
    # `accelerate launch` copies fsdp_config.x to the option fsdp_x and deepspeed_config.x to x
    for key in cfg.fsdp_config:
        assert (key if key.startswith("fsdp") else f"fsdp_{key}") in known, f"{path.name}: fsdp_config.{key}"
    for key in cfg.deepspeed_config:
        assert key in known, f"{path.name}: deepspeed_config.{key}"
    if zero_stage is not None:
        assert cfg.deepspeed_config["zero_stage"] == zero_stage
        # tunelab sets these from train.*; a value here that disagrees would stop the run
        assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(cfg.deepspeed_config)
    if zero_stage == 3:
        assert cfg.deepspeed_config["zero3_save_16bit_model"] is True  # else the weights cannot be gathered
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2 and cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
