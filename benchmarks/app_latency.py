"""How quickly the app answers: server start, each endpoint through gradio_client, and a tiny run's time to its first
logged loss and to a saved checkpoint after Stop.

    .venv/bin/python benchmarks/app_latency.py [--repeats 20]

Starts ``python app/app.py`` on a free port with a temporary workspace (offline), as a user would.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
FORM = ("meta-llama/Llama-3.1-8B", "RTX 4090", 1, "lora", 0, 20000, 2, 64, 1e-5, 5e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, max(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    from gradio_client import Client

    root = Path(tempfile.mkdtemp(prefix="fh-app-bench-"))
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, str(REPO / "app" / "app.py"), "--port", str(port), "--workspace",
                               str(root / "ws")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        start = time.perf_counter() - t0
        client = Client(url, verbose=False)
        print(f"server start to first HTTP answer: {start:.1f} s")
        rows = [("/recommend", lambda: client.predict(*FORM, api_name="/recommend")),
                ("/export (all formats written)", lambda: client.predict(*FORM, "yaml", api_name="/export")),
                ("/list_runs (empty workspace)", lambda: client.predict(api_name="/list_runs"))]
        for name, fn in rows:
            median, worst = timed(fn, args.repeats)
            print(f"{name:34s} median {median:6.1f} ms   max {worst:6.1f} ms   ({args.repeats} calls)")

        raw = yaml.safe_load((REPO / "recipes" / "tiny-demo.yaml").read_text())
        raw["training"] = {"max_steps": 2000, "logging_steps": 5, "save_steps": 1000}
        t0 = time.perf_counter()
        run_id, _ = client.predict(yaml.safe_dump(raw), None, "", False, "bench", api_name="/start_run")
        launched = time.perf_counter() - t0
        while client.predict(run_id, api_name="/run_status")["loss"] is None:
            time.sleep(0.2)
        first_loss = time.perf_counter() - t0
        median, worst = timed(lambda: client.predict(run_id, api_name="/run_status"), args.repeats)
        print(f"{'/run_status (while it trains)':34s} median {median:6.1f} ms   max {worst:6.1f} ms")
        t1 = time.perf_counter()
        client.predict(run_id, api_name="/stop_run")
        while (st := client.predict(run_id, api_name="/run_status"))["active"]:
            time.sleep(0.2)
        stopped = time.perf_counter() - t1
        print(f"tiny run: /start_run returned in {launched * 1000:.0f} ms; first logged loss after {first_loss:.1f} s "
              f"(process start, imports, tiny model and data); Stop to '{st['state']}' with "
              f"{Path(st['message'].split('checkpoint ')[1].split(';')[0]).name} saved in {stopped:.1f} s")
    finally:
        server.terminate()
        server.wait(15)


if __name__ == "__main__":
    main()
