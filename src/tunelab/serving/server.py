"""`serve()`: load a model (and adapters) once, then answer OpenAI-style requests over HTTP."""

import logging

from tunelab.errors import ConfigError

ENGINES = ("auto", "transformers", "llamacpp")


def make_engine(model_ref: str, adapters: dict[str, str] | None = None, engine: str = "auto",
                dtype: str = "auto", name: str | None = None):
    """The engine for a model reference: llama.cpp for a .gguf file when asked (or when `auto`
    finds llama-cpp-python and no adapters), transformers otherwise."""
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    is_gguf = str(model_ref).endswith(".gguf")
    if engine == "auto":
        engine = "transformers"
        if is_gguf and not adapters:
            from importlib.util import find_spec

            engine = "llamacpp" if find_spec("llama_cpp") else "transformers"
    if engine == "llamacpp":
        if adapters:
            raise ConfigError("--adapter needs --engine transformers (the llama.cpp engine serves one .gguf model)")
        from tunelab.serving.llamacpp_engine import LlamaCppEngine

        return LlamaCppEngine(model_ref, name=name)
    from tunelab.serving.engines import TransformersEngine

    return TransformersEngine(model_ref, adapters, dtype=dtype, name=name)


def serve(model_ref: str, adapters: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, engine: str = "auto", dtype: str = "auto", max_batch: int = 16,
          max_queue: int = 64, max_tokens: int = 4096, max_body_bytes: int = 1_000_000,
          continuous: bool = True, name: str | None = None, log_level: str = "info") -> None:
    """Serve a model over an OpenAI-compatible HTTP API until SIGINT/SIGTERM.

    Args:
        model_ref: alias, Hugging Face folder, run directory or .gguf file (see load_model).
        adapters: {served name: LoRA run directory} attached to the same base, picked per request
            by the `model` field; the base answers under its own name.
        host: bind address; 127.0.0.1 (this machine only) unless you mean to share it.
        api_key: when set, requests must send `Authorization: Bearer <api_key>`.
        engine: auto | transformers | llamacpp.
        max_batch: rows decoded together (1 = one request at a time).
        max_queue: requests allowed to wait; more get 503.
        max_tokens: largest max_tokens a request may ask for.
    """
    import uvicorn

    from tunelab.log import console
    from tunelab.serving.app import Limits, create_app
    from tunelab.serving.batching import Batcher

    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] serving on {host} without an API key: anyone who can reach "
                      "this port can use the model (set --api-key or TUNELAB_API_KEY)", markup=True)
    eng = make_engine(model_ref, adapters, engine, dtype, name)
    batcher = Batcher(eng, max_batch=max_batch if eng.max_batch is None else min(max_batch, eng.max_batch),
                      max_queue=max_queue, continuous=continuous)
    app = create_app(eng, batcher, api_key, Limits(max_body_bytes=max_body_bytes, max_tokens=max_tokens))
    console.print(f"serving {', '.join(eng.models)} at http://{host}:{port}/v1 "
                  f"(engine {type(eng).__name__}, batch {batcher.max_batch}"
                  f"{', API key required' if api_key else ''}); chat page: http://{host}:{port}/", highlight=False)
    logging.getLogger("tunelab.serve").setLevel(log_level.upper())
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown: stop accepting, let running
    # requests finish (up to the timeout), then the app's lifespan stops the batcher
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30,
                            limit_concurrency=max_queue * 4 + 16)
    uvicorn.Server(config).run()
