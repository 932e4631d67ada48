"""Cold start to console-ready, and idle memory, against in-run baselines.

Prints, for N runs (medians):
  * ``python -c pass``                   interpreter start (baseline)
  * importing the node's dependencies    the floor for any start
  * ``mtor-node start`` to "9000 ready." on a fresh data dir (cold: init included)
  * the same on an existing data dir (warm)
  * idle RSS of the ready node (no models loaded)

Targets (issue 2): ready < 3x the dependency-import time; idle RSS < 150 MB.
Usage: python bench/startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPS = "import trio, libp2p, quart_trio, hypercorn.trio, plyvel, nacl.signing, cryptography, msgpack, multiaddr"


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_to_ready(data_dir: Path) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "cli", "start", "--data-dir", str(data_dir), "--console", "127.0.0.1:0",
           "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--log-level", "warning"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stdout:
            if "9000 ready." in line:
                ready = time.perf_counter() - started
                break
        else:
            raise RuntimeError("node exited before it was ready")
        time.sleep(1.0)  # let the idle node settle before reading its memory
        memory = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    return ready, memory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    bare = statistics.median(timed([sys.executable, "-c", "pass"]) for _ in range(args.runs))
    deps = statistics.median(timed([sys.executable, "-c", DEPS]) for _ in range(args.runs))
    cold, warm, memory = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            data = Path(tmp) / f"n{i}"
            ready, _ = start_to_ready(data)
            cold.append(ready)
            ready, rss = start_to_ready(data)
            warm.append(ready)
            memory.append(rss)
    cold_s, warm_s, rss = statistics.median(cold), statistics.median(warm), statistics.median(memory)
    print(f"python -c pass:          {bare * 1000:8.1f} ms   (baseline, 1.00x)")
    print(f"import dependencies:     {deps * 1000:8.1f} ms   ({deps / bare:.2f}x baseline)")
    print(f"cold start to ready:     {cold_s * 1000:8.1f} ms   ({cold_s / bare:.2f}x baseline, {cold_s / deps:.2f}x imports; target < 3x imports)")
    print(f"warm start to ready:     {warm_s * 1000:8.1f} ms   ({warm_s / bare:.2f}x baseline, {warm_s / deps:.2f}x imports)")
    print(f"idle RSS (no models):    {rss:8.1f} MB   (target < 150 MB)")
    ok = cold_s < 3 * deps and rss < 150
    print("targets met" if ok else "targets NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
