#!/usr/bin/env python3
"""Web pages benchmark (docs/PERFORMANCE.md): what the search and status pages cost on a
corpus of N samples, beside the same calls on a small corpus in the same run.

usage: bench/web.py --bin target/release/rsitrd --model DIR [--samples 100000] [--small 1000]

Standard library only. For each corpus size: a store filled by `rsitrd fill-store`, a daemon
started on it (embedded index), timed until the whole corpus is searchable, then per page
load what the browser does: the search (k=24), the 24 thumbnails fetched 6 at a time (as a
browser does per host) cold and then cached, facets, and the status page's calls.
"""
import argparse, concurrent.futures, json, os, shutil, socket, statistics, subprocess
import tempfile, time, urllib.error, urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return response.status, response.read()


def timed(fn, repeat):
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def summary(values):
    values = sorted(values)
    return {"p50_ms": round(statistics.median(values), 2),
            "p95_ms": round(values[min(len(values) - 1, int(0.95 * (len(values) - 1)))], 2)}


def run(args, samples):
    work = tempfile.mkdtemp(prefix="rsitrd-web-bench-")
    port = free_port()
    env = dict(os.environ, RSITRD__MODEL__DIR=args.model, RSITRD__STORE__DIR=f"{work}/data",
               RSITRD__INBOX__ENABLED="false", RSITRD__HTTP__LISTEN=f"127.0.0.1:{port}",
               RSITRD__TRAINING__MIN_NEW_SAMPLES="100000000", RSITRD__INDEX__EMBED_BATCH="512",
               RSITRD_LOG="warn", RSITRD_API_TOKEN="")
    subprocess.run([args.bin, "fill-store", "--samples", str(samples)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    # The real remote-sensing images too (256-600 px JPEG and TIFF): the synthetic tiles are
    # 4x4 pixels, too small to show what making a thumbnail costs.
    subprocess.run([args.bin, "import", "--dataset", f"{args.rs_mini}/dataset.json",
                    "--images", f"{args.rs_mini}/images"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    log = open(f"{work}/daemon.log", "w")
    started = time.time()
    daemon = subprocess.Popen([args.bin, "run"], env=env, stderr=log, stdout=subprocess.DEVNULL)
    result = {"samples": samples}
    try:
        while True:
            try:
                code, body = call(base, "GET", "/v1/status")
                status = json.loads(body)
                if code == 200 and status["backlog"] == 0 and status["index_points"]:
                    break
            except (urllib.error.URLError, ConnectionError, KeyError):
                pass
            time.sleep(1)
        result["indexed_in_s"] = round(time.time() - started, 1)
        result["index_points"] = status["index_points"]
        queries = [f"synthetic tile number {i * 7919 % samples}" for i in range(args.queries)]

        def search(q):
            return json.loads(call(base, "POST", "/v1/search", {"text": q, "k": 24, "filter": {}})[1])

        answers = []
        result["search_k24"] = summary(timed(lambda: answers.append(search(queries[len(answers)])), args.queries))

        def thumbnails(ids):
            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                list(pool.map(lambda i: call(base, "GET", f"/v1/samples/{i}/image?size=256"), ids))

        pages = [[r["sample_id"] for r in a["results"]] for a in answers[: args.pages]]

        def page_times():
            out = []
            for page in pages:
                start = time.perf_counter()
                thumbnails(page)
                out.append((time.perf_counter() - start) * 1000)
            return out

        cold = page_times()   # every thumbnail made (decoded, resized, encoded)
        warm = page_times()   # the same pages again: from the cache
        result["synthetic_page_24_thumbnails_cold"] = summary(cold)
        result["synthetic_page_24_thumbnails_cached"] = summary(warm)
        # The rs-mini images: each made once per size (cold), then served from the cache.
        real = [json.loads(call(base, "POST", "/v1/search", {"text": "x", "k": 1000,
                                                             "filter": {"source": "import"}})[1])]
        real_ids = [r["sample_id"] for r in real[0]["results"]]
        result["real_images"] = len(real_ids)
        cold_one, warm_one = [], []
        for size in (256, 192, 128):
            for i in real_ids:
                start = time.perf_counter()
                call(base, "GET", f"/v1/samples/{i}/image?size={size}")
                cold_one.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                call(base, "GET", f"/v1/samples/{i}/image?size={size}")
                warm_one.append((time.perf_counter() - start) * 1000)
        result["real_thumbnail_cold"] = summary(cold_one)
        result["real_thumbnail_cached"] = summary(warm_one)
        result["facets"] = summary(timed(lambda: call(base, "GET", "/v1/facets"), 50))
        result["status_page_calls"] = summary(timed(lambda: (call(base, "GET", "/v1/status"),
                                                             call(base, "GET", "/v1/history?limit=100"),
                                                             call(base, "GET", "/metrics")), 50))
        result["page_html"] = summary(timed(lambda: call(base, "GET", "/"), 50))
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--samples", type=int, default=100000)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--pages", type=int, default=30)
    parser.add_argument("--rs-mini", default="../shared/data/rs-mini")
    args = parser.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    report = {"cpu": cpu, "runs": [run(args, args.small), run(args, args.samples)]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
