"""Load on a real `keras-sd3 serve` process: 200 requests from 20 concurrent clients, then the same with the
server killed (`kill -9`) in the middle and restarted on the same outputs folder.

    python benchmarks/serve_load.py [--requests 200] [--clients 20] [--max-batch 4] [--baseline 24]

Checks that every accepted job ends done with valid PNGs (none lost, none duplicated), and reports p50 / p95
latency (submission to done) and images per second, against calling `generate()` in a loop in one process
(`--baseline` calls, the batching gain). The backend is KERAS_BACKEND's (default torch).
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np

PROMPTS = [f"a {size} {color} {shape} on a {background} background"
           for size in ("small", "big") for color in ("red", "green", "blue", "yellow")
           for shape in ("circle", "square", "triangle") for background in ("white", "black")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `keras-sd3 serve` subprocess on `outputs`."""

    def __init__(self, outputs, port, max_batch):
        self.outputs, self.port, self.max_batch, self.process = outputs, port, max_batch, None
        self.url = f"http://127.0.0.1:{port}/api/v1"

    def start(self):
        command = [sys.executable, "-m", "keras_sd3.cli", "serve", "--port", str(self.port), "--outputs", self.outputs,
                   "--max-batch", str(self.max_batch)]
        log = open(os.path.join(self.outputs, "server.log"), "a")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                return call("GET", f"{self.url}/health")
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start; see server.log")

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)


def call(method, url, body=None, timeout=30):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        payload = response.read()
    return json.loads(payload) if payload[:1] in (b"{", b"[") else payload


def retrying(function, *args):
    """`function(*args)`, retried while the server is down (killed and restarting)."""
    while True:
        try:
            return function(*args)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
            if isinstance(error, urllib.error.HTTPError):
                raise
            time.sleep(0.3)


def client(server, requests, results):
    """Submits its requests one after another and waits for each to end (as a user would)."""
    for index in requests:
        body = {"prompt": PROMPTS[index % len(PROMPTS)], "seed": index}
        start = time.time()
        job_id = retrying(call, "POST", f"{server.url}/generate", body)["id"]
        while True:
            job = retrying(call, "GET", f"{server.url}/jobs/{job_id}")
            if job["state"] in ("done", "failed", "cancelled"):
                break
            time.sleep(0.1)
        results.append({"index": index, "id": job_id, "state": job["state"], "images": job["images"],
                        "latency": time.time() - start, "error": job["error"]})


def check_images(server, results):
    """Every result: done, one PNG that decodes, with its own prompt and seed; no id or file twice."""
    from io import BytesIO

    from PIL import Image

    ids = [r["id"] for r in results]
    assert len(set(ids)) == len(ids), "a job id was given twice"
    files = [name for r in results for name in r["images"]]
    assert len(set(files)) == len(files), "an image file was given to two jobs"
    for result in results:
        assert result["state"] == "done" and len(result["images"]) == 1, result
        data = retrying(call, "GET", "http://127.0.0.1:%d%s" % (server.port, result["images"][0]))
        with Image.open(BytesIO(data)) as image:
            assert image.format == "PNG" and json.loads(image.text["seed"]) == result["index"]
            assert image.text["prompt"] == PROMPTS[result["index"] % len(PROMPTS)]
            assert np.asarray(image).std() > 5, "a blank image"


def run_load(server, num_requests, num_clients, kill_after=None):
    """All clients at once; with `kill_after`, kill -9 the server once that many jobs are done, restart it."""
    results, threads = [], []
    for c in range(num_clients):
        thread = threading.Thread(target=client, args=(server, range(c, num_requests, num_clients), results))
        threads.append(thread)
    start = time.time()
    for thread in threads:
        thread.start()
    killed = None
    if kill_after is not None:
        while len(results) < kill_after:
            time.sleep(0.05)
        server.kill()
        killed = {"done_before_kill": len(results), "at_s": round(time.time() - start, 1)}
        server.start()
    for thread in threads:
        thread.join()
    elapsed = time.time() - start
    check_images(server, results)
    latencies = sorted(r["latency"] for r in results)
    return {"requests": num_requests, "done": sum(r["state"] == "done" for r in results), "seconds": round(elapsed, 1),
            "images_per_second": round(num_requests / elapsed, 2), "p50_s": round(statistics.median(latencies), 2),
            "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 2), "killed": killed}


def baseline(calls):
    """Images per second of `generate()` called in a loop, one prompt at a time, in this process."""
    from keras_sd3.models import StableDiffusion3TextToImage

    task = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes")
    task.generate(PROMPTS[0], seed=0)  # warm-up (compilation)
    start = time.time()
    for index in range(calls):
        task.generate(PROMPTS[index % len(PROMPTS)], seed=index)
    return round(calls / (time.time() - start), 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--baseline", type=int, default=24)
    args = parser.parse_args()
    os.environ.setdefault("KERAS_BACKEND", "torch")
    report = {"backend": os.environ["KERAS_BACKEND"], "max_batch": args.max_batch, "clients": args.clients}
    with tempfile.TemporaryDirectory() as folder:
        for phase, kill_after in (("steady", None), ("kill -9 at mid-run", args.requests // 2)):
            outputs = os.path.join(folder, phase.split()[0])
            os.makedirs(outputs)
            server = Server(outputs, free_port(), args.max_batch)
            server.start()
            try:
                report[phase] = run_load(server, args.requests, args.clients, kill_after)
            finally:
                server.stop()
            print(phase, report[phase], flush=True)
    report["generate_loop_images_per_second"] = baseline(args.baseline)
    report["batching_gain"] = round(report["steady"]["images_per_second"] / report["generate_loop_images_per_second"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
