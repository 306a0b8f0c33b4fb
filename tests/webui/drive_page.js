// Drives the chat page in headless Chromium against a live `tunelab serve`, for tests/test_serve.py:
// node drive_page.js URL API_KEY COMPARE_MODEL PROMPT MAX_TOKENS  ->  one JSON object on stdout.
const puppeteer = require("puppeteer-core");
const [url, apiKey, compareWith, prompt, maxTokens] = process.argv.slice(2);
const chromium = process.env.CHROMIUM || "/usr/bin/chromium";

(async () => {
  const browser = await puppeteer.launch({ executablePath: chromium, args: ["--no-sandbox"], headless: true });
  const page = await browser.newPage();
  const out = { errors: [] };
  page.on("console", (m) => { if (m.type() === "error") out.errors.push(m.text()); });  // CSP violations land here
  page.on("pageerror", (e) => out.errors.push(String(e)));
  await page.goto(url, { waitUntil: "networkidle0" });
  const display = () => page.$eval("#column-b", (e) => getComputedStyle(e).display);
  out.status_without_key = await page.$eval("#status", (e) => e.textContent);
  await page.type("#api-key", apiKey);
  await page.$eval("#api-key", (e) => e.dispatchEvent(new Event("change")));
  await page.waitForFunction(() => document.getElementById("model-a").options.length > 0, { timeout: 20000 });
  out.models = await page.$$eval("#model-a option", (os) => os.map((o) => o.value));
  out.compare_hidden_display = await display();
  await page.select("#model-b", compareWith);
  out.compare_shown_display = await display();
  await page.$eval("#max-tokens", (e, n) => { e.value = n; }, maxTokens);
  await page.type("#prompt", prompt);
  await page.keyboard.press("Enter");  // Enter sends
  await page.waitForFunction(() => !document.getElementById("send").disabled &&
    document.querySelectorAll(".msg.assistant, .msg.error").length >= 2, { timeout: 60000 });
  out.columns = {};
  for (const c of ["a", "b"]) {
    out.columns[c] = await page.$$eval(`#log-${c} .msg`, (ms) => ms.map((m) => ({
      role: m.className.replace("msg ", ""),
      text: m.firstChild ? m.firstChild.textContent : "",
      meta: (m.querySelector(".meta") || { textContent: "" }).textContent })));
  }
  await browser.close();
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
