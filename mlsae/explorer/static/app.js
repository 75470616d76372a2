"use strict";

// The explorer page: plain DOM, no build step. Every view reads `state` and the API
// answers for the current prompt; the server caches per prompt, so re-fetching is cheap.

const state = {
  params: null,
  opening: null, // the server's opening prompt (/api/opening-prompt)
  requested: null, // the prompt last sent for analysis
  prompt: "", // the prompt analysed and shown
  tokens: [],
  activations: null,
  layer: 0,
  pos: 0,
  latent: null,
  trace: null, // the selected latent's activations on the prompt
  factor: 10,
  generation: 0,
};

const $ = (id) => document.getElementById(id);

function el(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of [].concat(children)) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

async function api(path, body) {
  const init =
    body === undefined
      ? {}
      : {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify(body),
        };
  const response = await fetch(path, init);
  let data;
  try {
    data = await response.json();
  } catch {
    data = { detail: response.statusText };
  }
  if (!response.ok) throw new Error(describeError(data.detail));
  return data;
}

function describeError(detail) {
  if (Array.isArray(detail)) {
    return detail.map((item) => `${(item.loc || []).slice(1).join(".")}: ${item.msg}`).join("; ");
  }
  return String(detail);
}

function showError(error) {
  const box = $("error");
  box.hidden = !error;
  box.textContent = error ? error.message || String(error) : "";
}

// Formatting --------------------------------------------------------------------------

function tokenText(token) {
  return token.replace(/\n/g, "↵").replace(/\t/g, "⇥") || "∅";
}

function fixed(value, digits = 2) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function signed(value, digits = 2) {
  const text = Number(value).toFixed(digits);
  if (Number(text) === 0) return (0).toFixed(digits);
  return (value > 0 ? "+" : "") + text;
}

// White to deep blue, for activations in [0, 1] of the scale's maximum.
function heatColour(fraction) {
  const t = Math.max(0, Math.min(1, fraction));
  const from = [247, 251, 255];
  const to = [8, 69, 148];
  const rgb = from.map((start, i) => Math.round(start + (to[i] - start) * t));
  return `rgb(${rgb.join(",")})`;
}

function textColour(fraction) {
  return fraction > 0.5 ? "white" : "#1f2933";
}

// Orange for the activations of one latent in its examples.
function exampleColour(fraction) {
  const t = Math.max(0, Math.min(1, fraction));
  return `rgba(249, 115, 22, ${(0.85 * t).toFixed(3)})`;
}

// Loading -----------------------------------------------------------------------------

async function loadParams() {
  const params = await api("/api/params");
  state.params = params;
  const source = params.repo_id || params.model_name;
  $("model-summary").textContent =
    `${source} · ${params.n_layers} layers × ${params.n_latents.toLocaleString()} latents · ` +
    `k = ${params.k} · up to ${params.max_prompt_tokens} tokens` +
    (params.examples_available ? "" : " · no examples database");
  const select = $("steer-layer");
  select.replaceChildren(
    ...params.blocks.map((block, layer) =>
      el("option", { value: layer, text: `L${layer}` + (block !== layer ? ` (block ${block})` : "") }),
    ),
  );
}

// Analyse a prompt and show it; with `record`, the address becomes #prompt=<the prompt>
// (a new history entry). Resolves to whether this prompt is the one shown.
async function analyse(prompt, { record = true } = {}) {
  const generation = ++state.generation;
  state.requested = prompt;
  const button = $("analyse");
  button.disabled = true;
  showError(null);
  try {
    const activations = await api("/api/activations", { prompt });
    if (generation !== state.generation) return false;
    state.prompt = prompt;
    state.activations = activations;
    state.tokens = activations.tokens;
    const best = argmaxCell(activations.max);
    state.layer = best.layer;
    state.pos = best.pos;
    state.latent = null;
    state.trace = null;
    if (record) recordPrompt(prompt);
    renderPromptSource();
    $("results").hidden = false;
    renderTokens();
    renderHeatmap();
    renderCell();
    renderLatent();
    renderLogits();
    renderHistograms();
    renderMetrics();
    return true;
  } catch (error) {
    if (generation === state.generation) showError(error);
    return false;
  } finally {
    if (generation === state.generation) button.disabled = false;
  }
}

function argmaxCell(max) {
  let best = { layer: 0, pos: max[0].length - 1, value: -1 };
  max.forEach((row, layer) =>
    row.forEach((value, pos) => {
      if (value > best.value) best = { layer, pos, value };
    }),
  );
  return best;
}

