#!/usr/bin/env python3
"""Serving-core benchmark (issue #10, docs/PERFORMANCE.md), against a real `rsitrd run`.

usage:
  bench/core.py swap   --bin B --model DIR      # rollback/roll-forward time, RSS and search
                                                # p50/p99 (8 clients) during a promotion
  bench/core.py ledger --bin B --data DIR       # /v1/status latency and training-run start-up
                                                # on a store filled by `rsitrd fill-store`

Standard library only; run it with the binary before and after a change, back to back.
`ledger` leaves the daemon's rows in DIR: give each binary its own copy, or run the older
binary first (a newer one migrates the older one's state.json).
"""
import argparse, json, os, shutil, socket, statistics, subprocess, sys, tempfile, threading
import time, urllib.error, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from daemon import Api, free_port, pct  # noqa: E402  (the daemon benchmark's helpers)


def call(base, method, path, body=None, timeout=600):
    return Api(base).call(method, path, body, timeout)


def rss_mib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def start(binary, env, log_path):
    port = free_port()
    env = dict(os.environ, **env, RSITRD__HTTP__LISTEN=f"127.0.0.1:{port}", RSITRD_LOG="info")
    base = f"http://127.0.0.1:{port}"
    log = open(log_path, "a")
    started = time.time()
    daemon = subprocess.Popen([binary, "run"], env=env, stderr=log, stdout=subprocess.DEVNULL)
    while True:
        try:
            if call(base, "GET", "/readyz")[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        if daemon.poll() is not None:
            sys.exit(f"daemon exited: see {log_path}")
        time.sleep(0.05)
    return daemon, base, time.time() - started


def stop(daemon):
    daemon.terminate()
    daemon.wait(timeout=120)


def wait(what, predicate, timeout=1800, every=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(every)
    sys.exit(f"timed out: {what}")


def swap(args):
    work = tempfile.mkdtemp(prefix="rsitrd-core-bench-")
    dataset = json.load(open(os.path.join(args.rs_mini, "dataset.json")))["images"]
    inbox = f"{work}/inbox"
    env = dict(RSITRD__MODEL__DIR=args.model, RSITRD__STORE__DIR=f"{work}/data",
               RSITRD__INBOX__ENABLED="true", RSITRD__INBOX__DIR=inbox, RSITRD__INBOX__SETTLE="100ms",
               RSITRD__STORE__VAL_FRACTION="0.3", RSITRD__TRAINING__MIN_NEW_SAMPLES="100000",
               RSITRD__TRAINING__STEPS=str(args.steps), RSITRD__TRAINING__BATCH_SIZE="4",
               RSITRD__GATE__MR_TOLERANCE="100", RSITRD__INDEX__KEEP_VERSIONS="3",
               RSITRD__HTTP__MAX_CONCURRENT_ENCODES="8")
    daemon, base, startup = start(args.bin, env, f"{work}/daemon.log")
    report = {"model": args.model, "startup_s": round(startup, 2)}
    try:
        staging = f"{work}/staging"
        os.makedirs(staging)
        os.makedirs(inbox, exist_ok=True)
        for image in dataset:
            stem, ext = os.path.splitext(image["filename"])
            shutil.copy(os.path.join(args.rs_mini, "images", image["filename"]), staging)
            with open(f"{staging}/{stem}.txt", "w") as f:
                f.write("\n".join(s["raw"] for s in image["sentences"]) + "\n")
            os.rename(f"{staging}/{stem}.txt", f"{inbox}/{stem}.txt")
            os.rename(f"{staging}/{image['filename']}", f"{inbox}/{image['filename']}")
        wait("embedded", lambda: (lambda s: s["samples"]["samples"] == len(dataset)
                                  and s["backlog"] == 0)(call(base, "GET", "/v1/status")[1]))
        report["rss_idle_mib"] = round(rss_mib(daemon.pid), 1)

        # A promotion with 8 clients searching throughout; RSS sampled every 20 ms.
        stop_flag, latencies, errors, peak = threading.Event(), [], [], [0.0]

        def client():
            while not stop_flag.is_set():
                t = time.time()
                code, body = call(base, "POST", "/v1/search", {"text": "a bridge over a river", "k": 10})
                if code != 200:
                    errors.append(code)
                else:
                    latencies.append(time.time() - t)

        def sampler():
            while not stop_flag.is_set():
                peak[0] = max(peak[0], rss_mib(daemon.pid) or 0)
                time.sleep(0.02)

        threads = [threading.Thread(target=client) for _ in range(8)] + [threading.Thread(target=sampler)]
        for thread in threads:
            thread.start()
        t0 = time.time()
        assert call(base, "POST", "/v1/train", {})[0] == 202
        wait("promoted", lambda: call(base, "GET", "/v1/status")[1]["adapter_version"] == 1)
        report["train_and_promote_s"] = round(time.time() - t0, 2)
        stop_flag.set()
        for thread in threads:
            thread.join()
        report["rss_peak_during_promotion_mib"] = round(peak[0], 1)
        report["search_during_promotion"] = {
            "queries": len(latencies), "errors": len(errors),
            "p50_ms": round(pct(latencies, 0.5) * 1000, 1),
            "p99_ms": round(pct(latencies, 0.99) * 1000, 1)}

        # Swaps: rollback to v0 and back to v1, through the API, timed end to end.
        back, forward = [], []
        for _ in range(args.swaps):
            t = time.time()
            code, body = call(base, "POST", "/v1/rollback", {"to": 0})
            back.append(time.time() - t)
            assert code == 200, body
            t = time.time()
            code, body = call(base, "POST", "/v1/rollback", {"to": 1})
            forward.append(time.time() - t)
            assert code == 200, body
        report["rollback_ms"] = {"median": round(statistics.median(back) * 1000, 1),
                                 "max": round(max(back) * 1000, 1)}
        report["roll_forward_ms"] = {"median": round(statistics.median(forward) * 1000, 1),
                                     "max": round(max(forward) * 1000, 1)}
        report["rss_peak_process_mib"] = round(rss_mib(daemon.pid, "VmHWM"), 1)
    finally:
        stop(daemon)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))


