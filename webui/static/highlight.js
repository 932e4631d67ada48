"use strict";
// A tiny local highlighter: splits ``` fences out of model text and colours
// keywords, strings, comments and numbers. Everything is built with
// createElement/textContent, so no text is ever parsed as HTML.
(function (root) {
  const KEYWORDS = new Set(("def class return if elif else for while in import from as with try except finally " +
    "raise lambda yield async await pass break continue and or not is None True False function const let var new " +
    "this null undefined true false switch case default do typeof instanceof fn pub struct enum impl match use mut " +
    "int float char void static public private package func go defer type interface").split(" "));
  const TOKEN = /(\/\/[^\n]*|#[^\n]*|\/\*[\s\S]*?\*\/)|("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`(?:[^`\\]|\\.)*`)|(\b\d+(?:\.\d+)?\b)|([A-Za-z_][A-Za-z0-9_]*)/g;

  function span(cls, text) {
    const el = document.createElement("span");
    el.className = cls;
    el.textContent = text;
    return el;
  }

  function code(text) {
    const frag = document.createDocumentFragment();
    let last = 0;
    TOKEN.lastIndex = 0;
    let m;
    while ((m = TOKEN.exec(text)) !== null) {
      if (m.index > last) frag.appendChild(document.createTextNode(text.slice(last, m.index)));
      if (m[1]) frag.appendChild(span("tok-com", m[1]));
      else if (m[2]) frag.appendChild(span("tok-str", m[2]));
      else if (m[3]) frag.appendChild(span("tok-num", m[3]));
      else if (KEYWORDS.has(m[4])) frag.appendChild(span("tok-kw", m[4]));
      else frag.appendChild(document.createTextNode(m[4]));
      last = TOKEN.lastIndex;
    }
    if (last < text.length) frag.appendChild(document.createTextNode(text.slice(last)));
    return frag;
  }

  // Split text into [{kind: "text"|"code", text, lang}] on ``` fences (pure).
  function split(text) {
    const parts = [];
    const fence = /```([\w+-]*)\n?([\s\S]*?)(```|$)/g;
    let last = 0, m;
    while ((m = fence.exec(text)) !== null) {
      if (m.index > last) parts.push({ kind: "text", text: text.slice(last, m.index) });
      parts.push({ kind: "code", lang: m[1] || "", text: m[2] });
      last = fence.lastIndex;
      if (m[0].length === 0) break;
    }
    if (last < text.length) parts.push({ kind: "text", text: text.slice(last) });
    return parts;
  }

  function render(text) {
    const frag = document.createDocumentFragment();
    for (const part of split(String(text))) {
      if (part.kind === "code") {
        const pre = document.createElement("pre");
        pre.className = "code";
        const el = document.createElement("code");
        if (part.lang) el.dataset.lang = part.lang;
        el.appendChild(code(part.text));
        pre.appendChild(el);
        frag.appendChild(pre);
      } else {
        const div = document.createElement("div");
        div.className = "text";
        div.textContent = part.text;
        frag.appendChild(div);
      }
    }
    return frag;
  }

  root.MTORHighlight = { render, split };
})(window);
