"use strict";
// The MTOR console: one WebSocket to /ws (SPEC.md §2), reconnecting with
// back-off 1 s doubling to 30 s and an outbox while disconnected. Everything
// from the network goes into the page with textContent (or as image/audio
// data URLs), never as HTML.
(function () {
  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const OUTBOX_MAX = 50;
  const BACKOFF_MIN_MS = 1000, BACKOFF_MAX_MS = 30000;
  const TYPES_WITH_IMAGE = ["vision"], TYPES_WITH_AUDIO = ["whisper", "speech"];

  const S = {
    ws: null, connected: false, outbox: [], backoffMs: BACKOFF_MIN_MS, retries: 0,
    info: null, workers: [], models: {}, quote: null, queue: null, limits: null,
    image: null, audio: null, speak: false, pending: new Map(), nextId: 1,
    voice: window.MTORVoice.initial(), recognition: null, silenceTimer: null, recorder: null, greeted: false,
    listener: null, phrases: new Set(), recognitionBroken: false,
    voiceless: false, muteUntil: 0, sayings: new Map(), spokenLines: new Map(), talking: 0, talkEndedAt: 0, lineQueue: Promise.resolve(),
  };
  // Synthesis errors that mean the browser has no voice to speak with (Chromium on Linux without
  // speech-dispatcher): the node's text-to-speech speaks instead.
  const SYNTHESIS_BROKEN = ["synthesis-failed", "synthesis-unavailable", "voice-unavailable", "language-unavailable"];
  // Recognition errors that mean the browser's own speech recognition cannot work here (Chromium
  // without Google's service, no capture device it can use): the node's Whisper listens instead.
  const RECOGNITION_BROKEN = ["network", "audio-capture", "service-not-allowed", "language-not-supported"];

  // -- connection ----------------------------------------------------------------------
  function url() { return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws"; }

  function setStatus(text, cls) { const s = $("connection"); s.textContent = text; s.className = "status " + (cls || ""); }

  function connect() {
    setStatus("connecting…");
    let ws;
    try { ws = new WebSocket(url()); } catch (err) { scheduleReconnect(); return; }
    S.ws = ws;
    ws.onopen = () => {
      S.connected = true; S.backoffMs = BACKOFF_MIN_MS;
      setStatus("connected", "ok");
      const queued = S.outbox.splice(0);
      queued.forEach((m) => ws.send(JSON.stringify(m)));
      requestQuote();
    };
    ws.onmessage = (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch (err) { return; }
      const fn = HANDLERS[msg.type];
      if (fn) fn(msg);
    };
    ws.onclose = () => {
      if (S.ws !== ws) return;
      S.connected = false; S.ws = null;
      scheduleReconnect();
    };
  }

  function scheduleReconnect() {
    const wait = S.backoffMs;
    S.retries += 1;
    setStatus("reconnecting in " + Math.round(wait / 1000) + " s", "bad");
    S.backoffMs = Math.min(S.backoffMs * 2, BACKOFF_MAX_MS);
    setTimeout(connect, wait);
  }

  function send(msg) {
    if (S.connected && S.ws && S.ws.readyState === WebSocket.OPEN) { S.ws.send(JSON.stringify(msg)); return; }
    if (msg.type === "pong" || msg.type === "get_quote") return;
    S.outbox.push(msg);
    if (S.outbox.length > OUTBOX_MAX) S.outbox.shift();
  }

  function toast(text) {
    const t = $("toast");
    t.textContent = text; t.classList.remove("hidden");
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => t.classList.add("hidden"), 5000);
  }

  // -- rendering -----------------------------------------------------------------------
  function tokens(x) { return (Math.round(Number(x) * 1000) / 1000).toString(); }
  function unit(shown) { return shown === "1" ? "token" : "tokens"; }
  function amount(x) { const shown = tokens(x); return shown + " " + unit(shown); }

  function showBalance(balance, available, address) {
    const shown = tokens(available !== undefined ? available : balance);
    $("balance").textContent = shown;
    $("balance-unit").textContent = unit(shown);
    if (address) $("wallet-address").textContent = address;
  }

  function renderHistory(queries) {
    const list = $("history"); list.replaceChildren();
    (queries || []).slice().reverse().forEach((q) => {
      const when = new Date(q.time * 1000).toLocaleString();
      list.appendChild(el("li", "", q.type + " · " + q.prompt + " · " + when + " · " + amount((q.cost_units || 0) / 1e6) +
        (q.status !== "done" ? " · " + q.status : "")));
    });
  }

  function renderWorkers(workers) {
    const body = $("workers").querySelector("tbody"); body.replaceChildren();
    workers.forEach((w) => {
      const tr = el("tr");
      tr.appendChild(el("td", "", (w.is_self ? "this node " : "") + "…" + w.peer_id.slice(-8)));
      tr.appendChild(el("td", "", w.types.join(", ") || "—"));
      const healthy = !w.blacklisted && (w.health || 0) >= 50;
      tr.appendChild(el("td", healthy ? "health-ok" : "health-bad", (w.blacklisted ? "blacklisted " : "") + (w.health ?? "?")));
      tr.appendChild(el("td", "", (w.device && w.device.kind) || "?"));
      tr.appendChild(el("td", "", Object.entries(w.prices || {}).map(([t, p]) => t + " " + p).join(", ")));
      body.appendChild(tr);
    });
  }

  function refreshPickers() {
    const type = $("query-type").value;
    for (const opt of $("query-type").options) {
      const base = opt.value === "speech" ? ["whisper", "chat"] : [opt.value];
      const served = base.every((t) => (S.models[t] || []).length);
      opt.textContent = opt.value + (served ? "" : " (no worker)");
    }
    const models = S.models[type === "speech" ? "chat" : type] || [];
    const pick = $("model-name"); const was = pick.value;
    pick.replaceChildren(el("option", "", "any"));
    pick.options[0].value = "";
    models.forEach((m) => { const o = el("option", "", m); o.value = m; pick.appendChild(o); });
    if (models.includes(was)) pick.value = was;
    $("vision-tools").classList.toggle("hidden", !TYPES_WITH_IMAGE.includes(type));
    $("audio-tools").classList.toggle("hidden", !TYPES_WITH_AUDIO.includes(type));
  }

  function renderQueue(q) {
    S.queue = q;
    const pct = q.max_size ? Math.min(100, Math.round((100 * q.depth) / q.max_size)) : 0;
    const bar = $("queue-bar"); bar.style.width = pct + "%"; bar.classList.toggle("high", !!q.high_load);
    let text = q.depth ? q.depth + " waiting" : "queue empty";
    if (q.estimated_wait_s) text += " · about " + Math.round(q.estimated_wait_s) + " s wait";
    if (q.high_load) text += " · high load";
    $("queue-text").textContent = text;
    updateSubmit();
  }

  function updateSubmit() {
    const btn = $("submit");
    const high = S.queue && S.queue.high_load;
    btn.disabled = !!high;
    btn.title = high ? "The realm is under high load; please wait" : "Ctrl+Enter";
  }

  function resultCard(id, type, label) {
    const li = el("li", "result pending");
    li.dataset.id = id;
    li.appendChild(el("div", "meta", type + " · " + label));
    li.appendChild(el("div", "text", "working…"));
    $("result-list").prepend(li);
    S.pending.set(String(id), li);
    return li;
  }

  function cardFor(msg, type) {
    const id = String(msg.request_id ?? msg.image_id ?? "");
    let li = S.pending.get(id);
    if (li) S.pending.delete(id);
    else { li = el("li", "result"); $("result-list").prepend(li); li.appendChild(el("div", "meta", type)); li.appendChild(el("div")); }
    li.classList.remove("pending", "streaming");
    return li;
  }

  function fillResult(li, msg) {
    const body = el("div", "body");
    if (msg.result_type === "image") {
      const img = el("img"); img.alt = "generated image"; img.src = "data:image/png;base64," + msg.result; body.appendChild(img);
    } else if (msg.result_type === "audio") {
      const a = el("audio"); a.controls = true; a.src = "data:audio/wav;base64," + (msg.result ?? msg.audio); body.appendChild(a);
      if (S.speak) a.play().catch(() => {});
    } else {
      body.appendChild(window.MTORHighlight.render(msg.result ?? msg.text ?? ""));
    }
    if (msg.transcript) body.prepend(el("div", "meta", "heard: " + msg.transcript));
    if (msg.result_type === "audio" && msg.reply_text) body.appendChild(window.MTORHighlight.render(msg.reply_text));
    li.replaceChild(body, li.lastChild);
    li.classList.add("done");
    const meta = li.firstChild;
    if (msg.cost !== undefined) meta.textContent += " · cost " + amount(msg.cost);
    if (msg.processing_time !== undefined) meta.textContent += " · " + msg.processing_time + " s";
    if (msg.model) meta.textContent += " · " + msg.model;
  }

  // -- messages from the node ------------------------------------------------------------
  const HANDLERS = {
    set_cookie(m) {
      document.cookie = m.name + "=" + encodeURIComponent(m.value) + "; path=/; max-age=" + m.max_age + "; samesite=strict";
      try { localStorage.setItem("mtor_guid", m.value); } catch (err) { /* private mode */ }
    },
    user_info(m) {
      S.info = m; S.limits = m.limits;
      if (!S.greeted || m.reason === "connect") {
        $("welcome").textContent = m.welcome;
        if (!S.greeted && S.speak) say(m.welcome);
        S.greeted = true;
      }
      $("realm-name").textContent = m.realm || "";
      if (document.activeElement !== $("nickname")) $("nickname").value = m.nickname;
      showBalance(m.balance, m.available, m.address);
      $("lifetime").textContent = "You have spent " + amount(m.lifetime_cost) + "; the realm " +
        amount(m.system_lifetime_cost) + ". " + m.users_now + " online now, most ever " + m.max_users + ".";
      renderHistory(m.recent_queries);
      $("sysop").classList.toggle("hidden", !m.is_sysop);
      if (m.is_sysop) send({ type: "get_stats" });
    },
    previous_queries(m) { renderHistory(m.queries); },
    worker_update(m) {
      if (m.workers) { S.workers = m.workers; renderWorkers(m.workers); }
      if (m.models) { S.models = m.models; refreshPickers(); }
    },
    worker_health() { /* the worker_update that follows redraws the table */ },
    queue_update(m) { renderQueue(m); },
    quote(m) { S.quote = m; $("price").textContent = amount(m.price); renderQueue(m); },
    balance_update(m) { showBalance(m.balance, m.available, m.address); requestQuote(); },
    query_result(m) {
      fillResult(cardFor(m, m.query_type), m);
      if (S.speak && m.result_type === "text") say(m.reply_text || m.result);
      if (m.result_type === "image" && S.voice.phase !== "inactive") say("Image generated successfully.");
      voiceEvent({ type: "done" });
    },
    transcription_result(m) {
      if (S.phrases.delete(String(m.request_id))) { voiceEvent({ type: "heard", text: m.text }); return; }
      const li = cardFor(m, "whisper");
      fillResult(li, { result: m.text, result_type: "text", cost: m.cost });
      if ($("query-type").value === "whisper" || S.dictating) $("prompt").value = m.text;
      S.dictating = false;
    },
    speech_result(m) {
      const line = S.sayings.get(String(m.request_id));
      if (line !== undefined) {
        S.sayings.delete(String(m.request_id));
        const url = "data:audio/wav;base64," + m.audio;
        S.spokenLines.set(line, url); playLine(url);
        return;
      }
      fillResult(cardFor(m, "bark"), { result: m.audio, result_type: m.result_type, cost: m.cost });
    },
    vision_chunk_received(m) { const li = S.pending.get(String(m.image_id)); if (li) li.lastChild.textContent = "uploading " + m.received + "/" + m.total_chunks; },
    vision_upload_complete(m) { const li = S.pending.get(String(m.image_id)); if (li) li.lastChild.textContent = "looking…"; },
    query_progress(m) {  // the answer as the worker makes it (text nodes only); query_result replaces it
      const li = S.pending.get(String(m.request_id ?? m.image_id ?? "")); if (!li) return;
      const box = li.lastChild, streaming = li.classList.contains("streaming");
      if (m.kind === "token") {
        if (!streaming) { box.textContent = ""; li.classList.add("streaming"); }
        box.appendChild(document.createTextNode(m.text));
      } else if (m.kind === "reset") { li.classList.remove("streaming"); box.textContent = "a worker failed; asking another…"; }
      else if (!streaming) box.textContent = m.kind === "step" ? "step " + m.step + " of " + m.total : m.text;
    },
    nickname_set(m) { toast("You are now " + m.nickname); },
    api_key(m) { $("api-key").textContent = m.key; },
    sysop_message(m) { toast("Sysop: " + m.message); if (S.speak) say(m.message); },
    node_stopping(m) { toast(m.message); setStatus("node stopping", "bad"); },
    sysop_warning(m) { toast("⚠ " + m.message); },
    model_status(m) { toast(m.state === "loading" ? "Loading model " + m.model + "…" : "Model " + m.model + " is ready"); },
    query_cancelled(m) { toast(m.count ? "Cancelled " + m.count + " query(ies)" : "Nothing to cancel"); },
    user_banned(m) { toast(m.user_guid ? "Banned " + m.user_guid : m.message); },
    user_unbanned(m) { toast("Unbanned " + m.user_guid); },
    query_terminated(m) { toast(m.user_guid ? "Terminated " + m.count + " queries of " + m.user_guid : m.message); },
    active_users(m) { if (m.users) renderSysopUsers(m.users); },
    user_stats() {},
    system_stats(m) { renderSysop(m); },
    ping() { send({ type: "pong" }); },
    error(m) {
      const id = String(m.request_id ?? m.image_id ?? "");
      if (S.phrases.delete(id)) {  // a hands-free phrase the node could not transcribe: listening cannot go on
        if (m.code === "too_many_queries") return;  // only this phrase is lost
        toast("Voice stopped: " + m.message);
        if (S.voice.phase !== "inactive") voiceEvent({ type: "deactivate" });
        return;
      }
      if (S.sayings.delete(id)) {  // quiet for a minute rather than a toast for every line
        if (performance.now() > S.muteUntil) toast("Nothing can speak here: " + m.message);
        S.muteUntil = performance.now() + 60000;
        return;
      }
      if (S.pending.has(id) || ["query_result", "transcription_result", "speech_result"].includes(m.in_reply_to)) {
        const li = cardFor(m, m.query_type || "query");
        li.lastChild.textContent = m.message; li.classList.add("error");
        voiceEvent({ type: "done" });
      }
      toast(m.message);
    },
  };

  function renderSysop(m) {
    const w = $("sysop-warnings"); w.replaceChildren();
    (m.warnings || []).forEach((t) => w.appendChild(el("p", "warning", "⚠ " + t)));
    const dl = $("sysop-stats"); dl.replaceChildren();
    const avg = Object.entries(m.average_times || {}).map(([k, v]) => k + " " + (v ?? "–")).join(", ");
    [["Queue", m.queue.depth + " / " + m.queue.max_size], ["Workers", m.workers.length],
     ["Users now", m.users_now + " (most " + m.max_concurrent_users + ")"], ["Lifetime", amount(m.lifetime_cost) + ", " + m.lifetime_queries + " queries"],
     ["Averages (s)", avg], ["Electricity", m.electricity.watts_now + " W now, ≈" + m.electricity.estimated_cost + " so far"],
     ["Dropped slow consoles", m.dropped_slow], ["Errors", JSON.stringify(m.errors)], ["Banned", (m.bans || []).join(", ") || "none"]]
      .forEach(([k, v]) => { dl.appendChild(el("dt", "", k)); dl.appendChild(el("dd", "", String(v))); });
    if (m.price_history) drawPrices(m.price_history);
  }

  // The sysop's live price chart: one line per query type over the last hour (SPEC §7 prices).
  const PRICE_COLOURS = ["#7ee787", "#79c0ff", "#ffa657", "#d2a8ff", "#ff7b72", "#e3b341"];
  function drawPrices(series) {
    const canvas = $("sysop-prices"); if (!canvas || !canvas.getContext) return;
    const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height, pad = 28;
    ctx.clearRect(0, 0, W, H);
    const now = Date.now() / 1000, start = now - 3600;
    let top = 2;
    Object.values(series).forEach((pts) => pts.forEach(([, p]) => { top = Math.max(top, Math.ceil(p)); }));
    ctx.strokeStyle = "#30363d"; ctx.fillStyle = "#8b949e"; ctx.font = "11px sans-serif"; ctx.lineWidth = 1;
    for (let v = 0; v <= top; v += Math.max(1, Math.round(top / 4))) {
      const y = H - pad - (v / top) * (H - 2 * pad);
      ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(W - 4, y); ctx.stroke(); ctx.fillText(String(v), 4, y + 4);
    }
    ctx.fillText("-60 min", pad, H - 8); ctx.fillText("now", W - 28, H - 8);
    const legend = $("sysop-prices-legend"); legend.replaceChildren();
    Object.entries(series).forEach(([type, pts], i) => {
      const colour = PRICE_COLOURS[i % PRICE_COLOURS.length];
      ctx.strokeStyle = colour; ctx.lineWidth = 2; ctx.beginPath();
      pts.forEach(([t, p], j) => {
        const x = pad + Math.max(0, (t - start) / 3600) * (W - pad - 4), y = H - pad - (p / top) * (H - 2 * pad);
        if (j === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
      });
      if (pts.length) {  // a price holds until it changes: carry the last one to "now"
        const p = pts[pts.length - 1][1], y = H - pad - (p / top) * (H - 2 * pad);
        if (pts.length === 1) ctx.moveTo(pad + Math.max(0, (pts[0][0] - start) / 3600) * (W - pad - 4) - 6, y);
        ctx.lineTo(W - 4, y);
      }
      ctx.stroke();
      const last = pts.length ? pts[pts.length - 1][1] : null;
      const item = el("span", "legend-item", type + (last === null ? "" : " " + last));
      item.style.color = colour; legend.appendChild(item);
    });
  }

  function renderSysopUsers(users) {
    const body = $("sysop-users").querySelector("tbody"); body.replaceChildren();
    users.forEach((u) => {
      const tr = el("tr");
      tr.appendChild(el("td", "", u.nickname)); tr.appendChild(el("td", "", String(u.queries)));
      tr.appendChild(el("td", "", tokens(u.cost)));
      const b = el("button", "", "Terminate"); b.type = "button";
      b.onclick = () => send({ type: "terminate_query", user_guid: u.guid });
      const td = el("td"); td.appendChild(b); tr.appendChild(td); body.appendChild(tr);
    });
  }

  // -- submitting ------------------------------------------------------------------------
  function requestQuote() { send({ type: "get_quote", query_type: $("query-type").value, model_type: $("model-type").value }); }

  function submit(typeOverride, promptOverride) {
    const type = typeOverride || $("query-type").value;
    const prompt = promptOverride ?? $("prompt").value;
    if ($("submit").disabled && !typeOverride) { toast("The realm is under high load; please wait"); return; }
    const query = { prompt, query_type: type, model_type: $("model-type").value, model_name: $("model-name").value };
    const id = "q" + S.nextId++;
    if (type === "vision") {
      if (!S.image) { toast("Choose, drop or capture an image first"); return; }
      resultCard(id, type, prompt || "describe the image");
      sendImage(id, S.image, query);
      return;
    }
    if (TYPES_WITH_AUDIO.includes(type)) {
      if (!S.audio) { toast("Hold the talk button to record first"); return; }
      query.audio = S.audio;
      query.prompt = "";  // the recording is the question: text left in the box is not part of it
    } else if (!prompt.trim()) { toast("Type a prompt first"); return; }
    resultCard(id, type, query.prompt || $("audio-note").textContent || "recording");
    send({ type: "submit_query", query, request_id: id });
  }

  function sendImage(id, dataUrl, query) {
    const limit = (S.limits && S.limits.chunk_chars) || 512 * 1024;
    if (dataUrl.length + 4096 <= ((S.limits && S.limits.max_message_bytes) || 1048576)) {
      send({ type: "submit_query", query: Object.assign({}, query, { image: dataUrl }), request_id: id });
      return;
    }
    const total = Math.ceil(dataUrl.length / limit);
    for (let i = 0; i < total; i++) {
      send({ type: "vision_chunk", image_id: id, chunk_id: i, total_chunks: total, chunk_data: dataUrl.slice(i * limit, (i + 1) * limit),
             prompt: query.prompt, model_type: query.model_type, model_name: query.model_name });
    }
  }

  function loadImage(file) {
    if (!file || !file.type.startsWith("image/")) { toast("That is not an image"); return; }
    const reader = new FileReader();
    reader.onload = () => { S.image = reader.result; const p = $("image-preview"); p.src = S.image; p.classList.remove("hidden"); };
    reader.readAsDataURL(file);
  }

  async function webcam() {
    const video = $("webcam");
    if (video.srcObject) {
      const canvas = document.createElement("canvas");
      canvas.width = video.videoWidth || 640; canvas.height = video.videoHeight || 480;
      canvas.getContext("2d").drawImage(video, 0, 0);
      S.image = canvas.toDataURL("image/jpeg", 0.85);
      video.srcObject.getTracks().forEach((t) => t.stop()); video.srcObject = null; video.classList.add("hidden");
      const p = $("image-preview"); p.src = S.image; p.classList.remove("hidden");
      $("webcam-button").textContent = "Webcam";
      return true;
    }
    try {
      video.srcObject = await navigator.mediaDevices.getUserMedia({ video: true });
      video.classList.remove("hidden"); $("webcam-button").textContent = "Take picture";
    } catch (err) { toast("No webcam: " + err.message); }
    return false;
  }

  // -- voice -----------------------------------------------------------------------------
  function say(text) {
    if (!text) return;
    const line = String(text).slice(0, 500);
    if (S.voiceless || !("speechSynthesis" in window)) { if (performance.now() > S.muteUntil) sayThroughNode(line); return; }
    const u = new SpeechSynthesisUtterance(line);
    u.onstart = () => { S.talking += 1; };
    u.onend = () => { S.talking = Math.max(0, S.talking - 1); S.talkEndedAt = performance.now(); };
    u.onerror = (e) => {  // in place of end
      u.onend();
      if (!SYNTHESIS_BROKEN.includes(e.error)) return;
      S.voiceless = true; sayThroughNode(line);
    };
    window.speechSynthesis.speak(u);
  }

  // A text_to_speech query (paid like any other); a line said before is played again from this
  // page's copy, so the voice mode's fixed prompts cost once a visit.
  function sayThroughNode(line) {
    const known = S.spokenLines.get(line);
    if (known) { playLine(known); return; }
    const id = "t" + S.nextId++;
    S.sayings.set(id, line);
    send({ type: "text_to_speech", text: line, request_id: id });
  }

  function playLine(url) {  // one line after another, never over each other
    S.lineQueue = S.lineQueue.then(() => new Promise((done) => {
      const a = new Audio(url);
      const end = () => { S.talking = Math.max(0, S.talking - 1); S.talkEndedAt = performance.now(); done(); };
      a.onended = end; a.onerror = end;
      S.talking += 1;
      a.play().catch(end);
    }));
  }

  function voiceEvent(event) {
    const { state, effects } = window.MTORVoice.step(S.voice, event);
    S.voice = state;
    $("voice-state").textContent = "voice " + (state.phase === "inactive" ? "off" : state.phase + (state.mode ? " · " + state.mode : ""));
    $("voice-toggle").setAttribute("aria-pressed", String(state.phase !== "inactive"));
    for (const fx of effects) runEffect(fx);
    armSilence();
    return state;
  }

  function runEffect(fx) {
    if (fx.say !== undefined) say(fx.say);
    if (fx.prompt !== undefined) $("prompt").value = fx.prompt;
    if (fx.submit) { $("query-type").value = fx.submit.mode; refreshPickers(); submit(fx.submit.mode, fx.submit.prompt); }
    if (fx.capture) { $("query-type").value = "vision"; refreshPickers(); captureAndDescribe(); }
    if (fx.weather) speakWeather();
    if (fx.listen !== undefined) listen(fx.listen);
  }

  async function captureAndDescribe() {
    if (!$("webcam").srcObject) await webcam();
    setTimeout(async () => { if (await webcam()) submit("vision", "Describe this image."); else voiceEvent({ type: "done" }); }, 1500);
  }

  function speakWeather() {
    if (!navigator.geolocation) { say("Weather is not available here."); voiceEvent({ type: "done" }); return; }
    navigator.geolocation.getCurrentPosition(async (pos) => {
      try {
        const r = await fetch("https://api.open-meteo.com/v1/forecast?current_weather=true&latitude=" +
          pos.coords.latitude.toFixed(2) + "&longitude=" + pos.coords.longitude.toFixed(2));
        const w = (await r.json()).current_weather;
        say("It is " + Math.round(w.temperature) + " degrees with wind at " + Math.round(w.windspeed) + " kilometres per hour.");
      } catch (err) { say("Weather is not available right now."); }
      voiceEvent({ type: "done" });
    }, () => { say("I do not know where you are."); voiceEvent({ type: "done" }); });
  }

  function armSilence() {
    clearTimeout(S.silenceTimer);
    if (S.voice.phase !== "inactive") S.silenceTimer = setTimeout(() => voiceEvent({ type: "silence" }), window.MTORVoice.SILENCE_MS);
  }

  function listen(on) {
    if (!on) {
      if (S.recognition) { const r = S.recognition; S.recognition = null; r.stop(); }
      if (S.listener) { S.listener.stop(); S.listener = null; }
      S.phrases.clear();
      return;
    }
    if (S.recognition || S.listener) return;
    const SR = window.SpeechRecognition || window.webkitSpeechRecognition;
    if (!SR || S.recognitionBroken) { listenThroughNode(); return; }
    const r = new SR(); r.continuous = true; r.interimResults = false; r.lang = "en-US";
    r.onresult = (e) => { const res = e.results[e.results.length - 1]; voiceEvent({ type: "heard", text: res[0].transcript }); };
    r.onerror = (e) => {
      if (!RECOGNITION_BROKEN.includes(e.error) || S.recognition !== r) return;
      S.recognitionBroken = true; S.recognition = null;
      listenThroughNode();
    };
    r.onend = () => { if (S.recognition === r && S.voice.phase !== "inactive") r.start(); };
    S.recognition = r; r.start();
  }

  // Each phrase is a whisper query to this node (paid like any other); none is sent while a spoken
  // request is being answered, or when the page was speaking during it.
  function listenThroughNode() {
    const listener = new window.MTORAudio.PhraseListener((wav, startedAt) => {
      if (S.listener !== listener || S.voice.phase === "busy" || S.voice.phase === "inactive") return;
      if (S.talking || S.talkEndedAt > startedAt) return;  // the page's own voice, heard back: half duplex
      const id = "v" + S.nextId++;
      S.phrases.add(id);
      send({ type: "speech_to_text", audio: "data:audio/wav;base64," + window.MTORAudio.toBase64(wav), request_id: id });
    });
    S.listener = listener;
    listener.start()
      .then(() => { if (S.listener === listener) toast("Listening through this node's speech-to-text: each phrase is a whisper query"); })
      .catch((err) => {
        if (S.listener !== listener) return;
        S.listener = null; toast("No microphone: " + err.message);
        if (S.voice.phase !== "inactive") voiceEvent({ type: "deactivate" });
      });
  }

  async function pttStart() {
    try { S.recorder = new window.MTORAudio.Recorder(); await S.recorder.start(); $("audio-note").textContent = "recording…"; }
    catch (err) { S.recorder = null; toast("No microphone: " + err.message); }
  }

  async function pttStop() {
    if (!S.recorder) return;
    const rec = S.recorder; S.recorder = null;
    try {
      const wav = await rec.stop();
      S.audio = "data:audio/wav;base64," + window.MTORAudio.toBase64(wav);
      $("audio-note").textContent = "recorded " + Math.round(wav.length / 32000 * 10) / 10 + " s";
      const type = $("query-type").value;
      if (type === "speech") submit();
      else if (S.dictating || type !== "whisper") send({ type: "speech_to_text", audio: S.audio, request_id: "q" + S.nextId++ });
    } catch (err) { toast("Recording failed: " + err.message); }
  }

  function voiceInput() {
    const SR = window.SpeechRecognition || window.webkitSpeechRecognition;
    if (SR && !S.recognitionBroken) {
      const r = new SR(); r.lang = "en-US";
      r.onerror = (e) => { if (RECOGNITION_BROKEN.includes(e.error)) { S.recognitionBroken = true; toast("Hold the talk button, or press Ctrl+Shift+V again to record"); } };
      r.onresult = (e) => { $("prompt").value = ($("prompt").value + " " + e.results[0][0].transcript).trim(); };
      r.start();
    } else if (S.recorder) { pttStop(); } else { S.dictating = true; pttStart(); }
  }

  // -- wiring ----------------------------------------------------------------------------
  function wire() {
    $("submit").onclick = () => submit();
    $("clear").onclick = () => { $("result-list").replaceChildren(); S.pending.clear(); };
    $("query-type").onchange = () => { refreshPickers(); requestQuote(); };
    $("model-type").onchange = requestQuote;
    $("nickname-form").onsubmit = (e) => { e.preventDefault(); send({ type: "set_nickname", nickname: $("nickname").value }); };
    $("image-input").onchange = (e) => loadImage(e.target.files[0]);
    const drop = $("drop-zone");
    ["dragenter", "dragover"].forEach((n) => drop.addEventListener(n, (e) => { e.preventDefault(); drop.classList.add("over"); }));
    ["dragleave", "drop"].forEach((n) => drop.addEventListener(n, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
    drop.addEventListener("drop", (e) => loadImage(e.dataTransfer.files[0]));
    $("webcam-button").onclick = webcam;
    const ptt = $("ptt");
    ptt.addEventListener("pointerdown", pttStart); ptt.addEventListener("pointerup", pttStop); ptt.addEventListener("pointerleave", pttStop);
    $("voice-toggle").onclick = () => voiceEvent({ type: S.voice.phase === "inactive" ? "activate" : "deactivate" });
    $("speak-toggle").onclick = () => { S.speak = !S.speak; $("speak-toggle").setAttribute("aria-pressed", String(S.speak)); };
    $("api-key-button").onclick = () => send({ type: "create_api_key" });
    const target = () => $("sysop-target").value.trim();
    $("sysop-ban").onsubmit = (e) => { e.preventDefault(); if (target()) send({ type: "ban_user", user_guid: target() }); };
    $("sysop-unban").onclick = () => { if (target()) send({ type: "unban_user", user_guid: target() }); };
    $("sysop-terminate").onclick = () => { if (target()) send({ type: "terminate_query", user_guid: target() }); };
    $("sysop-broadcast").onsubmit = (e) => { e.preventDefault(); const m = $("sysop-message").value.trim(); if (m) send({ type: "sysop_message", message: m }); $("sysop-message").value = ""; };
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape") { send({ type: "cancel_query" }); return; }  // stop my running queries
      if (!e.ctrlKey) return;
      const k = e.key.toLowerCase();
      if (k === "enter") { e.preventDefault(); submit(); }
      else if (k === "l" && !e.shiftKey) { e.preventDefault(); $("clear").click(); }
      else if (e.shiftKey && k === "v") { e.preventDefault(); voiceInput(); }
      else if (e.shiftKey && k === "s") { e.preventDefault(); $("speak-toggle").click(); }
      else if (e.shiftKey && k === "w") { e.preventDefault(); $("voice-toggle").click(); }
    });
    setInterval(() => { if (S.info && S.info.is_sysop && S.connected) send({ type: "get_stats" }); }, 5000);
    fetch("/health").then((r) => r.json()).then((h) => { $("peer-id").textContent = "node …" + h.peer_id.slice(-8); }).catch(() => {});
  }

  window.MTORConsole = { state: S, send, submit, voiceEvent, backoff: () => S.backoffMs };
  wire();
  refreshPickers();
  connect();
})();
