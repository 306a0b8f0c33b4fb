"""`tunelab chat`: a terminal conversation that streams tokens; /reset starts over, /exit leaves."""

import sys

from tunelab.generation import SamplingConfig, stream_chat

HELP = "type a message; /reset clears the conversation, /exit (or Ctrl-D) leaves"


def chat_loop(model_ref: str, sampling: SamplingConfig | None = None, dtype: str = "auto",
              system_prompt: str | None = None, input_fn=input, out=sys.stdout, engine: str = "auto",
              lora: str | None = None, quantization: str | None = None) -> list[dict]:
    """Chat until /exit or end of input. Returns the last conversation (handy in tests).

    engine: auto (llama.cpp for a .gguf, else transformers) | transformers | llamacpp;
    lora: an adapter GGUF applied on top (llama.cpp engine);
    quantization: nf4 | fp4 | int8 loads the weights quantized (transformers engine, bitsandbytes).
    """
    from tunelab import llamacpp

    if llamacpp.use_llamacpp(model_ref, engine) or lora:
        llm = llamacpp.load(llamacpp.gguf_path(model_ref), lora=lora)
        answer = lambda msgs: llamacpp.stream_chat(llm, msgs, sampling)  # noqa: E731
    else:
        from tunelab.models import load_model

        model, tok = load_model(model_ref, dtype=dtype, quantization=quantization)
        answer = lambda msgs: stream_chat(model, tok, msgs, sampling)  # noqa: E731
    start = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages = list(start)
    out.write(f"chatting with {model_ref}; {HELP}\n")
    while True:
        try:
            text = input_fn("you> ")
        except EOFError:
            out.write("\n")
            return messages
        cmd = text.strip()
        if cmd in ("/exit", "/quit"):
            return messages
        if cmd == "/reset":
            messages = list(start)
            out.write("(conversation cleared)\n")
            continue
        if not cmd:
            continue
        messages.append({"role": "user", "content": text})
        out.write("model> ")
        pieces = []
        for piece in answer(messages):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(pieces).strip()})
