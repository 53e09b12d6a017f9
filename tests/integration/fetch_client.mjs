// A plain `fetch` client (Node 18+), as a browser or a JS tool would call the gateway.
// usage: node fetch_client.mjs BASE_URL KEY MODEL plain|stream PROMPT
// Prints one JSON object: {status, ...} with the answer text, usage and chunk timings.
const [baseUrl, key, model, mode, prompt] = process.argv.slice(2);
const t0 = performance.now();
const resp = await fetch(`${baseUrl}/v1/chat/completions`, {
  method: "POST",
  headers: { "content-type": "application/json", authorization: `Bearer ${key}` },
  body: JSON.stringify({
    model,
    messages: [{ role: "user", content: prompt }],
    max_tokens: 64,
    ...(mode === "stream" ? { stream: true, stream_options: { include_usage: true } } : {}),
  }),
});
const out = { status: resp.status, contentType: resp.headers.get("content-type"),
              requestId: resp.headers.get("x-request-id") };
if (mode !== "stream" || resp.status !== 200) {
  out.body = await resp.json();
} else {
  const decoder = new TextDecoder();
  let buffer = "";
  out.text = "";
  out.chunks = 0;
  out.done = false;
  for await (const piece of resp.body) {
    buffer += decoder.decode(piece, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!frame.startsWith("data: ")) continue;
      const data = frame.slice(6);
      if (data === "[DONE]") { out.done = true; continue; }
      const chunk = JSON.parse(data);
      out.chunks += 1;
      if (chunk.usage) out.usage = chunk.usage;
      const content = chunk.choices?.[0]?.delta?.content;
      if (content) {
        out.firstContentMs ??= performance.now() - t0;
        out.text += content;
      }
      out.model = chunk.model;
    }
  }
  out.endMs = performance.now() - t0;
}
console.log(JSON.stringify(out));
