"""A LoRA adapter as a llama.cpp adapter GGUF (for `llama-cli -m base.gguf --lora adapter.gguf`).

The PyPI converter has no adapter converter, so we write llama.cpp's adapter format ourselves (as
upstream's convert_lora_to_gguf.py does) with the gguf package: general.type=adapter,
adapter.type=lora, adapter.lora.alpha, and for each adapted weight `<gguf name>.lora_a` (rank x in)
and `.lora_b` (out x rank). llama.cpp scales by alpha / rank, like peft.

llama.cpp's converter permutes the rows of Llama's q/k projections (its rotary layout); a LoRA
delta B @ A is permuted by permuting the rows of B, so B gets the same permutation.

The check: llama.cpp running the base (f32 GGUF) with the adapter must match the merged model in
transformers (parity.check_export, greedy tokens and held-out text, as for an f32 export).
"""

import json
import math
import os
import tempfile
from pathlib import Path

import torch

from tunelab.errors import TunelabError

# model_type -> (llama.cpp architecture, does llama.cpp's converter permute q/k rows for it?)
SUPPORTED = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
             "qwen3": ("qwen3", False)}


def _permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's converter's LlamaModel.permute, applied to the rows of w."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def adapter_tensors(adapter_dir: Path, base_config: dict) -> tuple[dict, float]:
    """peft adapter folder -> ({gguf tensor name: numpy array}, alpha for llama.cpp's alpha / rank)."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    mtype = base_config.get("model_type")
    if mtype not in SUPPORTED:
        raise TunelabError(f"gguf-adapter export supports {', '.join(SUPPORTED)} models, not {mtype!r}; "
                           "export --format gguf (merged) instead")
    if cfg.get("use_dora") or cfg.get("modules_to_save"):
        raise TunelabError("this adapter uses DoRA or modules_to_save, which llama.cpp adapters cannot hold; "
                           "export --format gguf (merged) instead")
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise TunelabError("per-module ranks/alphas (rank_pattern) cannot be written to one adapter.lora.alpha; "
                           "export --format gguf (merged) instead")
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # peft scales by alpha/sqrt(r); llama.cpp by alpha/r
    arch_name, permute = SUPPORTED[mtype]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    tmap = gguf.get_tensor_name_map(arch, base_config["num_hidden_layers"])
    n_head, n_kv = base_config["num_attention_heads"], base_config.get("num_key_value_heads")
    state = load_file(adapter_dir / "adapter_model.safetensors")
    out = {}
    for key, value in state.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            raise TunelabError(f"adapter tensor {key}: only LoRA A/B matrices can go into a llama.cpp adapter")
        module, ab = key.split(".lora_A." if ".lora_A." in key else ".lora_B.")[0], "a" if ".lora_A." in key else "b"
        hf_name = module.removeprefix("base_model.model.") + ".weight"
        name = tmap.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise TunelabError(f"adapter tensor {key}: llama.cpp has no tensor for {hf_name}")
        w = value.float()
        if ab == "b" and permute and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            w = _permute(w, n_head, n_head if hf_name.endswith("q_proj.weight") else n_kv)
        out[f"{name}.lora_{ab}"] = w.contiguous().numpy()
    return out, alpha


def write_adapter_gguf(tensors: dict, alpha: float, arch_name: str, path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, arr in sorted(tensors.items()):
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def export_gguf_adapter(model_ref: str, out: "str | Path", check: bool = True) -> Path:
    """Write a run's LoRA adapter as a llama.cpp adapter GGUF; `out` appears only if the check passed.

    Use it with a GGUF of the same base model: llama-cli -m base.gguf --lora adapter.gguf, or
    tunelab chat base.gguf --lora adapter.gguf.
    """
    from tunelab.exporters.gguf import convert_hf_folder, hf_folder
    from tunelab.models.load import local_folder, run_model_dir, run_root
    from tunelab.models.resolve import resolve_model

    out = Path(out)
    if out.suffix != ".gguf":
        raise TunelabError(f"--out {out}: an adapter GGUF is one file; give a name ending in .gguf")
    source = resolve_model(model_ref)
    adapter_dir = run_model_dir(source.path) if source.kind == "run" else None
    if adapter_dir is None or not (adapter_dir / "adapter_config.json").is_file():
        raise TunelabError(f"model {model_ref}: gguf-adapter needs a LoRA run (a run directory with an adapter); "
                           "for a full fine-tune or a plain model use --format gguf")
    from tunelab.config import load_config

    cfg = load_config(run_root(source.path) / "config.yaml")
    base = local_folder(resolve_model(cfg.model.ref), cfg.model.revision)
    base_config = json.loads((base / "config.json").read_text())
    tensors, alpha = adapter_tensors(adapter_dir, base_config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.gguf")
    with tempfile.TemporaryDirectory(prefix="tunelab-gguf-", dir=out.parent) as work:
        try:
            write_adapter_gguf(tensors, alpha, SUPPORTED[base_config["model_type"]][0], tmp)
            if check:
                from tunelab.exporters.parity import check_export

                base_gguf = convert_hf_folder(base, Path(work) / "base-f32.gguf", "f32")
                merged = hf_folder(model_ref, Path(work))
                report = check_export(base_gguf, merged, "f32", lora=tmp)
                print(report.summary())
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out