function select({ layer = state.layer, pos = state.pos }) {
  state.layer = layer;
  state.pos = pos;
  renderTokens();
  renderHeatmap();
  renderCell();
  renderHistogramSelection();
  if (state.trace) renderLatentTokens(state.trace);
  renderLogits();
}

// Tokens and heatmap ------------------------------------------------------------------

function renderTokens() {
  $("tokens").replaceChildren(
    ...state.tokens.map((token) =>
      el("span", {
        class: "tok" + (token.special ? " special" : "") + (token.pos === state.pos ? " selected" : ""),
        text: tokenText(token.token),
        title: `position ${token.pos} · id ${token.id}` + (token.special ? " · special" : ""),
        onclick: () => select({ pos: token.pos }),
      }),
    ),
  );
}

function heatmapTable(table, values, options) {
  const top = Math.max(1e-9, ...values.flat());
  const head = el("tr", {}, [
    el("th"),
    ...state.tokens.map((token) =>
      el("th", {
        class: token.pos === state.pos ? "selected" : "",
        text: tokenText(token.token),
        title: `position ${token.pos}`,
      }),
    ),
  ]);
  const rows = values.map((row, layer) =>
    el("tr", {}, [
      el("th", { text: `L${layer}` }),
      ...row.map((value, pos) => {
        const fraction = value / top;
        const selected = options.isSelected(layer, pos);
        return el("td", {
          class: "cell" + (selected ? " selected" : ""),
          "data-layer": layer,
          "data-pos": pos,
          "data-value": value.toFixed(4),
          title: `layer ${layer} · "${state.tokens[pos].token}" (position ${pos}) · ${value.toFixed(3)}`,
          style: `background:${heatColour(fraction)};color:${textColour(fraction)}`,
          text: value > 0 ? value.toFixed(1) : "",
          onclick: () => options.onClick(layer, pos),
        });
      }),
    ]),
  );
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, rows));
  return top;
}

function renderHeatmap() {
  const top = heatmapTable($("heatmap"), state.activations.max, {
    isSelected: (layer, pos) => layer === state.layer && pos === state.pos,
    onClick: (layer, pos) => select({ layer, pos }),
  });
  $("heatmap-legend").replaceChildren(
    "0",
    el("span", {
      class: "bar",
      style: `background:linear-gradient(to right, ${heatColour(0)}, ${heatColour(0.25)}, ${heatColour(1)})`,
    }),
    top.toFixed(2),
    el("span", { text: " · the largest latent activation at each layer and position" }),
  );
}

function renderCell() {
  const token = state.tokens[state.pos];
  $("cell-title").replaceChildren(
    `Latents at layer ${state.layer}, `,
    el("span", { class: "tok", text: `"${tokenText(token.token)}"` }),
    ` (position ${state.pos})`,
  );
  const latents = state.activations.top[state.layer][state.pos];
  const list = $("cell-latents");
  if (!latents.length) {
    list.replaceChildren(el("p", { class: "muted", text: "No latent fires here." }));
    return;
  }
  list.replaceChildren(
    ...latents.map(({ latent, act }) =>
      el(
        "button",
        {
          type: "button",
          class: "latent-chip" + (latent === state.latent ? " selected" : ""),
          "data-latent": latent,
          onclick: () => selectLatent(latent),
        },
        [el("span", { text: `#${latent}` }), el("span", { class: "act", text: act.toFixed(2) })],
      ),
    ),
  );
}

// Histograms and metrics --------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svgElement(tag, attributes = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

const compactNumber = new Intl.NumberFormat("en", { notation: "compact", maximumFractionDigits: 1 });

// Counts 0, step, 2 step, ... up to the first at or above `top`: a step of 1, 2 or 5 times a
// power of ten, so that the axis has at most four intervals.
function countTicks(top) {
  const rough = Math.max(1, top / 4);
  const power = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 5, 10].map((multiple) => multiple * power).find((value) => value >= rough);
  const ticks = [0];
  while (ticks[ticks.length - 1] < top) ticks.push(ticks[ticks.length - 1] + step);
  return ticks;
}

