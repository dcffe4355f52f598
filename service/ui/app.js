// The live page: streams values into a session through the public API and draws what comes back.
// Plain canvas, no library, no network beyond this service.
"use strict";

const WINDOW = 200;  // timesteps shown
const COLORS = { value: "#222", mean: "#1f6fd1", band: "rgba(31,111,209,0.18)",
                 ahead: "#e67e22", aheadInner: "rgba(230,126,34,0.35)",
                 aheadOuter: "rgba(230,126,34,0.15)",
                 anomaly: "#d11f1f", forget: "#8e44ad", input: "#27ae60", output: "#e67e22" };
const $ = (id) => document.getElementById(id);

const state = {
  samples: [], values: [], cursor: 0, sessionId: null, t: 0, timer: null, features: [],
  drawn: 0,  // the feature the charts show
  // per timestep t: the values, the forecast made for them at t-1, their z-scores (one per
  // feature each), gate means per layer
  history: [],
  pendingForecast: null,  // forecast for the next value (made after the last one sent)
  ahead: null,  // the forecast of the steps after the last value sent (/v1/sessions/forecast)
  aheadAsked: false,  // one such request at a time: a fast stream skips the steps meanwhile
  generation: 0,  // bumped by start/stop/reset/new: a reply of an older run is ignored
};

// A service with API keys (LSTM_API_KEYS) needs one: typed into the page, kept for this tab only.
const KEY_STORE = "lstm-api-key";

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { authorization: `Bearer ${key}` } : {};
}

async function api(route, body) {
  const response = await fetch(route, {
    method: "POST", headers: { "content-type": "application/json", ...authHeaders() },
    body: JSON.stringify(body),
  });
  const reply = await response.json().catch(() => ({}));
  if (!response.ok) {
    const e = reply.error || {};
    throw new Error(`${response.status} ${e.code || "error"}: ${e.message || response.statusText}`);
  }
  return reply;
}

function showError(err) {
  $("error").textContent = err ? String(err.message || err) : "";
  $("error").hidden = !err;
}

function setStatus() {
  const where = state.sessionId ? `session ${state.sessionId}, t = ${state.t}` : "no session";
  $("status").textContent = `${where}; ${state.cursor} of ${state.values.length} values sent`;
  $("status").dataset.t = String(state.t);
}

function parseRows(text) {
  return text.split(/\r?\n/).map((l) => l.trim()).filter((l) => l.length > 0)
    .map((l) => l.split(/[,;\s]+/).map(Number));
}

function parseCsv(text) {
  const lines = text.split(/\r?\n/).filter((l) => l.trim().length > 0);
  const header = lines[0].split(",").map((h) => h.trim());
  const rows = lines.slice(1).map((l) => l.split(","));
  const numeric = header.map((_, i) => i).filter((i) => rows.length && rows.every(
    (r) => r[i] !== undefined && r[i].trim() !== "" && !Number.isNaN(Number(r[i]))));
  // The model's own column names first: a CSV exported with them needs no guessing.
  const named = state.features.map((f) => header.indexOf(f));
  const columns = named.every((i) => i >= 0) ? named : numeric.slice(0, state.features.length);
  if (columns.length < state.features.length) {
    throw new Error(`the CSV has ${numeric.length} numeric columns; the model takes `
      + `${state.features.length} (${state.features.join(", ")})`);
  }
  return rows.map((r) => columns.map((i) => Number(r[i])));
}

async function loadValues() {
  const source = $("source").value;
  if (source === "typed") return parseRows($("typed").value);
  if (source === "upload") {
    const file = $("upload").files[0];
    if (!file) throw new Error("choose a CSV file first");
    return parseCsv(await file.text());
  }
  return state.samples[Number(source)].values.map((v) => [v]);  // offered to 1-feature models
}

async function newSession() {
  stop();
  if (state.sessionId) await api("/v1/sessions/delete", { session_id: state.sessionId }).catch(() => {});
  const info = await api("/v1/sessions/create", {});
  Object.assign(state, { sessionId: info.session_id, t: info.t, cursor: 0, history: [],
                         pendingForecast: null, ahead: null });
  state.values = await loadValues();
  $("reset").disabled = false;
  setStatus();
  draw();
}

