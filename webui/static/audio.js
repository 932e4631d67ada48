"use strict";
// Push-to-talk recording as 16 kHz mono 16-bit WAV (what speech-to-text wants),
// plus WAV encoding as a pure function the tests can call.
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

  root.MTORAudio = { encodeWav, toBase64, toWav16k, Recorder };
})(window);
