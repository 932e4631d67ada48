"""Inference overhead of the backends against the libraries called directly (medians of N runs).

Prints:
  * whisper: real-time factor (compute s / audio s) of WhisperBackend.run vs faster-whisper
    directly, on the same Piper-spoken audio (decode included in both);
  * chat: tokens/s of ChatBackend.run vs ctranslate2 Generator.generate_tokens directly, and
    ctranslate2 (int8) vs transformers (float32, dequantised from the same GGUF), greedy, same
    prompt and token budget;
  * tts: real-time factor of PiperBackend.run.

Usage: python bench/inference.py [--runs N] [--threads T] [--cache DIR]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# This file is named like the package it measures: run from bench/, Python would import it
# as `inference`. Put the repository root first instead.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]


def median_time(fn, runs: int) -> tuple[float, object]:
    fn()  # warm-up: first calls pay allocator and cache costs
    times, out = [], None
    for _ in range(runs):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mtor-node-tests" / "models")
    args = parser.parse_args(argv)

    from inference.base import CancelToken, no_progress
    from inference.chat import ChatBackend, ChatRequest
    from inference.convert import default_chat_source, ensure_converted
    from inference.tts import PiperBackend, SpeakRequest
    from inference.whisper import TranscribeRequest, WhisperBackend

    # --- TTS -------------------------------------------------------------------------------
    piper = PiperBackend()
    piper.load()
    text = ("The weather is sunny today. I would like two green apples. "
            "Where is the train station? Please send the report before noon.")
    t, speech = median_time(lambda: piper.run(SpeakRequest(text, deterministic=True), no_progress, CancelToken()), args.runs)
    print(f"tts      piper backend          RTF {t / speech.duration_s:.3f}  ({speech.duration_s:.1f} s audio)")

    # --- Whisper ---------------------------------------------------------------------------
    whisper = WhisperBackend(cpu_threads=args.threads)
    whisper.load()
    audio = speech.wav
    from faster_whisper import WhisperModel, decode_audio

    direct = WhisperModel(str(whisper.model_dir), device="cpu", compute_type="int8", cpu_threads=args.threads)

    def raw():
        segments, _ = direct.transcribe(decode_audio(io.BytesIO(audio)), language="en", beam_size=1,
                                        temperature=0.0, vad_filter=False)
        return " ".join(s.text.strip() for s in segments)

    backend_times, direct_times = [], []  # interleaved, as for chat below
    raw()
    for _ in range(args.runs):
        t_b, result = median_time(lambda: whisper.run(TranscribeRequest(audio), no_progress, CancelToken()), 1)
        backend_times.append(t_b)
        direct_times.append(median_time(raw, 1)[0])
    t_backend, t_direct = statistics.median(backend_times), statistics.median(direct_times)
    dur = result.duration_s
    print(f"whisper  backend                RTF {t_backend / dur:.3f}")
    print(f"whisper  faster-whisper direct  RTF {t_direct / dur:.3f}  (overhead {100 * (t_backend / t_direct - 1):+.1f}%)")

    # --- Chat ------------------------------------------------------------------------------
    source = default_chat_source()
    model_dir = ensure_converted(source, args.cache, "int8")
    chat = ChatBackend(model_dir, cpu_threads=args.threads)
    chat.load()
    messages = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
    request = ChatRequest(messages, max_tokens=args.tokens)
    prompt = chat.prompt_tokens(messages)
    generator = chat._generator  # the very same loaded model, called without the backend

    def ct2_direct():
        return sum(1 for _ in generator.generate_tokens(prompt, max_length=args.tokens, sampling_topk=1,
                                                        end_token="<|im_end|>"))

    # interleaved so that load from other processes on the machine hits both alike
    backend_times, direct_times = [], []
    chat.run(request, no_progress, CancelToken())
    for _ in range(args.runs):
        t_b, res = median_time(lambda: chat.run(request, no_progress, CancelToken()), 1)
        t_d, n = median_time(ct2_direct, 1)
        backend_times.append(t_b)
        direct_times.append(t_d)
    t_backend, t_direct = statistics.median(backend_times), statistics.median(direct_times)
    print(f"chat     backend (ct2 int8)     {res.tokens / t_backend:.1f} tok/s  ({res.tokens} tokens)")
    print(f"chat     ctranslate2 direct     {n / t_direct:.1f} tok/s  (overhead {100 * (t_backend / res.tokens) / (t_direct / n) - 100:+.1f}%)")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    def hf():
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        return out.shape[1] - ids["input_ids"].shape[1]

    t_hf, n_hf = median_time(hf, args.runs)
    print(f"chat     transformers fp32      {n_hf / t_hf:.1f} tok/s  ({n_hf} tokens; ct2 int8 is "
          f"{(n / t_direct) / (n_hf / t_hf):.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
