#!/usr/bin/env python3
"""The daemon end to end on one device, with no broker: ingest -> train -> promote -> search.

Used by tests/cuda_check.sh on a GPU machine (`--device cuda`); runs the same way on a CPU
(`--device cpu`) to check the script itself. Starts `BIN run` on the tiny CLIP fixture with an
embedded index, moves the rs-mini samples into its inbox, waits until every sample is
embedded, asks for a training run, waits for the candidate to be promoted (adapter version 1)
and the index re-embedded with it, then searches by text and by image. Prints one JSON line
of timings; exits non-zero, with the daemon's log tail, on any failure.

Standard library only (the device machine has Python but nothing installed from PyPI).
"""

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Failure(Exception):
    pass


def parse(raw):
    """The body as JSON where it is JSON (/readyz answers plain text)."""
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return raw.decode(errors="replace")


def call(base, method, path, body=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, parse(response.read())
    except urllib.error.HTTPError as error:
        return error.code, parse(error.read())


def wait_for(what, timeout, condition, daemon):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise Failure(f"the daemon exited ({daemon.returncode}) while waiting for {what}")
        try:
            if condition():
                return
        except (urllib.error.URLError, ConnectionError, socket.timeout):
            pass
        time.sleep(0.2)
    raise Failure(f"timed out after {timeout} s waiting for {what}")


def feed(inbox, staging, mini):
    """Moves each rs-mini image and its captions into the inbox (renames, as producers do)."""
    dataset = json.load(open(os.path.join(mini, "dataset.json")))
    for image in dataset["images"]:
        name = image["filename"]
        stem, ext = name.rsplit(".", 1)
        shutil.copy(os.path.join(mini, "images", name), os.path.join(staging, name))
        sidecar = {
            "captions": [s["raw"] for s in image["sentences"]],
            "metadata": {"set": "rs-mini"},
        }
        with open(os.path.join(staging, stem + ".json"), "w") as f:
            json.dump(sidecar, f)
        os.rename(os.path.join(staging, stem + ".json"), os.path.join(inbox, stem + ".json"))
        os.rename(os.path.join(staging, name), os.path.join(inbox, f"{stem}.{ext}"))
    return dataset["images"]


def run(args, root, log):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    inbox, staging = os.path.join(root, "inbox"), os.path.join(root, "staging")
    os.makedirs(inbox)
    os.makedirs(staging)
    env = dict(os.environ)
    env.update({
        "RSITRD__MODEL__DIR": args.model,
        "RSITRD__MODEL__DEVICE": args.device,
        "RSITRD__STORE__DIR": os.path.join(root, "data"),
        "RSITRD__STORE__VAL_FRACTION": "0.3",
        "RSITRD__INBOX__ENABLED": "true",
        "RSITRD__INBOX__DIR": inbox,
        "RSITRD__INBOX__SETTLE": "200ms",
        "RSITRD__AMQP__ENABLED": "false",
        "RSITRD__INDEX__BACKEND": "embedded",
        "RSITRD__HTTP__LISTEN": f"127.0.0.1:{port}",
        # Training starts when asked (POST /v1/train), not on a sample count.
        "RSITRD__TRAINING__MIN_NEW_SAMPLES": "100000",
        "RSITRD__TRAINING__STEPS": str(args.steps),
        "RSITRD__TRAINING__BATCH_SIZE": "4",
        "RSITRD__TRAINING__LR": "0.001",
        # The tiny random model's recall is noise: the gate must not stand in the way here
        # (its refusals are tested in tests/daemon.rs).
        "RSITRD__GATE__MR_TOLERANCE": "100",
        "RSITRD_API_TOKEN": "",
        "RSITRD_LOG": "info",
    })
    timings = {"device": args.device}
    started = time.monotonic()
    daemon = subprocess.Popen([args.bin, "run"], env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_for("readyz", 120, lambda: call(base, "GET", "/readyz", timeout=5)[0] == 200, daemon)
        timings["ready_s"] = round(time.monotonic() - started, 2)

        t = time.monotonic()
        images = feed(inbox, staging, args.mini)

        def all_embedded():
            status = call(base, "GET", "/v1/status")[1]
            return status["samples"]["samples"] == len(images) and status["backlog"] == 0

        wait_for("every sample embedded", 300, all_embedded, daemon)
        timings["ingest_s"] = round(time.monotonic() - t, 2)
        status = call(base, "GET", "/v1/status")[1]
        if status["adapter_version"] != 0:
            raise Failure(f"adapter version before training: {status}")
        points = status["index_points"]

        t = time.monotonic()
        code, answer = call(base, "POST", "/v1/train", {})
        if code >= 300:
            raise Failure(f"POST /v1/train: {code} {answer}")
        wait_for("promotion to adapter version 1", 600,
                 lambda: call(base, "GET", "/v1/status")[1]["adapter_version"] == 1, daemon)
        wait_for("the index re-embedded", 300,
                 lambda: call(base, "GET", "/v1/status")[1]["index_points"] == points, daemon)
        timings["train_promote_s"] = round(time.monotonic() - t, 2)

        code, found = call(base, "POST", "/v1/search", {"text": "a football field", "k": 5})
        if code != 200 or found["adapter_version"] != 1 or len(found["results"]) != 5:
            raise Failure(f"text search after promotion: {code} {found}")
        first = os.path.join(args.mini, "images", images[0]["filename"])
        query = base64.b64encode(open(first, "rb").read()).decode()
        code, found = call(base, "POST", "/v1/search", {"image_b64": query, "k": 3})
        if code != 200 or found["adapter_version"] != 1 or not found["results"]:
            raise Failure(f"image search after promotion: {code} {found}")
        timings["samples"] = len(images)
        timings["index_points"] = points
        timings["total_s"] = round(time.monotonic() - started, 2)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                raise Failure("the daemon did not stop within 60 s of SIGTERM")
    if daemon.returncode != 0:
        raise Failure(f"the daemon exited with {daemon.returncode} after SIGTERM")
    return timings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", default="target/release/rsitrd")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tests/fixtures/tiny-clip")
    parser.add_argument("--mini", default=os.path.join(
        os.environ.get("RSITRD_SHARED_DIR", "../shared"), "data/rs-mini"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--log", help="where the daemon's log goes (default: a temporary file)")
    args = parser.parse_args()
    args.bin, args.model, args.mini = (os.path.abspath(p) for p in (args.bin, args.model, args.mini))
    with tempfile.TemporaryDirectory(prefix="rsitrd-e2e-") as root:
        log_path = args.log or os.path.join(root, "daemon.log")
        with open(log_path, "ab") as log:
            try:
                timings = run(args, root, log)
            except Failure as failure:
                log.flush()
                tail = open(log_path, errors="replace").read()[-4000:]
                print(f"FAILED: {failure}\n--- daemon log (tail) ---\n{tail}", file=sys.stderr)
                sys.exit(1)
    print(json.dumps(timings))


if __name__ == "__main__":
    main()
