//! Pages in a real browser, headless Chromium (installed with apt-get when missing):
//! - the live drop page: Chromium loads `/live/drops/{id}` from the app on a real socket while buyers reserve, pay
//!   and cancel, and the test reads the page's numbers through the DevTools protocol: they must change during the
//!   drop without a reload and end at the drop's final counts. A phone-sized screenshot mid-drop goes to
//!   `reports/live-drop-mid.png`. Then the drop's report page: its chart lines must have a point per second and be
//!   drawn across the chart (`reports/drop-report.png`);
//! - the load harness's HTML report, offline: a short goose drop run against the real binary writes it, Chromium
//!   opens the file with the network cut (DevTools `Network.emulateNetworkConditions`, and the CDN is checked to be
//!   unreachable from the page), and every chart must be drawn (an ECharts instance with data and ink on its canvas).
//!   The same report in goose's own form (ECharts from the CDN) must draw none, so the check cannot pass by a
//!   network it was not meant to have. Screenshots: `<target>/tmp/load-report-offline.png` and
//!   `<target>/tmp/load-report-cdn-offline.png`.
//!
//! Chromium is driven over `--remote-debugging-pipe` (DevTools messages on fds 3 and 4, NUL-separated), which a
//! `bash -c 'exec chromium ... 3<&0 4>&1'` maps to the child's stdin and stdout: no websocket client needed.
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the fault or load, and every check"
)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{drop_state, pay, reserve, TestApp};
use parking_lot::Mutex;
use serde_json::{json, Value};
use shell_api::auth::Role;
use shell_api::config::EngineArgs;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

/// The whole test must end within this (browser start included).
const TEST_LIMIT: Duration = Duration::from_secs(90);