def ledger(args):
    env = dict(RSITRD__MODEL__DIR=args.model, RSITRD__STORE__DIR=args.data,
               RSITRD__STORE__VAL_FRACTION=args.val_fraction,
               RSITRD__TRAINING__MIN_NEW_SAMPLES="100000000", RSITRD__TRAINING__STEPS="1",
               RSITRD__INBOX__ENABLED="false")
    log_path = os.path.join(args.data, f"bench-{os.getpid()}.log")
    daemon, base, startup = start(args.bin, env, log_path)
    report = {"binary": args.bin, "startup_s": round(startup, 2)}
    try:
        status = call(base, "GET", "/v1/status")[1]
        report["samples"] = status["samples"]["samples"]
        latencies = []
        for _ in range(args.status_calls):
            t = time.time()
            code, _ = call(base, "GET", "/v1/status")
            assert code == 200
            latencies.append(time.time() - t)
        report["status_ms"] = {"p50": round(pct(latencies, 0.5) * 1000, 1),
                               "p99": round(pct(latencies, 0.99) * 1000, 1)}
        # Training-run start-up: the request until the run has picked its new and replayed
        # samples (the `training run` log line); both binaries poll their trigger every second.
        offset = os.path.getsize(log_path)
        t = time.time()
        assert call(base, "POST", "/v1/train", {})[0] == 202

        def logged():
            with open(log_path) as log:
                log.seek(offset)
                return "training run" in log.read()
        wait("training run started", logged, timeout=3600, every=0.01)
        report["train_request_to_run_start_s"] = round(time.time() - t, 2)
    finally:
        stop(daemon)
    print(json.dumps(report, indent=1))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("swap")
    p.add_argument("--bin", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--rs-mini", default="../shared/data/rs-mini")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--swaps", type=int, default=5)
    p = sub.add_parser("ledger")
    p.add_argument("--bin", required=True)
    p.add_argument("--model", default="tests/fixtures/tiny-clip")
    p.add_argument("--data", required=True)
    p.add_argument("--val-fraction", default="0.01")
    p.add_argument("--status-calls", type=int, default=50)
    args = parser.parse_args()
    {"swap": swap, "ledger": ledger}[args.what](args)


if __name__ == "__main__":
    main()