async function step(generation) {
  if (state.cursor >= state.values.length) { stop(); return; }
  const row = state.values[state.cursor];
  try {
    const reply = await api("/v1/sessions/step", {
      session_id: state.sessionId, inputs: [row], seq: state.t, return_gates: true });
    if (generation !== state.generation) return;  // paused, reset or restarted meanwhile
    const out = reply.outputs[0];
    const gates = reply.gates;
    state.history.push({
      value: row,
      forecast: state.pendingForecast,
      z: out.anomaly_z,
      gates: gates.forget.map((_, layer) => ({ forget: gates.forget[layer][0],
        input: gates.input[layer][0], output: gates.output[layer][0] })),
    });
    state.pendingForecast = { mean: out.mean, std: out.std };
    state.t = reply.t;
    state.cursor += 1;
    showError(null);
    forecastAhead();
  } catch (err) {
    if (generation !== state.generation) return;
    showError(err);
    stop();
  }
  setStatus();
  draw();
}

// The steps ahead of the last value: asked after a step, unless one is still on its way.
async function forecastAhead() {
  const horizon = Math.min(64, Math.max(0, Math.round(Number($("ahead").value) || 0)));
  if (horizon === 0) { state.ahead = null; return; }
  if (state.aheadAsked) return;
  state.aheadAsked = true;
  const asked = { sessionId: state.sessionId, t: state.t };
  try {
    const reply = await api("/v1/sessions/forecast", { session_id: asked.sessionId, horizon });
    // Drawn from the value it was made after (a fast stream may have sent a few more since),
    // never after a reset or a new session.
    if (state.sessionId === asked.sessionId && reply.t <= state.t && reply.t === asked.t) {
      state.ahead = { t: reply.t, steps: reply.forecast };
      draw();
    }
  } catch (err) {
    // An answer for a session reset or replaced meanwhile is no news (a 409 or a 404); one for
    // the value still last sent is (a horizon past LSTM_MAX_HORIZON: set fewer steps ahead).
    if (state.sessionId === asked.sessionId && state.t === asked.t) showError(err);
  } finally {
    state.aheadAsked = false;
  }
}

function start() {
  if (state.timer) return;
  const generation = ++state.generation;
  const run = async () => {
    if (generation !== state.generation) return;
    await step(generation);
    if (generation === state.generation && state.timer) {
      state.timer = setTimeout(run, 1000 / Number($("speed").value));
    }
  };
  state.timer = setTimeout(run, 0);
  $("pause").disabled = false;
  $("start").disabled = true;
}

function stop() {
  state.generation += 1;
  clearTimeout(state.timer);
  state.timer = null;
  $("pause").disabled = true;
  $("start").disabled = false;
}

// --- drawing -------------------------------------------------------------------------------

function axes(ctx, canvas, lo, hi) {
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.strokeStyle = "#eee";
  ctx.beginPath();
  for (let k = 0; k <= 4; k++) {
    const y = 10 + (canvas.height - 20) * k / 4;
    ctx.moveTo(40, y); ctx.lineTo(canvas.width, y);
  }
  ctx.stroke();
  ctx.fillStyle = "#888";
  ctx.font = "11px sans-serif";
  ctx.fillText(hi.toFixed(2), 2, 14);
  ctx.fillText(lo.toFixed(2), 2, canvas.height - 8);
  const x = (i) => 40 + (canvas.width - 45) * i / (WINDOW - 1);
  const y = (v) => 10 + (canvas.height - 20) * (1 - (v - lo) / ((hi - lo) || 1));
  return { x, y };
}

function line(ctx, points, color, width = 1.5) {
  ctx.strokeStyle = color;
  ctx.lineWidth = width;
  ctx.beginPath();
  let pen = false;
  for (const p of points) {
    if (p === null) { pen = false; continue; }
    if (pen) ctx.lineTo(p[0], p[1]); else ctx.moveTo(p[0], p[1]);
    pen = true;
  }
  ctx.stroke();
}

