"use strict";
// Push-to-talk recording and hands-free phrases as 16 kHz mono 16-bit WAV (what speech-to-text
// wants), plus WAV encoding and downsampling as pure functions the tests can call.
(function (root) {
  function encodeWav(samples, rate) {
    const buffer = new ArrayBuffer(44 + samples.length * 2);
    const v = new DataView(buffer);
    const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
    str(0, "RIFF"); v.setUint32(4, 36 + samples.length * 2, true); str(8, "WAVE");
    str(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
    v.setUint32(24, rate, true); v.setUint32(28, rate * 2, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true);
    str(36, "data"); v.setUint32(40, samples.length * 2, true);
    for (let i = 0; i < samples.length; i++) {
      const x = Math.max(-1, Math.min(1, samples[i]));
      v.setInt16(44 + i * 2, x < 0 ? x * 0x8000 : x * 0x7fff, true);
    }
    return new Uint8Array(buffer);
  }

  function toBase64(bytes) {
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return btoa(s);
  }

  async function toWav16k(blob) {
    const raw = await blob.arrayBuffer();
    const ctx = new (root.AudioContext || root.webkitAudioContext)();
    try {
      const decoded = await ctx.decodeAudioData(raw);
      const frames = Math.ceil(decoded.duration * 16000);
      const off = new OfflineAudioContext(1, Math.max(1, frames), 16000);
      const src = off.createBufferSource();
      src.buffer = decoded; src.connect(off.destination); src.start();
      const rendered = await off.startRendering();
      return encodeWav(rendered.getChannelData(0), 16000);
    } finally { ctx.close(); }
  }

  class Recorder {
    async start() {
      this.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
      this.chunks = [];
      this.rec = new MediaRecorder(this.stream);
      this.rec.ondataavailable = (e) => { if (e.data.size) this.chunks.push(e.data); };
      this.rec.start();
    }
    stop() {
      return new Promise((resolve, reject) => {
        if (!this.rec) { reject(new Error("not recording")); return; }
        this.rec.onstop = async () => {
          this.stream.getTracks().forEach((t) => t.stop());
          try { resolve(await toWav16k(new Blob(this.chunks, { type: this.rec.mimeType }))); }
          catch (err) { reject(err); }
        };
        this.rec.stop();
      });
    }
  }

  // Averages each output sample's share of the input: a crude low-pass that is enough for speech.
  function downsample(samples, fromRate, toRate) {
    if (fromRate <= toRate) return samples;
    const ratio = fromRate / toRate, out = new Float32Array(Math.floor(samples.length / ratio));
    for (let i = 0; i < out.length; i++) {
      const a = Math.floor(i * ratio), b = Math.min(samples.length, Math.floor((i + 1) * ratio));
      let sum = 0;
      for (let j = a; j < b; j++) sum += samples[j];
      out[i] = sum / Math.max(1, b - a);
    }
    return out;
  }

  // Hands-free listening where the browser cannot recognise speech itself: the microphone is cut
  // into phrases at pauses (by loudness against the room's measured noise floor), and each phrase
  // is handed over as 16 kHz WAV with the page time its sound began, for the node's own speech-to-text.
  class PhraseListener {
    constructor(onPhrase, { pauseMs = 700, longestMs = 12000, shortestMs = 250 } = {}) {
      Object.assign(this, { onPhrase, pauseMs, longestMs, shortestMs });
      this.floor = 0.003; this.frames = []; this.before = null; this.speaking = false;
    }
    async start() {
      this.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
      if (this.stopped) { this.stop(); return; }  // stopped while the microphone was being granted
      this.ctx = new (root.AudioContext || root.webkitAudioContext)();
      const source = this.ctx.createMediaStreamSource(this.stream);
      this.tap = this.ctx.createScriptProcessor(2048, 1, 1);
      this.tap.onaudioprocess = (e) => this.frame(new Float32Array(e.inputBuffer.getChannelData(0)));
      source.connect(this.tap);
      this.tap.connect(this.ctx.destination);  // a processor runs only when connected; it outputs silence
      await this.ctx.resume();  // started from a click, so the autoplay rule allows it
    }
    frame(x) {
      const ms = (x.length / this.ctx.sampleRate) * 1000;
      let sum = 0;
      for (let i = 0; i < x.length; i++) sum += x[i] * x[i];
      const rms = Math.sqrt(sum / x.length), loud = rms > Math.max(0.01, this.floor * 4);
      if (!this.speaking) {
        if (!loud) { this.floor = 0.95 * this.floor + 0.05 * rms; this.before = x; return; }
        this.speaking = true; this.frames = this.before ? [this.before, x] : [x]; this.spokenMs = ms; this.quietMs = 0;
        this.startedAt = root.performance.now() - ms - (this.before ? ms : 0);
        return;
      }
      this.frames.push(x); this.spokenMs += ms; this.quietMs = loud ? 0 : this.quietMs + ms;
      if (this.quietMs >= this.pauseMs || this.spokenMs >= this.longestMs) this.flush();
    }
    flush() {
      const frames = this.frames; this.frames = []; this.speaking = false; this.before = null;
      if (this.spokenMs - this.quietMs < this.shortestMs) return;  // a click or a cough
      const all = new Float32Array(frames.reduce((n, f) => n + f.length, 0));
      let at = 0;
      for (const f of frames) { all.set(f, at); at += f.length; }
      this.onPhrase(encodeWav(downsample(all, this.ctx.sampleRate, 16000), 16000), this.startedAt);
    }
    stop() {
      this.stopped = true;
      if (this.tap) { this.tap.onaudioprocess = null; this.tap.disconnect(); }
      if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
      if (this.ctx) this.ctx.close();
      this.tap = this.stream = this.ctx = null;
    }
  }

  root.MTORAudio = { encodeWav, toBase64, toWav16k, downsample, Recorder, PhraseListener };
})(window);