// One layer's histogram: bars over the bins, a count axis on the left, the activation
// range below. Every layer shares `ticks`, so that heights compare across layers.
function histogramSvg(counts, edges, ticks) {
  const [left, top, width, height] = [30, 6, 210, 64];
  const axisTop = ticks[ticks.length - 1];
  const y = (count) => top + height - (count / axisTop) * height;
  const svg = svgElement("svg", {
    viewBox: `0 0 ${left + width + 2} ${top + height + 14}`,
    width: "100%",
    class: "histogram",
  });
  for (const tick of ticks) {
    svg.append(
      svgElement("line", {
        x1: left,
        x2: left + width,
        y1: y(tick),
        y2: y(tick),
        class: "grid",
        "data-count": tick,
      }),
      svgElement(
        "text",
        { x: left - 4, y: y(tick) + 3, "text-anchor": "end", class: "tick", "data-count": tick },
        compactNumber.format(tick),
      ),
    );
  }
  const barWidth = width / counts.length;
  counts.forEach((count, bin) => {
    const rect = svgElement("rect", {
      x: left + bin * barWidth + 0.5,
      y: y(count),
      width: Math.max(barWidth - 1, 1),
      height: y(0) - y(count),
      class: "bar",
      "data-count": count,
    });
    rect.append(svgElement("title", {}, `${edges[bin].toFixed(2)}–${edges[bin + 1].toFixed(2)}: ${count}`));
    svg.append(rect);
  });
  svg.append(svgElement("line", { x1: left, x2: left, y1: top, y2: y(0), class: "axis" }));
  for (const [x, label, anchor] of [
    [left, "0", "start"],
    [left + width, edges[edges.length - 1].toFixed(1), "end"],
  ]) {
    svg.append(svgElement("text", { x, y: y(0) + 12, "text-anchor": anchor, class: "tick" }, label));
  }
  return svg;
}

async function renderHistograms() {
  const generation = state.generation;
  const box = $("histograms");
  box.classList.add("loading");
  try {
    const histograms = await api("/api/histograms", { prompt: state.prompt, bins: 32 });
    if (generation !== state.generation) return;
    const ticks = countTicks(Math.max(1, ...histograms.counts.flat()));
    box.replaceChildren(
      ...histograms.counts.map((counts, layer) => {
        const total = counts.reduce((sum, count) => sum + count, 0);
        return el("figure", { class: layer === state.layer ? "selected" : "", "data-layer": layer }, [
          el("figcaption", { text: `Layer ${layer} · ${total} activations` }),
          histogramSvg(counts, histograms.edges, ticks),
        ]);
      }),
    );
  } catch (error) {
    box.replaceChildren(el("p", { class: "error", text: error.message }));
  } finally {
    box.classList.remove("loading");
  }
}

function renderHistogramSelection() {
  for (const figure of $("histograms").querySelectorAll("figure")) {
    figure.classList.toggle("selected", Number(figure.dataset.layer) === state.layer);
  }
}

async function renderMetrics() {
  const generation = state.generation;
  const table = $("metrics");
  table.classList.add("loading");
  try {
    const metrics = await api("/api/metrics", { prompt: state.prompt });
    if (generation !== state.generation) return;
    const header = el(
      "tr",
      {},
      ["Layer", "FVU", "L0", "CE loss", "Δ loss", "KL"].map((name) => el("th", { text: name })),
    );
    const rows = metrics.layers.map((row) =>
      el("tr", {}, [
        el("td", { text: `L${row.layer}` }),
        el("td", { text: fixed(row.fvu, 3) }),
        el("td", { text: fixed(row.l0, 1) }),
        el("td", { text: fixed(row.loss, 3) }),
        el("td", { text: row.loss_delta === null ? "–" : signed(row.loss_delta, 3) }),
        el("td", { text: fixed(row.kl_div, 3) }),
      ]),
    );
    table.replaceChildren(el("thead", {}, header), el("tbody", {}, rows));
    $("metrics-note").textContent =
      `Over ${metrics.n_tokens} tokens. The model's own CE loss is ${fixed(metrics.loss, 3)} nats; ` +
      "Δ loss and KL are with the layer's reconstruction spliced in.";
  } catch (error) {
    table.replaceChildren(el("caption", { class: "error", text: error.message }));
  } finally {
    table.classList.remove("loading");
  }
}

// One latent ----------------------------------------------------------------------------

// Open a latent's panel; with `focus`, then select the position where it fires most at
// the selected layer.
function selectLatent(latent, { focus = false } = {}) {
  state.latent = latent;
  state.trace = null;
  $("steer-layer").value = String(state.layer);
  renderCell();
  renderLatent({ focus });
  renderLogits();
}

async function renderLatent({ focus = false } = {}) {
  const latent = state.latent;
  $("latent-empty").hidden = latent !== null;
  $("latent-body").hidden = latent === null;
  $("latent-title").textContent = latent === null ? "Latent" : `Latent #${latent}`;
  if (latent === null) return;
  const generation = state.generation;
  const [trace, examples] = await Promise.all([
    api("/api/latent", { prompt: state.prompt, latent }),
    api("/api/examples", { latent, limit: 12 }),
  ]).catch((error) => {
    $("latent-summary").textContent = error.message;
    return [null, null];
  });
  if (!trace || generation !== state.generation || latent !== state.latent) return;
  state.trace = trace;
  $("latent-summary").textContent =
    trace.layer_mean === null
      ? "Does not fire on this prompt."
      : `On this prompt: max ${trace.max.toFixed(2)}, mean layer ${trace.layer_mean.toFixed(2)}.`;
  renderLatentTokens(trace);
  renderExamples(examples);
  const row = trace.acts[state.layer];
  if (focus && Math.max(...row) > 0) select({ pos: row.indexOf(Math.max(...row)) });
}