/// Chromium's binary: `CHROMIUM_BIN`, else Debian's, installed when missing and we may.
fn chromium() -> String {
    if let Ok(bin) = std::env::var("CHROMIUM_BIN") {
        return bin;
    }
    for bin in ["/usr/lib/chromium/chromium", "/usr/bin/chromium"] {
        if std::path::Path::new(bin).exists() {
            return bin.to_owned();
        }
    }
    // Both browser tests run at once in their own processes: on a fresh machine the second one's apt-get found
    // dpkg locked by the first and failed the first run. One lock file serialises the installs, and the second
    // finds Chromium there.
    let status = std::process::Command::new("flock")
        .args([
            "/tmp/flashsale-chromium-install.lock",
            "sh",
            "-c",
            "[ -x /usr/bin/chromium ] || { apt-get update -qq \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }",
        ])
        .status()
        .expect("running flock and apt-get");
    assert!(
        status.success(),
        "apt-get install chromium failed (needs root)"
    );
    "/usr/lib/chromium/chromium".to_owned()
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A DevTools session with one page.
struct Browser {
    child: tokio::process::Child,
    stdin: tokio::sync::Mutex<tokio::process::ChildStdin>,
    pending: Pending,
    next_id: AtomicU64,
    session: String,
    _profile: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Browser {
    /// A phone, 412 x 915 CSS pixels.
    async fn launch() -> Self {
        Self::launch_as(
            json!({ "width": 412, "height": 915, "deviceScaleFactor": 2, "mobile": true }),
        )
        .await
    }

    /// A page with `metrics` (`Emulation.setDeviceMetricsOverride`).
    async fn launch_as(metrics: Value) -> Self {
        let bin = chromium();
        let profile =
            std::env::temp_dir().join(format!("fs-chromium-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&profile).unwrap();
        let script = format!(
            "exec '{bin}' --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
             --disable-background-networking --disable-component-update --disable-sync \
             --disable-dev-shm-usage --remote-debugging-pipe --user-data-dir='{}' about:blank \
             3<&0 4>&1 0</dev/null 1>/dev/null 2>/dev/null",
            profile.display()
        );
        let mut child = tokio::process::Command::new("bash")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn chromium");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let pending: Pending = Arc::default();
        let routes = Arc::clone(&pending);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout);
            let mut message = Vec::new();
            loop {
                message.clear();
                match reader.read_until(0, &mut message).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if message.last() == Some(&0) {
                    message.pop();
                }
                let Ok(value) = serde_json::from_slice::<Value>(&message) else {
                    continue;
                };
                if let Some(id) = value["id"].as_u64() {
                    if let Some(reply) = routes.lock().remove(&id) {
                        let _ = reply.send(value);
                    }
                }
            }
        });
        let mut browser = Self {
            child,
            stdin: tokio::sync::Mutex::new(stdin),
            pending,
            next_id: AtomicU64::new(1),
            session: String::new(),
            _profile: TempDir(profile),
        };
        let target = browser
            .call(
                "Target.createTarget",
                json!({ "url": "about:blank" }),
                false,
            )
            .await;
        let target = target["targetId"].as_str().unwrap().to_owned();
        let attached = browser
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target, "flatten": true }),
                false,
            )
            .await;
        browser.session = attached["sessionId"].as_str().unwrap().to_owned();
        browser
            .call("Emulation.setDeviceMetricsOverride", metrics, true)
            .await;
        browser
    }

    /// Sends one command (to the page when `page`) and returns its `result`.
    async fn call(&self, method: &str, params: Value, page: bool) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({ "id": id, "method": method, "params": params });
        if page {
            message["sessionId"] = json!(self.session);
        }
        let (reply, answer) = oneshot::channel();
        self.pending.lock().insert(id, reply);
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        {
            let mut stdin = self.stdin.lock().await;
            stdin.write_all(&bytes).await.unwrap();
            stdin.flush().await.unwrap();
        }
        let value = tokio::time::timeout(Duration::from_secs(20), answer)
            .await
            .unwrap_or_else(|_| panic!("chromium did not answer {method}"))
            .unwrap();
        assert!(value.get("error").is_none(), "{method}: {value}");
        value["result"].clone()
    }

    async fn eval(&self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
                true,
            )
            .await;
        result["result"]["value"].clone()
    }

    /// The numbers the page shows now.
    async fn numbers(&self) -> Value {
        self.eval(
            "(() => { const t = (id) => document.getElementById(id).textContent;
               return { available: t('available'), held: t('held'), sold: t('sold'), stock: t('stock'),
                        countdown: t('countdown'), label: t('countdown-label'), rate: t('rate'), eta: t('eta'),
                        events: Number(document.body.dataset.events || 0), status: document.body.dataset.status,
                        link: t('link-text') }; })()",
        )
        .await
    }

    async fn screenshot(&self, path: &std::path::Path) {
        self.capture(path, json!({ "format": "png" })).await;
    }

    /// The whole page, not only the viewport.
    async fn screenshot_page(&self, path: &std::path::Path) {
        let layout = self.call("Page.getLayoutMetrics", json!({}), true).await;
        let size = &layout["cssContentSize"];
        let clip =
            json!({ "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1 });
        self.capture(
            path,
            json!({ "format": "png", "captureBeyondViewport": true, "clip": clip }),
        )
        .await;
    }

    async fn capture(&self, path: &std::path::Path, params: Value) {
        let shot = self.call("Page.captureScreenshot", params, true).await;
        let png = base64_decode(shot["data"].as_str().unwrap());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    async fn close(mut self) {
        let _ = self.call("Browser.close", json!({}), false).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// Standard base64 (the screenshot's encoding), without a dependency for one test.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = text
        .bytes()
        .filter(|&c| c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n: u32 = 0;
        for (i, &c) in chunk.iter().enumerate() {
            n |= u32::from(value(c)) << (18 - 6 * i);
        }
        let [_, a, b, c] = n.to_be_bytes();
        out.push(a);
        if chunk.len() > 2 {
            out.push(b);
        }
        if chunk.len() > 3 {
            out.push(c);
        }
    }
    out
}

fn as_number(text: &Value) -> u64 {
    text.as_str().unwrap().replace(',', "").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_follows_a_drop_in_headless_chromium() {
    tokio::time::timeout(TEST_LIMIT, run())
        .await
        .expect("browser test took too long");
}

async fn run() {
    let app = Arc::new(
        TestApp::with_engine_args(EngineArgs {
            reaper_interval_ms: 100,
            ..EngineArgs::default()
        })
        .await,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = app.router.clone();
    tokio::spawn(async move {
        axum::serve(
            listener,
            axum::ServiceExt::<axum::extract::Request>::into_make_service(router),
        )
        .await
    });

    // The browser first: on a fresh machine this installs Chromium, which can take longer than the countdown.
    let browser = Browser::launch().await;

    const STOCK: u32 = 40;
    let seller = app.member(Role::Seller).await;
    let product = app.product(&seller, 59_000).await;
    let opens_at = chrono::Utc::now() + chrono::Duration::seconds(4);
    let drop = TestApp::drop(
        &app,
        &seller,
        json!({ "product_id": product, "stock": STOCK, "opens_at": opens_at.to_rfc3339(),
                    "per_member_limit": 1, "hold_seconds": 60 }),
    )
    .await;
    let id = drop["id"].as_str().unwrap().to_owned();

    browser
        .call(
            "Page.navigate",
            json!({ "url": format!("{base}/live/drops/{id}") }),
            true,
        )
        .await;
    // Before the opening: the countdown runs and the stream is live.
    let started = Instant::now();
    let before = loop {
        let numbers = browser.numbers().await;
        if numbers["link"] == "live" && numbers["events"].as_u64() >= Some(1) {
            break numbers;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the page never went live: {numbers}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(before["status"], "scheduled", "{before}");
    assert_eq!(before["label"], "Opens in");
    assert_eq!(as_number(&before["available"]), u64::from(STOCK));
    assert_eq!(as_number(&before["stock"]), u64::from(STOCK));

    // The drop: a buyer every 60 ms from the opening; most pay, every fifth cancels.
    let buyers = {
        let mut buyers = Vec::new();
        for _ in 0..STOCK + 5 {
            buyers.push(app.member(Role::Customer).await);
        }
        buyers
    };
    let wait = (opens_at - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(100)).await;
    let sale = {
        let (app, drop) = (Arc::clone(&app), drop.clone());
        tokio::spawn(async move {
            for (n, buyer) in buyers.iter().enumerate() {
                let held = reserve(&app, buyer, &drop, 1).await;
                if held.status == axum::http::StatusCode::CREATED {
                    let hold = held.body["id"].as_str().unwrap().to_owned();
                    if n % 5 == 4 {
                        common::cancel(&app, buyer, &hold).await;
                    } else {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        pay(&app, buyer, &hold, "tok_ok").await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        })
    };
    // Sample the page while it sells; one screenshot mid-drop.
    let mut seen_sold = std::collections::BTreeSet::new();
    let mut shot = false;
    let screenshot =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../reports/live-drop-mid.png");
    while !sale.is_finished() {
        let numbers = browser.numbers().await;
        let sold = as_number(&numbers["sold"]);
        let available = as_number(&numbers["available"]);
        let held = as_number(&numbers["held"]);
        assert_eq!(
            available + held + sold,
            u64::from(STOCK),
            "conservation on the page: {numbers}"
        );
        seen_sold.insert(sold);
        if !shot && sold >= u64::from(STOCK) / 3 {
            browser.screenshot(&screenshot).await;
            shot = true;
            eprintln!("mid-drop page: {numbers}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sale.await.unwrap();
    assert!(shot, "a screenshot mid-drop");
    assert!(
        seen_sold.len() >= 4,
        "the page's numbers changed as it sold: {seen_sold:?}"
    );

    // The end: the page shows the drop's final counts, without a reload.
    let last = drop_state(&app, &drop).await;
    let want = (
        last["available"].as_u64().unwrap(),
        last["held"].as_u64().unwrap(),
        last["sold"].as_u64().unwrap(),
    );
    assert_eq!(want.1, 0, "every hold paid or cancelled");
    let started = Instant::now();
    let end = loop {
        let numbers = browser.numbers().await;
        let got = (
            as_number(&numbers["available"]),
            as_number(&numbers["held"]),
            as_number(&numbers["sold"]),
        );
        if got == want {
            break numbers;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "page stuck at {numbers}, drop at {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("final page: {end}");
    assert_eq!(end["status"], last["status"]);
    let navigations = browser
        .eval("performance.getEntriesByType('navigation').length")
        .await;
    assert_eq!(navigations, 1, "no reload");

    // The drop's report page, drawn in the browser: a chart line per series with a point per second, laid out with
    // a width (rendered, not just present), and a phone-sized screenshot of it.
    app.state.engine.record_report().await;
    app.state.engine.writer().flush().await.unwrap();
    let report = app
        .call(
            "GET",
            &format!("/api/v1/drops/{id}/report"),
            Some(&seller.token),
            None,
        )
        .await;
    let seconds = report.body["series"].as_array().unwrap().len();
    assert!(seconds >= 2, "{}", report.body);
    browser
        .call(
            "Page.navigate",
            json!({ "url": format!("{base}/live/drops/{id}/report?access_token={}", seller.token) }),
            true,
        )
        .await;
    let started = Instant::now();
    let drawn = loop {
        let drawn = browser
            .eval(
                "(() => { const lines = [...document.querySelectorAll('polyline')];
                   return lines.map((l) => ({ class: l.getAttribute('class'),
                       points: l.points.numberOfItems, width: l.getBBox().width })); })()",
            )
            .await;
        if drawn.as_array().is_some_and(|lines| lines.len() == 4) {
            break drawn;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no report drawn: {drawn}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for line in drawn.as_array().unwrap() {
        assert_eq!(line["points"].as_u64(), Some(seconds as u64), "{line}");
        assert!(
            line["width"].as_f64().unwrap() > 100.0,
            "drawn across the chart: {line}"
        );
    }
    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../reports/drop-report.png");
    browser.screenshot(&shot).await;
    browser.close().await;
}

// ---- the load harness's HTML report, with no network

/// What the page says about each chart of goose's report: an ECharts instance, its data points, how many of its
/// canvas's pixels are drawn dark (lines, areas, axes, text; the background is white), and how many in the series'
/// colours (goose's greens for lines and areas, the heatmap's blues): an empty chart still draws its axes.
const CHARTS: &str = r#"(() => {
  const graphs = [...document.querySelectorAll('.graph div[id^="graph-"][style*="height"]')];
  return { echarts: typeof echarts, online: navigator.onLine, graphs: graphs.map((el) => {
    const chart = typeof echarts === 'undefined' ? null : echarts.getInstanceByDom(el);
    const canvas = el.querySelector('canvas');
    let inked = 0, colored = 0;
    if (canvas) {
      const d = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
      for (let i = 0; i < d.length; i += 4) {
        if (d[i + 3] === 0) continue;
        const [r, g, b] = [d[i], d[i + 1], d[i + 2]];
        if (Math.min(r, g, b) < 160) inked++;
        if ((g - r > 40 && g > b + 10) || (b - r > 40 && b > g)) colored++;
      }
    }
    const series = chart ? chart.getOption().series || [] : [];
    const points = series.reduce((n, s) => n + (Array.isArray(s.data) ? s.data.length : 0), 0);
    return { id: el.id, chart: !!chart, canvas: !!canvas, points, inked, colored };
  }) };
})()"#;

/// Whether a `fetch` from the page reaches the CDN goose's report loads ECharts from.
const CDN_PROBE: &str =
    "fetch('https://cdn.jsdelivr.net/npm/echarts@5.2.2/dist/echarts.min.js', { cache: 'no-store' })
    .then(() => 'reached', () => 'unreachable')";

/// Opens `path` in a fresh desktop-sized page with the network cut; returns the charts once they stop changing.
async fn charts_offline(path: &std::path::Path, screenshot: &std::path::Path) -> Value {
    let browser = Browser::launch_as(
        json!({ "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
    )
    .await;
    browser.call("Network.enable", json!({}), true).await;
    browser
        .call(
            "Network.emulateNetworkConditions",
            json!({ "offline": true, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1 }),
            true,
        )
        .await;
    browser
        .call(
            "Page.navigate",
            json!({ "url": format!("file://{}", path.display()) }),
            true,
        )
        .await;
    let started = Instant::now();
    while browser.eval("document.readyState").await != "complete" {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the report never loaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        browser.eval(CDN_PROBE).await,
        "unreachable",
        "the page must have no network"
    );
    // ECharts animates its first drawing (about a second): wait until two looks agree.
    let mut last = Value::Null;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = browser.eval(CHARTS).await;
        if now == last {
            break;
        }
        last = now;
    }
    browser.screenshot_page(screenshot).await;
    browser.close().await;
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_report_draws_its_charts_offline_in_headless_chromium() {
    tokio::time::timeout(TEST_LIMIT, load_report())
        .await
        .expect("report test took too long");
}

async fn load_report() {
    use clap::Parser;
    use loadtest::config::{Cli, Command};
    const ADMIN_EMAIL: &str = "admin@report.test";
    const ADMIN_PASSWORD: &str = "report-test-admin-password";
    // The browser first: on a fresh machine this installs Chromium.
    chromium();

    let db = common::TestDb::new().await;
    db.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let server = common::TestServer::start(&db.url, &[("REAPER_INTERVAL_MS", "200")]).await;
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let html = out.join(format!(
        "load-report-{}.html",
        uuid::Uuid::new_v4().simple()
    ));
    let cli = Cli::try_parse_from([
        "flashsale-load",
        "drop",
        "--base-url",
        &server.base_url,
        "--database-url",
        &db.url,
        "--admin-email",
        ADMIN_EMAIL,
        "--admin-password",
        ADMIN_PASSWORD,
        "--buyers",
        "12",
        "--attempts-per-buyer",
        "3",
        "--stock",
        "6",
        "--hold-seconds",
        "2",
        "--opens-in-ms",
        "1500",
        "--restock-slack-seconds",
        "2",
        "--reaper-interval-ms",
        "200",
        "--report-file",
        html.to_str().unwrap(),
        "--quiet",
    ])
    .unwrap();
    let Command::Drop(args) = cli.command else {
        unreachable!("parsed the drop subcommand")
    };
    let outcome = loadtest::run::drop(args).await.unwrap();
    assert!(
        outcome.summary.passed,
        "{}",
        loadtest::summary::render(&outcome.summary)
    );
    assert!(server.terminate(Duration::from_secs(15)).await);

    // The harness's report: self-contained, every chart drawn with the network cut.
    let report = std::fs::read_to_string(&html).unwrap();
    assert!(
        !report.contains("cdn.jsdelivr.net"),
        "the report still loads from a CDN"
    );
    let offline = charts_offline(&html, &out.join("load-report-offline.png")).await;
    eprintln!("offline report: {offline}");
    assert_eq!(offline["echarts"], "object", "{offline}");
    assert_eq!(offline["online"], false, "{offline}");
    let graphs = offline["graphs"].as_array().unwrap();
    assert!(
        graphs.len() >= 5,
        "goose's report has its charts: {offline}"
    );
    let mut drawn = 0;
    for graph in graphs {
        assert_eq!(graph["chart"], true, "{graph}");
        assert!(
            graph["inked"].as_u64().unwrap() > 2_000,
            "a chart not drawn: {graph}"
        );
        // A series of two points or more is a line or an area in the series' colours: 94k-316k such pixels in these
        // charts, where an empty chart's zoom slider and toolbox alone make about 22k. (Errors per second has no point
        // in a run without errors, and a series of one point draws no line: those show their axes only.)
        if graph["points"].as_u64().unwrap() >= 2 {
            drawn += 1;
            assert!(
                graph["colored"].as_u64().unwrap() > 50_000,
                "its series not drawn: {graph}"
            );
        }
    }
    assert!(drawn >= 4, "charts with their series drawn: {offline}");

    // The same report as goose writes it, ECharts from the CDN: nothing draws, so the test above had no network.
    let start = report.find("<!-- Apache ECharts").unwrap();
    let end = start + report[start..].find("</script>").unwrap() + "</script>".len();
    let goose_form = format!(
        "{}{}{}",
        &report[..start],
        loadtest::report::ECHARTS_CDN_TAG,
        &report[end..]
    );
    let cdn_html = html.with_extension("cdn.html");
    std::fs::write(&cdn_html, goose_form).unwrap();
    let online_only = charts_offline(&cdn_html, &out.join("load-report-cdn-offline.png")).await;
    eprintln!("goose's own report, offline: {online_only}");
    assert_eq!(online_only["echarts"], "undefined", "{online_only}");
    assert!(online_only["graphs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|graph| graph["inked"] == 0 && graph["colored"] == 0));
    let _ = std::fs::remove_file(&html);
    let _ = std::fs::remove_file(&cdn_html);
}

/// A queue drop's live page, opened by a waiting member with `?access_token=`: it shows the waiting room's counts
/// from the event stream and the member's own place (position, people ahead), then "sold out" once the one unit is
/// sold to the member admitted ahead of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_shows_a_queued_member_their_place_in_headless_chromium() {
    tokio::time::timeout(TEST_LIMIT, queue_page())
        .await
        .expect("queue page test took too long");
}

async fn queue_page() {
    let app = Arc::new(TestApp::new().await);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = app.router.clone();
    tokio::spawn(async move {
        axum::serve(
            listener,
            axum::ServiceExt::<axum::extract::Request>::into_make_service(router),
        )
        .await
    });
    let browser = Browser::launch().await;
    let seller = app.member(Role::Seller).await;
    let product = app.product(&seller, 59_000).await;
    let now = chrono::Utc::now();
    let drop = TestApp::drop(
        &app,
        &seller,
        json!({ "product_id": product, "stock": 1, "mode": "queue",
                "opens_at": (now - chrono::Duration::seconds(1)).to_rfc3339(),
                "queue_opens_at": (now - chrono::Duration::seconds(2)).to_rfc3339() }),
    )
    .await;
    let id = drop["id"].as_str().unwrap().to_owned();
    let (first, second) = (
        app.member(Role::Customer).await,
        app.member(Role::Customer).await,
    );
    for member in [&first, &second] {
        let path = format!("/api/v1/drops/{id}/queue");
        let joined = app.call("POST", &path, Some(&member.token), None).await;
        assert_eq!(joined.status, axum::http::StatusCode::CREATED);
    }
    let url = format!("{base}/live/drops/{id}?access_token={}", second.token);
    browser
        .call("Page.navigate", json!({ "url": url }), true)
        .await;
    let shown = || async {
        browser
            .eval(
                "(() => ({ mine: document.body.dataset.mine || '',
                   text: document.getElementById('mine-text').textContent,
                   waiting: document.getElementById('q-waiting').textContent,
                   admitted: document.getElementById('q-admitted').textContent }))()",
            )
            .await
    };
    // The admission loop lets the first member in (one unit): the second is first in line. The counts come with the
    // event stream and the member's place from its own poll (each second), so the page may show the new counts
    // beside the place from before the admission for up to a poll: wait for both.
    let started = Instant::now();
    let waiting = loop {
        let now = shown().await;
        let first_in_line = now["text"]
            .as_str()
            .is_some_and(|text| text.starts_with("#1 · 0 ahead"));
        if now["mine"] == "waiting" && now["admitted"] == "1" && first_in_line {
            break now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the page never showed the place: {now}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(waiting["waiting"], "1");
    browser
        .screenshot(&std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("live-queue.png"))
        .await;
    // The first buys the unit with their pass: the second is told "sold out".
    let place = app
        .call(
            "GET",
            &format!("/api/v1/drops/{id}/queue/me"),
            Some(&first.token),
            None,
        )
        .await;
    let pass = place.body["pass"].as_str().unwrap().to_owned();
    let held = app
        .call_with(
            "POST",
            &format!("/api/v1/drops/{id}/reservations"),
            &first.token,
            &[("admission-pass", &pass)],
            None,
        )
        .await;
    assert_eq!(
        held.status,
        axum::http::StatusCode::CREATED,
        "{:?}",
        held.body
    );
    let hold = held.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        pay(&app, &first, &hold, "tok_ok").await.status,
        axum::http::StatusCode::OK
    );
    let started = Instant::now();
    loop {
        let now = shown().await;
        if now["mine"] == "sold_out" {
            assert_eq!(now["text"], "sold out");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the page never said sold out: {now}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    browser.close().await;
}

/// A campaign's section of the live page: its progress toward the goal as buyers pay, then its outcome, for one
/// campaign that reaches its goal and one that does not. The engine's clock is a manual one: the test moves it to
/// `closes_at` and runs one pass of the campaign loop (`close::tick`) instead of waiting for either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_shows_a_campaign_progress_and_outcome_in_headless_chromium() {
    tokio::time::timeout(TEST_LIMIT, campaign_page())
        .await
        .expect("campaign page test took too long");
}

/// What the page's campaign section shows: whether it is laid out, the goal, the state's words, the percentage,
/// the progress bar's filled share, and the drop's status.
const CAMPAIGN_SECTION: &str = "(() => {
  const section = document.getElementById('campaign');
  const bar = document.getElementById('bar-goal');
  return { shown: !section.hidden && section.getBoundingClientRect().height > 0,
           goal: section.querySelector('#goal').textContent,
           state: document.getElementById('campaign-state').textContent,
           campaign: document.body.dataset.campaign || '',
           percent: document.getElementById('goal-percent').textContent,
           filled: Math.round(100 * bar.getBoundingClientRect().width / bar.parentElement.getBoundingClientRect().width),
           status: document.body.dataset.status || '' }; })()";

/// Waits (up to 10 s) until the campaign section shows `state` and `percent`, with its bar filled that far (the bar
/// eases to a new width over 0.3 s); returns what it shows.
async fn campaign_shows(browser: &Browser, state: &str, percent: &str) -> Value {
    let share: i64 = percent.trim_end_matches('%').parse().unwrap();
    let started = Instant::now();
    loop {
        let now = browser.eval(CAMPAIGN_SECTION).await;
        if now["state"] == state && now["percent"] == percent && now["filled"] == share.min(100) {
            assert_eq!(now["shown"], true, "{now}");
            return now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the page never showed {state} at {percent}: {now}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn campaign_page() {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let clock = Arc::new(engine::clock::ManualClock::new(now_ms));
    let app = Arc::new(TestApp::with_clock(EngineArgs::default(), clock.clone()).await);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = app.router.clone();
    tokio::spawn(async move {
        axum::serve(
            listener,
            axum::ServiceExt::<axum::extract::Request>::into_make_service(router),
        )
        .await
    });
    let browser = Browser::launch().await;
    let now = engine::clock::to_datetime(now_ms);
    let closes_at = now + chrono::Duration::minutes(10);
    let seller = app.member(Role::Seller).await;
    let campaign = |goal: u32| {
        let (app, seller) = (Arc::clone(&app), seller.clone());
        async move {
            let product = app.product(&seller, 25_000).await;
            TestApp::drop(
                &app,
                &seller,
                json!({ "product_id": product, "stock": 8, "goal_units": goal,
                        "opens_at": (now - chrono::Duration::hours(1)).to_rfc3339(),
                        "closes_at": closes_at.to_rfc3339() }),
            )
            .await
        }
    };
    let funded = campaign(3).await;
    let unfunded = campaign(4).await;
    let buy = |drop: Value| {
        let app = Arc::clone(&app);
        async move {
            let buyer = app.member(Role::Customer).await;
            let held = reserve(&app, &buyer, &drop, 1).await;
            assert_eq!(held.status, axum::http::StatusCode::CREATED);
            let paid = pay(&app, &buyer, held.body["id"].as_str().unwrap(), "tok_ok").await;
            assert_eq!(paid.status, axum::http::StatusCode::OK);
        }
    };
    let open = |drop: &Value| {
        let url = format!("{base}/live/drops/{}", drop["id"].as_str().unwrap());
        let browser = &browser;
        async move {
            browser
                .call("Page.navigate", json!({ "url": url }), true)
                .await;
        }
    };

    // The one that reaches its goal: live at 0%, then a third of the way, then funded with its bar full.
    open(&funded).await;
    let start = campaign_shows(&browser, "Live", "0%").await;
    assert_eq!(
        (start["goal"].as_str(), start["filled"].as_i64()),
        (Some("3"), Some(0)),
        "{start}"
    );
    buy(funded.clone()).await;
    let third = campaign_shows(&browser, "Live", "33%").await;
    assert_eq!(third["filled"], 33, "{third}");
    buy(funded.clone()).await;
    buy(funded.clone()).await;
    let reached = campaign_shows(&browser, "Funded", "100%").await;
    assert_eq!(
        (reached["campaign"].as_str(), reached["filled"].as_i64()),
        (Some("funded"), Some(100))
    );
    assert_eq!(
        reached["status"], "open",
        "funded before the close, still selling: {reached}"
    );

    // The one that does not: half way at the close, then "not funded" once the campaign loop has refunded it.
    open(&unfunded).await;
    campaign_shows(&browser, "Live", "0%").await;
    buy(unfunded.clone()).await;
    buy(unfunded.clone()).await;
    let half = campaign_shows(&browser, "Live", "50%").await;
    assert_eq!(half["filled"], 50, "{half}");
    clock.set_ms(closes_at.timestamp_millis());
    let pass = shell_api::campaigns::close::tick(&app.state).await.unwrap();
    assert_eq!(
        (pass.closed_funded, pass.closed_unfunded, pass.refunded),
        (1, 1, 2),
        "{pass:?}"
    );
    let failed = campaign_shows(&browser, "Not funded: refunded", "50%").await;
    assert_eq!(
        (failed["campaign"].as_str(), failed["status"].as_str()),
        (Some("unfunded"), Some("closed"))
    );
    browser
        .screenshot(
            &std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("live-campaign-unfunded.png"),
        )
        .await;

    // The funded one after the close: still funded, closed.
    open(&funded).await;
    let closed = campaign_shows(&browser, "Funded", "100%").await;
    assert_eq!(closed["status"], "closed", "{closed}");
    browser.close().await;
}
