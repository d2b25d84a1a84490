//! The web pages in a real browser: headless Chromium and its WebDriver from Debian's packages
//! (`chromium`, `chromium-driver`; `.ci/run` installs them), driven with fantoccini, against
//! `rsitrd run` on the tiny CLIP with ../shared/data/rs-mini ingested. Also the sample and
//! image routes the pages use, and the Grafana dashboard and alert rules against the metric
//! names the daemon really exports. Screenshots go to `$CARGO_TARGET_TMPDIR/web/`.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::daemon::{Daemon, b64, feed_rs_mini};
use common::ingest::wait_for;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const WAIT: Duration = Duration::from_secs(60);

/// A chromedriver process and a headless Chromium session.
struct Browser {
    driver: Child,
    client: Option<Client>,
    runtime: tokio::runtime::Runtime,
}

impl Browser {
    fn start() -> Self {
        for path in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: install Debian's chromium and chromium-driver \
                 (`apt-get install chromium chromium-driver`; .ci/run does)"
            );
        }
        let port = common::daemon::free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        wait_for(Duration::from_secs(20), "chromedriver", || {
            ureq::get(&format!("{url}/status")).call().is_ok()
        });
        let runtime = common::ingest::runtime();
        let client = runtime.block_on(async {
            let mut capabilities = serde_json::Map::new();
            capabilities.insert(
                "goog:chromeOptions".into(),
                json!({
                    "binary": CHROMIUM,
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--window-size=1280,1000"],
                }),
            );
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            ClientBuilder::new(connector)
                .capabilities(capabilities)
                .connect(&url)
                .await
                .expect("a WebDriver session")
        });
        Self {
            driver,
            client: Some(client),
            runtime,
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    fn goto(&self, url: &str) {
        self.runtime.block_on(self.client().goto(url)).unwrap();
    }

    /// A script's value (`return ...;`).
    fn eval(&self, script: &str) -> Value {
        self.runtime
            .block_on(self.client().execute(script, vec![]))
            .unwrap()
    }

    /// Waits until the script returns `true`.
    fn wait_until(&self, what: &str, script: &str) {
        wait_for(WAIT, what, || self.eval(script) == Value::Bool(true));
    }

    fn text(&self, selector: &str) -> String {
        self.eval(&format!(
            "const e = document.querySelector({}); return e ? e.textContent : null;",
            json!(selector)
        ))
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    fn type_into(&self, selector: &str, text: &str) {
        self.runtime.block_on(async {
            let element = self.client().find(Locator::Css(selector)).await.unwrap();
            element.clear().await.unwrap();
            element.send_keys(text).await.unwrap();
        });
    }

    fn click(&self, selector: &str) {
        self.runtime.block_on(async {
            let element = self.client().find(Locator::Css(selector)).await.unwrap();
            element.click().await.unwrap();
        });
    }

    fn select(&self, selector: &str, value: &str) {
        self.runtime.block_on(async {
            let element = self.client().find(Locator::Css(selector)).await.unwrap();
            element.select_by_value(value).await.unwrap();
        });
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web");
        std::fs::create_dir_all(&dir).unwrap();
        let png = self.runtime.block_on(self.client().screenshot()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let _ = self.runtime.block_on(client.close());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Every result thumbnail on the page has loaded as a real image.
const THUMBS_LOADED: &str = "const imgs = [...document.querySelectorAll('#results .result img.thumb')];
    return imgs.length > 0 && imgs.every(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0);";

fn sample_ids_on_page(browser: &Browser) -> Vec<String> {
    browser
        .eval(
            "return [...document.querySelectorAll('#results .result')].map(r => r.dataset.sample);",
        )
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn search_and_status_pages_in_a_browser() {
    let temp = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::new(
        temp.path(),
        &[
            ("RSITRD__GATE__MR_TOLERANCE", "100"),
            ("RSITRD__HTTP__MAX_BODY_BYTES", "4000000"),
        ],
    );
    daemon.env.amqp = true;
    daemon.start();
    let samples = feed_rs_mini(&daemon.env.inbox, &temp.path().join("staging"));
    // A hostile input: refused with a reason, shown among the latest rejects.
    std::fs::write(temp.path().join("bad.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    std::fs::write(daemon.env.inbox.join("bad.txt"), "a broken image").unwrap();
    std::fs::rename(
        temp.path().join("bad.png"),
        daemon.env.inbox.join("bad.png"),
    )
    .unwrap();
    wait_for(WAIT * 2, "samples embedded and the reject recorded", || {
        let (_, status) = daemon.get("/v1/status");
        status["samples"]["samples"] == samples
            && status["backlog"] == 0
            && status["samples"]["rejected"] == 1
    });
    // A training run, promoted (tolerance 100), so the status page has history to show.
    let (code, _) = daemon.post("/v1/train", &json!({}));
    assert_eq!(code, 202);
    wait_for(WAIT * 3, "v1 promoted and caught up", || {
        let (_, status) = daemon.get("/v1/status");
        status["adapter_version"] == 1 && status["promotion"].is_null() && status["backlog"] == 0
    });

    check_sample_routes(&daemon);

    let browser = Browser::start();
    let base = &daemon.base;

    // --- Search page: text → images.
    browser.goto(&format!("{base}/"));
    browser.wait_until(
        "facets loaded",
        "return [...document.querySelectorAll('#f-source option')].some(o => o.value === 'inbox');",
    );
    let query = "many buildings and green trees around a playground";
    browser.type_into("#q", query);
    browser.click("#go");
    browser.wait_until("text results with their images", THUMBS_LOADED);
    let shown = sample_ids_on_page(&browser);
    let (_, api) = daemon.post("/v1/search", &json!({"text": query, "k": 24, "filter": {}}));
    let expected: Vec<String> = api["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["sample_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        shown, expected,
        "the page shows what the API ranks, in order"
    );
    assert_eq!(shown.len(), 24.min(samples));
    assert!(
        browser.text("#message").contains("adapter v1"),
        "{}",
        browser.text("#message")
    );
    let first_captions = browser.text("#results .result ul");
    assert!(
        api["results"][0]["captions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| first_captions.contains(c.as_str().unwrap())),
        "the first card shows its sample's captions"
    );
    let search_png = browser.screenshot("search.png");

    // Filters: only val samples from the inbox.
    browser.select("#f-split", "val");
    browser.select("#f-source", "inbox");
    browser.click("#go");
    let (_, val) = daemon.post(
        "/v1/search",
        &json!({"text": query, "k": 24, "filter": {"split": "val", "source": "inbox"}}),
    );
    let val_ids: Vec<String> = val["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["sample_id"].as_str().unwrap().to_string())
        .collect();
    assert!(!val_ids.is_empty() && val_ids.len() < samples);
    wait_for(WAIT, "filtered results", || {
        sample_ids_on_page(&browser) == val_ids
    });
    browser.select("#f-split", "");
    browser.select("#f-source", "");

    // --- Image → captions, from a file chosen in the drop zone.
    let mini = common::rs_mini();
    let probe = &mini[3];
    browser.runtime.block_on(async {
        let input = browser.client().find(Locator::Css("#file")).await.unwrap();
        input
            .send_keys(probe.path.canonicalize().unwrap().to_str().unwrap())
            .await
            .unwrap();
    });
    browser.wait_until(
        "caption results",
        "return document.querySelector('#results').classList.contains('captions') && \
         document.querySelectorAll('#results .result .caption').length > 0;",
    );
    let (_, by_image) = daemon.post(
        "/v1/search",
        &json!({"image_b64": b64(&std::fs::read(&probe.path).unwrap()), "k": 24, "filter": {}}),
    );
    let top_caption = by_image["results"][0]["caption"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        browser.text("#results .result .caption"),
        top_caption,
        "the page shows the API's best caption first"
    );
    browser.wait_until("caption thumbnails", THUMBS_LOADED);
    browser.screenshot("search-by-image.png");

    // Clicking a result image searches with it.
    browser.type_into("#q", query);
    browser.click("#go");
    browser.wait_until("text results again", THUMBS_LOADED);
    browser.wait_until(
        "an image grid",
        "return document.querySelector('#results').classList.contains('images');",
    );
    browser.click("#results .result img.thumb");
    browser.wait_until(
        "captions of the clicked image",
        "return document.querySelector('#results').classList.contains('captions') && \
         document.querySelectorAll('#results .result .caption').length > 0;",
    );

    // --- Status page.
    let (_, status) = daemon.get("/v1/status");
    browser.goto(&format!("{base}/status"));
    browser.wait_until(
        "the live version",
        "return document.getElementById('live-version').textContent === '1';",
    );
    let listed: BTreeSet<String> = browser
        .eval("return [...document.querySelectorAll('#versions tbody tr')].map(r => r.dataset.version);")
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let reported: BTreeSet<String> = status["versions"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(listed, reported, "the versions /v1/status reports");
    assert_eq!(
        browser.eval("return document.querySelectorAll('#chart circle.point.promoted').length;"),
        json!(1),
        "the promoted run is on the chart"
    );
    assert!(browser.text("#runs tbody").contains("v1"));
    assert!(browser.text("#switches tbody").contains("promotion"));
    let rejects = browser.text("#rejects tbody");
    assert!(
        rejects.contains("bad.png"),
        "the latest reject is listed: {rejects}"
    );
    assert!(browser.text("#sources tbody").contains("inbox"));
    assert_eq!(browser.text("#backlog"), "0");
    browser.wait_until(
        "the queue card (AMQP on)",
        "return document.getElementById('queue-detail').textContent.includes('connected');",
    );
    let status_png = browser.screenshot("status.png");

    // Rollback behind a confirmation: cancelling changes nothing, confirming switches.
    browser.click("button.rollback[data-version='0']");
    browser.wait_until(
        "the dialog",
        "return document.getElementById('confirm').open;",
    );
    browser.click("#confirm-no");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        daemon.get("/v1/status").1["adapter_version"],
        1,
        "cancelled"
    );
    browser.click("button.rollback[data-version='0']");
    browser.wait_until(
        "the dialog",
        "return document.getElementById('confirm').open;",
    );
    browser.click("#confirm-yes");
    wait_for(WAIT, "rolled back", || {
        daemon.get("/v1/status").1["adapter_version"] == 0
    });
    browser.wait_until(
        "the page follows",
        "return document.getElementById('live-version').textContent === '0';",
    );
    assert!(browser.text("#switches tbody").contains("rollback"));
    drop(browser);

    for png in [search_png, status_png] {
        assert!(std::fs::metadata(&png).unwrap().len() > 10_000, "{png:?}");
    }
    check_dashboard_and_alerts(&daemon.metrics());
}

/// `/v1/samples/{id}` and its image: records, thumbnails, originals, hostile ids.
fn check_sample_routes(daemon: &Daemon) {
    let mini = common::rs_mini();
    let bytes = std::fs::read(&mini[0].path).unwrap();
    let id = blake3::hash(&bytes).to_hex().to_string();
    let (code, record) = daemon.get(&format!("/v1/samples/{id}"));
    assert_eq!(code, 200, "{record}");
    assert_eq!(record["id"], id);
    assert_eq!(record["captions"], json!(mini[0].captions));
    assert_eq!(record["quarantined"], false);

    let original = daemon.raw("GET", &format!("/v1/samples/{id}/image?size=0"), None, &[]);
    assert_eq!(original.status, 200);
    assert_eq!(original.content_type, "image/jpeg");
    let raw = fetch_bytes(&format!("{}/v1/samples/{id}/image?size=0", daemon.base));
    assert_eq!(raw, bytes, "size=0 is the stored bytes");

    let thumbnail = fetch_bytes(&format!("{}/v1/samples/{id}/image?size=64", daemon.base));
    let decoded = image::load_from_memory(&thumbnail).unwrap();
    assert_eq!(decoded.width().max(decoded.height()), 64);
    let again = fetch_bytes(&format!("{}/v1/samples/{id}/image?size=64", daemon.base));
    assert_eq!(thumbnail, again);

    let unknown = "0".repeat(64);
    assert_eq!(daemon.get(&format!("/v1/samples/{unknown}")).0, 404);
    assert_eq!(daemon.get(&format!("/v1/samples/{unknown}/image")).0, 404);
    for hostile in [
        "..%2F..%2Fetc%2Fpasswd",
        "abc",
        &"g".repeat(64),
        &"a".repeat(5000),
    ] {
        let (code, body) = daemon.get(&format!("/v1/samples/{hostile}"));
        assert_eq!(code, 400, "{hostile}: {body}");
        assert!(body["error"].is_string());
        assert_eq!(daemon.get(&format!("/v1/samples/{hostile}/image")).0, 400);
    }
    for query in ["size=5000", "size=-1", "size=abc", "other=1"] {
        let (code, body) = daemon.get(&format!("/v1/samples/{id}/image?{query}"));
        assert_eq!(code, 400, "{query}: {body}");
    }
    let (code, facets) = daemon.get("/v1/facets");
    assert_eq!(code, 200);
    assert_eq!(facets["source"], json!(["inbox"]));
    assert_eq!(facets["metadata"]["set"], json!(["rs-mini"]));
    let (code, _) = daemon.get("/v1/history?limit=100000");
    assert_eq!(code, 400);
}

fn fetch_bytes(url: &str) -> Vec<u8> {
    let mut response = ureq::get(url).call().unwrap();
    response.body_mut().read_to_vec().unwrap()
}

/// Every `rsitrd_*` series the dashboard and the alert rules name is one the daemon exports.
fn check_dashboard_and_alerts(exposition: &str) {
    let exported: BTreeSet<&str> = exposition
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo_root().join("docs/grafana/rsitrd.json")).unwrap(),
    )
    .unwrap();
    let mut expressions = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            expressions.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(expressions.len() >= 10);
    let rules =
        std::fs::read_to_string(common::repo_root().join("docs/grafana/alerts.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    let rule_exprs: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr: "))
        .collect();
    assert_eq!(alerts.len(), rule_exprs.len(), "one expr per alert");
    for wanted in [
        "RsitrdBacklogGrowing",
        "RsitrdAmqpDisconnected",
        "RsitrdGateRefusingRepeatedly",
        "RsitrdQuarantineGrowing",
    ] {
        assert!(alerts.contains(&wanted), "alert {wanted}");
    }
    expressions.extend(rule_exprs.iter().map(|e| e.to_string()));
    let mut named = BTreeSet::new();
    for expression in &expressions {
        let mut rest = expression.as_str();
        while let Some(at) = rest.find("rsitrd_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            named.insert(name);
        }
    }
    let missing: Vec<&String> = named
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "named but not exported: {missing:?}\nexported: {exported:?}"
    );
    assert!(named.len() >= 15, "{named:?}");
}

#[test]
fn pages_refuse_data_without_the_token() {
    let temp = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::new(temp.path(), &[("RSITRD_API_TOKEN", "s3cret-token")]);
    daemon.start();
    // The pages hold no data: they load without the token; the API refuses.
    for page in ["/", "/status", "/ui/search.js"] {
        let reply = daemon.raw("GET", page, None, &[]);
        assert_eq!(reply.status, 200, "{page}");
    }
    for route in [
        "/v1/status",
        "/v1/facets",
        "/v1/history",
        &format!("/v1/samples/{}/image", "0".repeat(64)),
    ] {
        assert_eq!(daemon.get(route).0, 401, "{route}");
    }
    let browser = Browser::start();
    browser.goto(&format!("{}/status", daemon.base));
    browser.wait_until(
        "the refusal",
        "const m = document.getElementById('message'); \
         return m.classList.contains('error') && m.textContent.includes('token');",
    );
    assert_eq!(
        browser.text("#live-version"),
        "–",
        "no data without the token"
    );
    assert!(
        !browser
            .eval("return location.href;")
            .as_str()
            .unwrap()
            .contains("s3cret"),
        "never in the URL"
    );
    browser.type_into("#token", "s3cret-token");
    browser.click("#token-form button");
    browser.wait_until(
        "data with the token",
        "return document.getElementById('live-version').textContent === '0';",
    );
    assert!(
        !browser
            .eval("return location.href;")
            .as_str()
            .unwrap()
            .contains("s3cret")
    );
    // Stored in the browser: the search page uses it too.
    browser.goto(&format!("{}/", daemon.base));
    browser.type_into("#q", "a river");
    browser.click("#go");
    browser.wait_until(
        "an answer",
        "return document.getElementById('message').textContent.includes('0 images');",
    );
    browser.screenshot("token.png");
}
