// tunelab's chat page: talks to the server's own OpenAI API (/v1/models, /v1/chat/completions with
// streaming), so it shows exactly what any client gets. One or two models side by side (a base and
// its tuned adapter, say): each column keeps its own answers, the user's messages are shared.
// No external resources and nothing stored: the API key lives only in this page's memory.
"use strict";

// Split a text/event-stream buffer into complete `data:` payloads and the unfinished rest.
function parseSSE(buffer) {
  const events = [];
  const blocks = buffer.split(/\r?\n\r?\n/);
  const rest = blocks.pop();
  for (const block of blocks) {
    const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim());
    if (data.length) events.push(data.join("\n"));
  }
  return { events, rest };
}

// The messages one column sends: the system prompt, then each turn's user message and that
// column's own answer (the last turn has none yet).
function messagesFor(system, turns, column) {
  const messages = system.trim() ? [{ role: "system", content: system }] : [];
  for (const turn of turns) {
    messages.push({ role: "user", content: turn.user });
    if (turn.answers[column] !== undefined) messages.push({ role: "assistant", content: turn.answers[column] });
  }
  return messages;
}

function headers(apiKey) {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${(body.error && body.error.message) || JSON.stringify(body)}`;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function listModels(base, apiKey) {
  const r = await fetch(`${base}/v1/models`, { headers: headers(apiKey) });
  if (!r.ok) throw new Error(await errorText(r));
  return (await r.json()).data.map((m) => m.id);
}

// Stream one chat completion; onDelta(text) gets each piece. Resolves to
// {text, finish, completionTokens, seconds}; rejects with the server's error message.
async function streamChat({ base, model, messages, temperature, maxTokens, apiKey, signal, onDelta }) {
  const started = performance.now();
  const r = await fetch(`${base}/v1/chat/completions`, {
    method: "POST", headers: headers(apiKey), signal,
    body: JSON.stringify({ model, messages, temperature, max_tokens: maxTokens, stream: true,
                           stream_options: { include_usage: true } }),
  });
  if (!r.ok) throw new Error(await errorText(r));
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "", finish = null, completionTokens = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    const parsed = parseSSE(buffer + decoder.decode(value, { stream: true }));
    buffer = parsed.rest;
    for (const data of parsed.events) {
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) completionTokens = chunk.usage.completion_tokens;
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) {
          text += choice.delta.content;
          onDelta(choice.delta.content);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
  return { text, finish, completionTokens, seconds: (performance.now() - started) / 1000 };
}

if (typeof module !== "undefined") module.exports = { parseSSE, messagesFor, listModels, streamChat };

if (typeof document !== "undefined") {
  const $ = (id) => document.getElementById(id);
  const base = window.location.origin;
  let turns = [];
  let controller = null;

  const status = (text) => { $("status").textContent = text; };
  const columns = () => ($("model-b").value ? ["a", "b"] : ["a"]);

  function bubble(column, role, text) {
    const div = document.createElement("div");
    div.className = `msg ${role}`;
    div.textContent = text;  // never innerHTML: a model's output is text, not markup
    const log = $(`log-${column}`);
    log.appendChild(div);
    log.scrollTop = log.scrollHeight;
    return div;
  }

  function showColumns() {
    $("column-b").hidden = !$("model-b").value;
    $("title-a").textContent = $("model-a").value;
    $("title-b").textContent = $("model-b").value;
  }

  async function loadModels() {
    try {
      const models = await listModels(base, $("api-key").value);
      for (const [select, keep] of [[$("model-a"), false], [$("model-b"), true]]) {
        const chosen = select.value;
        select.replaceChildren(...(keep ? [new Option("(none)", "")] : []), ...models.map((m) => new Option(m, m)));
        if (models.includes(chosen)) select.value = chosen;
      }
      status("");
    } catch (e) {
      status(e.message.startsWith("401") ? "This server needs an API key: enter it above." : `Could not list models: ${e.message}`);
    }
    showColumns();
  }

  function newChat() {
    turns = [];
    $("log-a").replaceChildren();
    $("log-b").replaceChildren();
    showColumns();
  }

  async function answer(column, turn, settings) {
    const model = $(`model-${column}`).value;
    const messages = messagesFor($("system").value, turns, column);
    const div = bubble(column, "assistant", "");
    try {
      const log = $(`log-${column}`);
      const r = await streamChat({ ...settings, model, messages, onDelta: (piece) => {
        const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 40;  // follow unless the reader scrolled up
        div.textContent += piece;
        if (atEnd) log.scrollTop = log.scrollHeight;
      } });
      turn.answers[column] = r.text;
      const meta = document.createElement("span");
      meta.className = "meta";
      const n = r.completionTokens;
      const rate = n ? ` · ${n} token${n === 1 ? "" : "s"} · ${(n / r.seconds).toFixed(1)} tokens/s` : "";
      meta.textContent = `${r.seconds.toFixed(1)} s${rate} · finish: ${r.finish}`;
      div.appendChild(meta);
    } catch (e) {
      turn.answers[column] = div.textContent;
      div.className = "msg error";
      div.textContent += (div.textContent ? "\n" : "") + (e.name === "AbortError" ? "(stopped)" : e.message);
    }
  }

  async function send(event) {
    event.preventDefault();
    const text = $("prompt").value;
    if (!text.trim() || controller) return;
    const turn = { user: text, answers: {} };
    turns.push(turn);
    for (const c of columns()) bubble(c, "user", text);
    $("prompt").value = "";
    controller = new AbortController();
    $("send").disabled = true;
    $("stop").disabled = false;
    status("");
    const settings = { base, temperature: Number($("temperature").value), maxTokens: Number($("max-tokens").value),
                       apiKey: $("api-key").value, signal: controller.signal };
    await Promise.all(columns().map((c) => answer(c, turn, settings)));  // the server batches them together
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }

  $("ask").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", newChat);
  $("model-a").addEventListener("change", newChat);
  $("model-b").addEventListener("change", newChat);
  $("api-key").addEventListener("change", loadModels);
  loadModels();
}
