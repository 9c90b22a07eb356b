// The ftrun chat page: one column per served model (two with --compare-base: fine-tuned and
// base answer the same prompt), each with its own history, answers streamed over the
// server's OpenAI-compatible API.
"use strict";

const $ = (id) => document.getElementById(id);
const columns = [];      // {model: {id, label}, history: [{role, content}], list: element}
let controllers = [];    // AbortControllers of the answers being streamed

function addMessage(column, role, text) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  el.textContent = text;
  column.list.appendChild(el);
  column.list.scrollTop = column.list.scrollHeight;
  return el;
}

function addNote(el, text) {
  const note = document.createElement("span");
  note.className = "note";
  note.textContent = text;
  el.appendChild(note);
}

function settings() {
  return {
    system: $("system").value.trim(),
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Math.max(1, Math.floor(Number($("max-tokens").value) || 1)),
  };
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// Stream one answer into `el`; returns the text received (also when stopped or failed).
async function streamAnswer(column, el, options, signal) {
  const messages = [];
  if (options.system) messages.push({ role: "system", content: options.system });
  messages.push(...column.history);
  const body = {
    model: column.model.id, messages, stream: true,
    temperature: options.temperature, top_p: options.top_p, max_tokens: options.max_tokens,
  };
  let text = "";
  el.dataset.state = "streaming";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => null);
      throw new Error(error && error.error ? error.error.message : "HTTP " + response.status);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) {
            text += choice.delta.content;
            el.textContent = text;
            column.list.scrollTop = column.list.scrollHeight;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    el.dataset.state = "done";
    if (finish === "length") addNote(el, "(cut at max tokens)");
  } catch (e) {
    if (e.name === "AbortError") {
      el.dataset.state = "done";
      addNote(el, "(stopped)");
    } else {
      el.dataset.state = "error";
      el.className = "msg error";
      el.textContent = "Error: " + e.message;
      return null;
    }
  }
  return text;
}

async function send(event) {
  if (event) event.preventDefault();
  const input = $("input");
  const prompt = input.value.trim();
  if (!prompt || controllers.length) return;
  input.value = "";
  const options = settings();
  $("send").disabled = true;
  $("stop").disabled = false;
  controllers = columns.map(() => new AbortController());
  await Promise.all(columns.map(async (column, i) => {
    column.history.push({ role: "user", content: prompt });
    addMessage(column, "user", prompt);
    const el = addMessage(column, "assistant", "");
    const answer = await streamAnswer(column, el, options, controllers[i].signal);
    if (answer === null) {
      column.history.pop(); // the failed turn is not part of the conversation
    } else {
      column.history.push({ role: "assistant", content: answer });
    }
  }));
  controllers = [];
  $("send").disabled = false;
  $("stop").disabled = true;
  input.focus();
}

function clearHistory() {
  for (const c of controllers) c.abort();
  for (const column of columns) {
    column.history = [];
    column.list.textContent = "";
  }
}

function buildColumns(models) {
  const box = $("columns");
  for (const model of models) {
    const section = document.createElement("section");
    section.className = "column";
    section.dataset.model = model.id;
    const title = document.createElement("h2");
    title.textContent = model.label + " — " + model.id;
    const list = document.createElement("div");
    list.className = "messages";
    section.append(title, list);
    box.appendChild(section);
    columns.push({ model, history: [], list });
  }
}

async function init() {
  for (const id of ["temperature", "top-p"]) {
    const out = $(id + "-value");
    const update = () => { out.textContent = $(id).value; };
    $(id).addEventListener("input", update);
    update();
  }
  $("composer").addEventListener("submit", send);
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
  });
  $("stop").addEventListener("click", () => controllers.forEach((c) => c.abort()));
  $("clear").addEventListener("click", clearHistory);
  const saved = sessionStorage.getItem("ftrun-api-key");
  if (saved) $("api-key").value = saved;
  $("api-key").addEventListener("change", () => sessionStorage.setItem("ftrun-api-key", $("api-key").value));

  const config = await (await fetch("/ui/config")).json();
  $("api-key-box").hidden = !config.auth_required;
  const models = config.compare ? config.models.slice(0, 2) : config.models.slice(0, 1);
  $("mode").textContent = config.compare
    ? "compare: the same prompt to the fine-tuned and the base model"
    : models[0].id;
  buildColumns(models);
  document.body.dataset.ready = "true";
}

init().catch((e) => {
  document.body.dataset.ready = "error";
  $("columns").textContent = "Could not load the server's settings: " + e.message;
});