// One feature's view of the history: the charts draw the feature picked in #feature.
function featureView(history, f) {
  return history.map((h) => ({
    value: h.value[f],
    forecast: h.forecast ? { mean: h.forecast.mean[f], std: h.forecast.std[f] } : null,
    z: h.z ? h.z[f] : null,
    gates: h.gates,
  }));
}

function drawForecast(view, threshold, ahead, from) {
  const canvas = $("forecast-chart");
  const ctx = canvas.getContext("2d");
  const spans = view.flatMap((h) => h.forecast
    ? [h.value, h.forecast.mean - 2 * h.forecast.std, h.forecast.mean + 2 * h.forecast.std]
    : [h.value]);
  ahead.forEach((a) => spans.push(a.mean - 2 * a.std, a.mean + 2 * a.std, a.p10, a.p90));
  const lo = spans.length ? Math.min(...spans) : -1;
  const hi = spans.length ? Math.max(...spans) : 1;
  canvas.dataset.range = `${lo},${hi}`;  // the span drawn, readable by a test or a reader
  const { x, y } = axes(ctx, canvas, lo, hi);
  ctx.fillStyle = COLORS.band;
  view.forEach((h, i) => {
    if (!h.forecast) return;
    const top = y(h.forecast.mean + 2 * h.forecast.std);
    ctx.fillRect(x(i) - 2, top, 4, y(h.forecast.mean - 2 * h.forecast.std) - top);
  });
  line(ctx, view.map((h, i) => (h.forecast ? [x(i), y(h.forecast.mean)] : null)), COLORS.mean);
  line(ctx, view.map((h, i) => [x(i), y(h.value)]), COLORS.value, 1);
  // The steps ahead, right after the last value: ± 2 std, then the 10-90% quantiles, the mean.
  const at = (k) => x(from + k);  // step k + 1 ahead of the value at from - 1
  const area = (lo, hi, color) => {
    if (!ahead.length) return;
    ctx.fillStyle = color;
    ctx.beginPath();
    ahead.forEach((a, k) => (k ? ctx.lineTo(at(k), y(hi(a))) : ctx.moveTo(at(k), y(hi(a)))));
    for (let k = ahead.length - 1; k >= 0; k--) ctx.lineTo(at(k), y(lo(ahead[k])));
    ctx.closePath();
    ctx.fill();
  };
  area((a) => a.mean - 2 * a.std, (a) => a.mean + 2 * a.std, COLORS.aheadOuter);
  area((a) => a.p10, (a) => a.p90, COLORS.aheadInner);
  line(ctx, ahead.map((a, k) => [at(k), y(a.mean)]), COLORS.ahead, 2);
  canvas.dataset.ahead = String(ahead.length);  // the steps ahead drawn
  ctx.fillStyle = COLORS.anomaly;
  view.forEach((h, i) => {
    if (h.z !== null && Math.abs(h.z) > threshold) {
      ctx.beginPath(); ctx.arc(x(i), y(h.value), 4, 0, 2 * Math.PI); ctx.fill();
    }
  });
}

function drawAnomaly(view, threshold) {
  const canvas = $("anomaly-chart");
  const ctx = canvas.getContext("2d");
  const zs = view.map((h) => (h.z === null ? 0 : h.z));
  const bound = Math.max(threshold * 1.5, ...zs.map(Math.abs));
  const { x, y } = axes(ctx, canvas, -bound, bound);
  line(ctx, [[x(0), y(threshold)], [x(WINDOW - 1), y(threshold)]], "#f3b0b0", 1);
  line(ctx, [[x(0), y(-threshold)], [x(WINDOW - 1), y(-threshold)]], "#f3b0b0", 1);
  line(ctx, view.map((h, i) => (h.z === null ? null : [x(i), y(h.z)])), COLORS.anomaly, 1.2);
}