// The prompt's tokens, wrapped to the panel's width: each token over one small cell per
// layer, shaded by the latent's activation there; the token itself is shaded by the
// largest of them.
function renderLatentTokens(trace) {
  const top = Math.max(1e-9, ...trace.acts.flat());
  const columns = state.tokens.map((token) => {
    const pos = token.pos;
    const values = trace.acts.map((row) => row[pos]);
    const peak = Math.max(...values);
    const cells = values.map((value, layer) =>
      el("span", {
        class: "layer-cell" + (layer === state.layer && pos === state.pos ? " selected" : ""),
        "data-layer": layer,
        "data-value": value.toFixed(4),
        style: `background:${heatColour(value / top)}`,
        onclick: (event) => {
          event.stopPropagation();
          select({ layer, pos });
        },
      }),
    );
    return el(
      "span",
      {
        class: "token-column" + (pos === state.pos ? " selected" : ""),
        "data-pos": pos,
        title:
          `"${token.token}" (position ${pos})\n` +
          values.map((value, layer) => `layer ${layer}: ${value.toFixed(3)}`).join("\n"),
        onclick: () => select({ pos }),
      },
      [el("span", { class: "tok", text: tokenText(token.token), style: `background:${exampleColour(peak / top)}` }), ...cells],
    );
  });
  $("latent-tokens").replaceChildren(...columns);
  $("latent-tokens-legend").textContent =
    `Under each token, one cell per layer (0 to ${trace.acts.length - 1}, top to bottom), ` +
    `darker where the latent fires more (up to ${top.toFixed(2)}); click one to select it.`;
}

function renderExamples(response) {
  const box = $("examples");
  if (!response.available) {
    box.replaceChildren(
      el("p", {
        class: "muted",
        text:
          "No examples database: run `python -m mlsae.analysis.examples --repo_id …` " +
          "and restart the server.",
      }),
    );
    return;
  }
  box.replaceChildren(
    ...response.layers.map(({ layer, examples }) => {
      const best = examples.length ? examples[0].act : 0;
      const summary = el("summary", {}, [
        `Layer ${layer} `,
        el("span", {
          class: "muted",
          text: examples.length ? `· ${examples.length} shown · max ${best.toFixed(2)}` : "· none",
        }),
      ]);
      const items = examples.map((example) => renderExample(example));
      return el("details", { open: layer === state.layer || undefined, "data-layer": layer }, [
        summary,
        ...items,
      ]);
    }),
  );
}

function renderExample(example) {
  const top = Math.max(1e-9, ...example.acts);
  const peak = example.acts.indexOf(Math.max(...example.acts));
  const context = el(
    "div",
    { class: "context tok" },
    example.tokens.map((token, index) =>
      el("span", {
        class: index === peak ? "peak" : "",
        text: tokenText(token),
        title: example.acts[index].toFixed(3),
        style: `background:${exampleColour(example.acts[index] / top)}`,
      }),
    ),
  );
  return el("div", { class: "example" }, [context, el("span", { class: "act", text: example.act.toFixed(2) })]);
}

// Logits ----------------------------------------------------------------------------------

function logitTable(rows, { changes = false, limit = 8 } = {}) {
  const top = Math.max(1e-9, ...rows.map((row) => row.prob || 0));
  return el(
    "table",
    { class: "logit-table" },
    rows.slice(0, limit).map((row) =>
      el("tr", {}, [
        el("td", {}, el("span", { class: "tok", text: tokenText(row.token) })),
        changes
          ? el("td", { class: "num " + (row.logit > 0 ? "up" : "down"), text: signed(row.logit) })
          : el("td", { class: "num" }, [
              el("span", { class: "prob-bar", style: `width:${Math.round((40 * row.prob) / top)}px` }),
              ` ${(100 * row.prob).toFixed(1)}%`,
            ]),
      ]),
    ),
  );
}

