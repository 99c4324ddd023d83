// vlmkit web demo: upload an image, chat through /v1/chat/completions (streamed), draw the answer's boxes.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], image: null, imageSent: false, boxes: [], busy: false };

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function setStatus(text) {
  $("status").textContent = text;
}

// Boxes come in ORIGINAL image pixels; scale them to the displayed size of the image.
function drawBoxes() {
  const img = $("image");
  const overlay = $("overlay");
  overlay.replaceChildren();
  if (!img.naturalWidth || !img.clientWidth) return;
  const sx = img.clientWidth / img.naturalWidth;
  const sy = img.clientHeight / img.naturalHeight;
  for (const { ref, box } of state.boxes) {
    const [x1, y1, x2, y2] = box;
    const div = document.createElement("div");
    div.className = "vlm-box";
    div.style.left = `${x1 * sx}px`;
    div.style.top = `${y1 * sy}px`;
    div.style.width = `${Math.max(0, x2 - x1) * sx}px`;
    div.style.height = `${Math.max(0, y2 - y1) * sy}px`;
    div.dataset.box = box.join(",");
    div.title = `${ref || "box"}: [${box.map((v) => Math.round(v)).join(", ")}]`;
    if (ref) {
      const label = document.createElement("span");
      label.className = "vlm-box-label";
      label.textContent = ref;
      div.appendChild(label);
    }
    overlay.appendChild(div);
  }
}

function reset() {
  state.messages = [];
  state.imageSent = false;
  state.boxes = [];
  drawBoxes();
  $("log").replaceChildren();
  setStatus(state.image ? "New conversation about this image." : "");
}

function loadImage(file) {
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;
    $("image").src = state.image;
    $("stage").classList.remove("empty");
    reset();
  };
  reader.onerror = () => setStatus("Could not read that file.");
  reader.readAsDataURL(file);
}

function errorText(payload, fallback) {
  return (payload && payload.error && payload.error.message) || fallback;
}

async function readStream(response, bubble) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return text;
        const payload = JSON.parse(data);
        if (payload.error) throw new Error(errorText(payload, "generation failed"));
        for (const choice of payload.choices || []) {
          const delta = choice.delta || {};
          if (delta.content) {
            text += delta.content;
            bubble.textContent = text;
          }
          if (delta.boxes) {
            state.boxes = delta.boxes;
            drawBoxes();
          }
        }
        if (payload.usage) {
          setStatus(`${payload.usage.prompt_tokens} prompt + ${payload.usage.completion_tokens} completion tokens`);
        }
      }
    }
  }
  return text;
}

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || state.busy) return;
  const content = [];
  if (state.image && !state.imageSent) {
    content.push({ type: "image_url", image_url: { url: state.image } });
  }
  content.push({ type: "text", text: prompt });
  const userMessage = { role: "user", content };
  addMessage("user", prompt);
  $("prompt").value = "";
  const bubble = addMessage("assistant", "…");
  state.busy = true;
  $("send").disabled = true;
  setStatus("Generating…");
  const body = {
    model: $("model-name").textContent || "vlmkit",
    messages: [...state.messages, userMessage],
    max_tokens: Number($("max-tokens").value) || 128,
    temperature: Number($("temperature").value) || 0,
    stream: true,
    stream_options: { include_usage: true },
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      const payload = await response.json().catch(() => null);
      throw new Error(errorText(payload, `HTTP ${response.status}`));
    }
    const text = await readStream(response, bubble);
    bubble.textContent = text;
    state.messages.push(userMessage, { role: "assistant", content: text });
    state.imageSent = state.imageSent || content.length > 1;
    if (!$("status").textContent.includes("tokens")) setStatus("");
  } catch (err) {
    bubble.className = "msg error";
    bubble.textContent = `Error: ${err.message}`;
    setStatus("");
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
}

async function showModel() {
  try {
    const response = await fetch("/v1/models");
    const payload = await response.json();
    if (payload.data && payload.data.length) $("model-name").textContent = payload.data[0].id;
  } catch (err) {
    setStatus("Server not reachable.");
  }
}

$("image-input").addEventListener("change", (e) => e.target.files[0] && loadImage(e.target.files[0]));
$("form").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) send(e);
});
$("reset").addEventListener("click", reset);
$("image").addEventListener("load", drawBoxes);
window.addEventListener("resize", drawBoxes);
showModel();
