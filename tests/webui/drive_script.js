// Runs the chat page's own functions (chat.js) under Node.js against a live `tunelab serve`, for
// tests/test_serve.py: node drive_script.js CHAT_JS URL API_KEY  ->  one JSON object on stdout.
const chat = require(process.argv[2]);
const [url, key] = [process.argv[3], process.argv[4]];
(async () => {
  const out = {models: await chat.listModels(url, key), answers: {}, pieces: {}};
  try { await chat.listModels(url, ""); } catch (e) { out.without_key = e.message; }
  const turns = [{user: "Hello there", answers: {}}];
  await Promise.all(["tiny", "stance"].map(async (model) => {
    out.pieces[model] = 0;
    out.answers[model] = await chat.streamChat({base: url, model, apiKey: key, temperature: 0, maxTokens: 6,
      messages: chat.messagesFor("", turns, "a"), onDelta: () => { out.pieces[model] += 1; }});
  }));
  try {
    await chat.streamChat({base: url, model: "nope", apiKey: key, temperature: 0, maxTokens: 6,
                           messages: chat.messagesFor("", turns, "a"), onDelta: () => {}});
  } catch (e) { out.unknown_model = e.message; }
  out.sse = chat.parseSSE('data: {"a":1}\n\ndata: [DONE]\r\n\r\ndata: {"b"');
  out.messages = chat.messagesFor("Be brief.", [{user: "q1", answers: {a: "x1", b: "y1"}}, {user: "q2", answers: {}}], "b");
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