function drawGates(view) {
  const layers = view.length ? view[view.length - 1].gates.length : 0;
  const box = $("gates");
  while (box.querySelectorAll("canvas").length < layers) {
    const canvas = document.createElement("canvas");
    canvas.width = 960; canvas.height = 120;
    canvas.className = "gate-chart";
    const caption = document.createElement("div");
    caption.className = "legend";
    caption.innerHTML = `layer ${box.querySelectorAll("canvas").length + 1}: <b style="background:${COLORS.forget}"></b> forget
      <b style="background:${COLORS.input}"></b> input <b style="background:${COLORS.output}"></b> output`;
    box.append(caption, canvas);
  }
  box.querySelectorAll("canvas").forEach((canvas, layer) => {
    const ctx = canvas.getContext("2d");
    const { x, y } = axes(ctx, canvas, 0, 1);
    for (const gate of ["forget", "input", "output"]) {
      line(ctx, view.map((h, i) => [x(i), y(h.gates[layer][gate])]), COLORS[gate]);
    }
  });
}

// The steps ahead, for the feature drawn: what fits right of the history in the window.
function aheadView(f) {
  if (!state.ahead || state.ahead.t > state.t) return [];
  return state.ahead.steps.slice(0, WINDOW / 4).map((s) => (
    { mean: s.mean[f], std: s.std[f], p10: s.p10[f], p90: s.p90[f] }));
}

function draw() {
  const ahead = aheadView(state.drawn);
  const since = ahead.length ? state.t - state.ahead.t : 0;  // values sent after it was made
  const shown = WINDOW - Math.max(0, ahead.length - since);
  const view = featureView(state.history.slice(-shown), state.drawn);
  const threshold = Number($("threshold").value) || 3;
  drawForecast(view, threshold, ahead, view.length - since);
  drawAnomaly(view, threshold);
  drawGates(view);
}

// --- wiring --------------------------------------------------------------------------------

async function init() {
  const [card, samples] = await Promise.all([
    api("/v1/model", {}), fetch("samples.json").then((r) => r.json())]);
  $("model").textContent = `${card.name}:${card.version} on ${card.device}`;
  state.features = card.features;
  // The samples are held-out series of the data one model was trained on: fed to any other
  // model they stream without error and mean nothing.
  const fits = samples.model === card.name && samples.features.length === card.features.length;
  state.samples = fits ? samples.samples : [];
  if (!fits) {
    $("samples-note").textContent = `The ACSF1 sample series are offered only with `
      + `${samples.model}, the model they were held out from; this service serves `
      + `${card.name} (${card.features.length} feature${card.features.length > 1 ? "s" : ""}: `
      + `${card.features.join(", ")}): upload a CSV or type values.`;
    $("samples-note").hidden = false;
  }
  const select = $("source");
  state.samples.forEach((s, i) => select.add(new Option(`${s.id} (class ${s.class})`, String(i))));
  select.add(new Option("Upload a CSV…", "upload"));
  select.add(new Option("Type values…", "typed"));
  select.onchange = () => {
    $("upload-label").hidden = select.value !== "upload";
    $("typed-label").hidden = select.value !== "typed";
  };
  if (!fits) { select.value = "typed"; select.onchange(); }
  const feature = $("feature");
  card.features.forEach((name, i) => feature.add(new Option(name, String(i))));
  $("feature-label").hidden = card.features.length < 2;
  feature.onchange = () => { state.drawn = Number(feature.value); draw(); };
  $("speed").oninput = () => { $("speed-value").textContent = $("speed").value; };
  $("start").onclick = async () => {
    try {
      if (!state.sessionId) await newSession();
      else if (state.cursor === 0) state.values = await loadValues();
      start();
    } catch (err) { showError(err); }
  };
  $("pause").onclick = stop;
  $("reset").onclick = async () => {
    stop();
    try {
      const info = await api("/v1/sessions/reset", { session_id: state.sessionId });
      Object.assign(state, { t: info.t, cursor: 0, history: [], pendingForecast: null,
                             ahead: null });
      state.values = await loadValues();
      setStatus(); draw(); showError(null);
    } catch (err) { showError(err); }
  };
  $("new").onclick = () => newSession().catch(showError);
  setStatus();
  draw();
}

$("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
  showError(null);
  if (state.features.length === 0) init().catch(showError);  // the card was refused: try again
});
init().catch(showError);
