"""Local model backends (chat, vision, speech, images) and the remote adapters.

CTranslate2 runs int8 models through Intel MKL by default on Intel CPUs. On some of them
(seen on a Xeon with AVX512-VNNI/FP16, 2026-11-27) MKL's int8 GEMM gives results far enough
off that SmolLM2-135M answers "What is the capital of France?" with French-sounding nonsense,
while the same weights computed in float32, or in int8 through oneDNN (``CT2_USE_MKL=0``), say
"The capital of France is Paris." A node must not serve wrong answers for speed, so oneDNN is
the default here; an operator who has checked MKL on their CPU may set ``CT2_USE_MKL=1``.
The variable is read when CTranslate2 loads, hence here, before any backend imports it.
"""

import os

os.environ.setdefault("CT2_USE_MKL", "0")
