#!/usr/bin/env python3
"""Daemon benchmark (docs/PERFORMANCE.md): freshness, search latency/throughput, re-embedding
vs raw embedding, and query latency during an adapter swap, against a real `rsitrd run`.

usage: bench/daemon.py --bin target/release/rsitrd --model DIR [--rs-mini ../shared/data/rs-mini]
                       [--qdrant-url http://127.0.0.1:6334]   # a Qdrant server instead of the
                                                              # embedded index (gRPC URL)

Standard library only. Starts the daemon on a throw-away data directory (embedded index,
inbox source), feeds rs-mini through the inbox one sample at a time, then measures.
"""
import argparse, base64, json, os, shutil, signal, socket, statistics, subprocess, sys
import tempfile, threading, time, urllib.error, urllib.request


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round((len(values) - 1) * p)))] if values else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    def __init__(self, base):
        self.base = base

    def call(self, method, path, body=None, timeout=600):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read()
                try:
                    return response.status, json.loads(text or b"null")
                except ValueError:
                    return response.status, text.decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rs-mini", default="../shared/data/rs-mini")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--qdrant-url", default=None,
                        help="index into this Qdrant server (gRPC) instead of the embedded engine")
    args = parser.parse_args()
    dataset = json.load(open(os.path.join(args.rs_mini, "dataset.json")))["images"]
    captions = [s["raw"] for image in dataset for s in image["sentences"]]
    work = tempfile.mkdtemp(prefix="rsitrd-daemon-bench-")
    port = free_port()
    env = dict(os.environ,
               RSITRD__MODEL__DIR=args.model, RSITRD__STORE__DIR=f"{work}/data",
               RSITRD__INBOX__DIR=f"{work}/inbox", RSITRD__INBOX__SETTLE="100ms",
               RSITRD__HTTP__LISTEN=f"127.0.0.1:{port}", RSITRD__STORE__VAL_FRACTION="0.3",
               RSITRD__TRAINING__MIN_NEW_SAMPLES="100000", RSITRD__TRAINING__STEPS=str(args.steps),
               RSITRD__TRAINING__BATCH_SIZE="4", RSITRD__GATE__MR_TOLERANCE="100",
               RSITRD_LOG="info")
    if args.qdrant_url:
        env.update(RSITRD__INDEX__BACKEND="remote", RSITRD__INDEX__URL=args.qdrant_url,
                   RSITRD__INDEX__COLLECTION=f"bench_{os.getpid()}")
    api = Api(f"http://127.0.0.1:{port}")
    log = open(f"{work}/daemon.log", "w")
    started = time.time()
    daemon = subprocess.Popen([args.bin, "run"], env=env, stderr=log, stdout=subprocess.DEVNULL)
    report = {"model": args.model, "index": args.qdrant_url or "embedded"}
    try:
        while True:
            try:
                if api.call("GET", "/readyz")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if daemon.poll() is not None:
                sys.exit(f"daemon exited: see {work}/daemon.log")
            time.sleep(0.05)
        report["startup_s"] = time.time() - started

        # Freshness: one sample at a time, rename into the inbox -> found by a filtered search.
        os.makedirs(f"{work}/inbox", exist_ok=True)
        os.makedirs(f"{work}/staging", exist_ok=True)
        fresh = []
        for image in dataset:
            name = image["filename"]
            stem, ext = name.rsplit(".", 1)
            shutil.copy(os.path.join(args.rs_mini, "images", name), f"{work}/staging/{name}")
            with open(f"{work}/staging/{stem}.txt", "w") as f:
                f.write("\n".join(s["raw"] for s in image["sentences"]))
            t0 = time.time()
            os.rename(f"{work}/staging/{stem}.txt", f"{work}/inbox/{stem}.txt")
            os.rename(f"{work}/staging/{name}", f"{work}/inbox/{name}")
            while True:
                code, found = api.call("POST", "/v1/search",
                                       {"text": "x", "k": 1, "filter": {"metadata.inbox_name": stem}})
                if code == 200 and found["results"]:
                    break
                time.sleep(0.01)
            fresh.append(time.time() - t0)
        report["freshness_s"] = {"p50": pct(fresh, 0.5), "p99": pct(fresh, 0.99), "n": len(fresh)}

        # Search latency (sequential) and throughput (4 clients).
        latencies = []
        for i in range(args.queries):
            t0 = time.time()
            code, _ = api.call("POST", "/v1/search", {"text": captions[i % len(captions)], "k": 10})
            assert code == 200
            latencies.append(time.time() - t0)
        report["search_latency_ms"] = {"p50": pct(latencies, 0.5) * 1e3, "p99": pct(latencies, 0.99) * 1e3}
        done = [0]
        def client(offset):
            for i in range(args.queries // 4):
                code, _ = api.call("POST", "/v1/search", {"text": captions[(offset + i) % len(captions)], "k": 10})
                assert code == 200
                done[0] += 1
        t0 = time.time()
        threads = [threading.Thread(target=client, args=(k * 37,)) for k in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        report["search_qps_4_clients"] = done[0] / (time.time() - t0)

        # Swap under load: searches keep running while a training run is promoted.
        stop = threading.Event()
        during, errors, mixed, versions = [], [0], [0], set()
        def load():
            i = 0
            while not stop.is_set():
                t0 = time.time()
                code, found = api.call("POST", "/v1/search", {"text": captions[i % len(captions)], "k": 5})
                i += 1
                if code != 200:
                    errors[0] += 1
                    continue
                during.append((t0, time.time() - t0))
                versions.add(found["adapter_version"])
                if any(r["adapter_version"] != found["adapter_version"] for r in found["results"]):
                    mixed[0] += 1
        loader = threading.Thread(target=load)
        loader.start()
        assert api.call("POST", "/v1/train", {})[0] == 202
        promotion_started = promotion_ended = None
        while True:
            _, status = api.call("GET", "/v1/status")
            if status["promotion"] and promotion_started is None:
                promotion_started = time.time()
            if status["adapter_version"] != 0:
                promotion_ended = time.time()
                time.sleep(1.0)  # keep the load a moment on the new version
                break
            if status["last_run"] and not status["last_run"]["promoted"]:
                sys.exit("the run was not promoted")
            time.sleep(0.05)
        stop.set()
        loader.join()
        _, status = api.call("GET", "/v1/status")
        run = status["last_run"]
        window = [d for (t, d) in during if promotion_started and t >= promotion_started - 1]
        report["swap"] = {
            "training_run_s": run["duration_s"],
            "reembed_s": promotion_ended - promotion_started if promotion_started else None,
            "reembed_samples_per_s": (len(dataset) / (promotion_ended - promotion_started)) if promotion_started else None,
            "queries_during_swap": len(window),
            "latency_during_swap_ms": {"p50": pct(window, 0.5) * 1e3 if window else None,
                                       "p99": pct(window, 0.99) * 1e3 if window else None},
            "failed_requests": errors[0], "responses_mixing_versions": mixed[0],
            "versions_seen": sorted(versions),
        }
    finally:
        daemon.send_signal(signal.SIGTERM)
        t0 = time.time()
        daemon.wait(timeout=120)
        report["sigterm_exit_s"] = time.time() - t0
        report["exit_code"] = daemon.returncode
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