function interventionPanel(title, changes, pos) {
  return [
    el("h3", { text: title }),
    logitTable(changes.top[pos]),
    el("p", { class: "muted small", text: `KL from the model's own: ${changes.kl_div[pos].toFixed(3)}` }),
    el("div", { class: "muted small", text: "Largest rises" }),
    logitTable(changes.increased[pos], { changes: true, limit: 5 }),
    el("div", { class: "muted small", text: "Largest falls" }),
    logitTable(changes.decreased[pos], { changes: true, limit: 5 }),
  ];
}

async function renderLogits() {
  const { prompt, layer, pos, latent, generation } = state;
  const token = state.tokens[pos];
  $("logits-title").replaceChildren(
    "Next-token predictions after ",
    el("span", { class: "tok", text: `"${tokenText(token.token)}"` }),
    ` (position ${pos})`,
  );
  const grid = $("logits");
  grid.classList.add("loading");
  const factor = Number($("steer-factor").value) || 0;
  const steerLayer = Number($("steer-layer").value || layer);
  try {
    const requests = [
      api("/api/logits", { prompt, top_n: 10 }),
      api("/api/logits/reconstruction", { prompt, layer, top_n: 10 }),
    ];
    if (latent !== null) {
      requests.push(api("/api/logits/steering", { prompt, latent, layer: steerLayer, factor, top_n: 10 }));
    }
    const [input, recon, steer] = await Promise.all(requests);
    if (generation !== state.generation || pos !== state.pos || layer !== state.layer) return;
    const columns = [
      el("div", { "data-panel": "model" }, [el("h3", { text: "Model" }), logitTable(input.top[pos])]),
      el("div", { "data-panel": "reconstruction" }, interventionPanel(`Layer ${layer} reconstructed`, recon, pos)),
    ];
    if (steer) {
      columns.push(
        el(
          "div",
          { "data-panel": "steering" },
          interventionPanel(`Latent #${latent} × ${factor} at layer ${steerLayer}`, steer, pos),
        ),
      );
    }
    grid.replaceChildren(...columns);
  } catch (error) {
    grid.replaceChildren(el("p", { class: "error", text: error.message }));
  } finally {
    grid.classList.remove("loading");
  }
}

// The address and the opening prompt ------------------------------------------------------

// The prompt that the address names (#prompt=<percent-encoded text>), or null.
function promptFromAddress() {
  const match = location.hash.match(/^#prompt=([^]*)$/);
  if (!match || !match[1]) return null;
  try {
    return decodeURIComponent(match[1]);
  } catch {
    throw new Error("the address's #prompt= is not percent-encoded text (see encodeURIComponent)");
  }
}

function recordPrompt(prompt) {
  const hash = "#prompt=" + encodeURIComponent(prompt);
  if (location.hash !== hash) history.pushState(null, "", hash);
}

// Analyse the prompt the address names, or the opening prompt when it names none.
async function openFromAddress() {
  let prompt;
  try {
    prompt = promptFromAddress();
  } catch (error) {
    showError(error);
    return;
  }
  if (prompt === null) {
    openOpening();
  } else if (prompt !== state.requested) {
    $("prompt").value = prompt;
    analyse(prompt, { record: false });
  }
}

// The opening prompt; for the context of a top example, with that example's latent open at
// its layer.
async function openOpening() {
  const opening = state.opening;
  if (opening.prompt === state.requested) return;
  $("prompt").value = opening.prompt;
  const shown = await analyse(opening.prompt, { record: false });
  if (!shown || opening.latent === null) return;
  select({ layer: opening.layer });
  selectLatent(opening.latent, { focus: true });
}

function renderPromptSource() {
  const opening = state.opening;
  const box = $("prompt-source");
  box.hidden = !opening || state.prompt !== opening.prompt;
  if (box.hidden) return;
  box.textContent = {
    option: "The server's opening prompt (--prompt).",
    example:
      `The context of the top example of latent #${opening.latent} at layer ${opening.layer}, ` +
      "from the examples database; the latent is open on the right.",
    fallback:
      "A fixed sentence: start the server with --prompt, or with an examples database, " +
      "to open on text the model knows.",
  }[opening.source];
}

// Start -----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", async () => {
  $("prompt-form").addEventListener("submit", (event) => {
    event.preventDefault();
    analyse($("prompt").value);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      analyse($("prompt").value);
    }
  });
  $("steer-form").addEventListener("submit", (event) => {
    event.preventDefault();
    renderLogits();
  });
  try {
    [, state.opening] = await Promise.all([loadParams(), api("/api/opening-prompt")]);
  } catch (error) {
    showError(error);
    return;
  }
  // Back, forward, and an address edited by hand (which fires both events).
  window.addEventListener("popstate", openFromAddress);
  window.addEventListener("hashchange", openFromAddress);
  openFromAddress();
});
