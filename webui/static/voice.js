"use strict";
// The wake-word state machine of SPEC.md §8 as a pure reducer:
//   step(state, event) -> {state, effects}
// Events: {type: "activate"} | {type: "deactivate"} | {type: "heard", text} | {type: "silence"}
//         | {type: "done"} (a vision/weather action finished).
// Effects: {say: text} | {submit: {mode, prompt}} | {prompt: text} | {capture: "vision"}
//          | {weather: true} | {listen: bool}.
// The browser shell feeds it recognition results (the browser's, or the node's Whisper on phrases
// the page cuts at pauses; or tests inject them) and
// runs the effects; a silence is 15 s without a result (SILENCE_MS).
(function (root) {
  const SILENCE_MS = 15000;
  const WAKE = "computer";
  const MODES = ["chat", "imagine", "vision", "weather"];
  const SAY = {
    ready: "9000 ready. Say the wake word.",
    menu: "What would you like to do? Say the mode.",
    modes: "Say chat, imagine, vision, weather, or goodbye.",
    dictate: (mode) => (mode === "imagine" ? "Describe the image. Say computer to create it." :
      "Go ahead. Say computer to send."),
    erased: "Prompt erased.",
    goodbye: "Goodbye.",
    empty: "The prompt is empty.",
  };

  function initial() {
    return { phase: "inactive", mode: null, prompt: "", silences: 0 };
  }

  function words(text) {
    return String(text || "").toLowerCase().replace(/[^a-z0-9' ]+/g, " ").trim();
  }

  function step(state, event) {
    const s = Object.assign({}, state);
    const fx = [];
    if (event.type === "deactivate") {
      return { state: initial(), effects: [{ listen: false }] };
    }
    if (event.type === "activate") {
      if (s.phase !== "inactive") return { state: s, effects: [] };
      return { state: { phase: "listening", mode: null, prompt: "", silences: 0 },
               effects: [{ listen: true }, { say: SAY.ready }] };
    }
    if (s.phase === "inactive") return { state: s, effects: [] };
    const text = event.type === "heard" ? words(event.text) : "";
    if (event.type === "heard" && /\bgoodbye\b/.test(text)) {
      return { state: initial(), effects: [{ say: SAY.goodbye }, { listen: false }] };
    }
    switch (s.phase) {
      case "listening":
        if (event.type === "heard" && text.split(" ").includes(WAKE)) {
          s.phase = "menu"; s.silences = 0;
          fx.push({ say: SAY.menu });
        }
        break;
      case "menu":
        if (event.type === "silence") {
          s.phase = "listening";
          break;
        }
        if (event.type === "heard") {
          const mode = MODES.find((m) => text.split(" ").includes(m));
          if (!mode) { fx.push({ say: SAY.modes }); break; }
          s.mode = mode; s.silences = 0;
          if (mode === "vision") { s.phase = "busy"; fx.push({ capture: "vision" }); }
          else if (mode === "weather") { s.phase = "busy"; fx.push({ weather: true }); }
          else { s.phase = "dictation"; s.prompt = ""; fx.push({ prompt: "" }, { say: SAY.dictate(mode) }); }
        }
        break;
      case "dictation":
        if (event.type === "silence") {
          s.silences += 1;
          if (s.silences >= 2) { s.phase = "menu"; s.silences = 0; s.mode = null; fx.push({ say: SAY.menu }); }
          break;
        }
        if (event.type === "heard") {
          s.silences = 0;
          const list = text.split(" ");
          if (list.includes("backspace")) { s.prompt = ""; fx.push({ prompt: "" }, { say: SAY.erased }); break; }
          if (list.includes(WAKE)) {
            // Words before "computer" in the same phrase still belong to the prompt.
            const before = String(event.text).split(/computer/i)[0].trim();
            if (before) s.prompt = (s.prompt ? s.prompt + " " : "") + before;
            if (!s.prompt) { fx.push({ say: SAY.empty }); break; }
            fx.push({ prompt: s.prompt }, { submit: { mode: s.mode, prompt: s.prompt } });
            s.phase = "busy"; s.prompt = "";
            break;
          }
          s.prompt = (s.prompt ? s.prompt + " " : "") + String(event.text).trim();
          fx.push({ prompt: s.prompt });
        }
        break;
      case "busy":
        if (event.type === "done") { s.phase = "menu"; s.mode = null; fx.push({ say: SAY.menu }); }
        break;
    }
    return { state: s, effects: fx };
  }

  root.MTORVoice = { step, initial, SILENCE_MS, SAY, WAKE };
})(window);
