//! The dashboard in a real browser: headless Chromium driven over WebDriver
//! (chromedriver), against a real master with process workers. The tests
//! act as a user (clicks, typing) and read the page's stable hooks
//! (`data-worker`, `data-state`, `data-task`); the screenshots they take are
//! saved under `target/dashboard-screenshots/`.
//!
//! Needs `chromium` and `chromedriver` (Debian: `chromium`,
//! `chromium-driver`; `.ci/run` installs them). Without them the tests say
//! so and pass, unless `CI` or `FLOTILLA_REQUIRE_BROWSER` is set: then a
//! missing browser is a failure.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fantoccini::{Client, ClientBuilder, Locator};
use flotilla_e2e::*;
use serde_json::{json, Value};

/// chromedriver and one browser session; both end on drop.
struct Browser {
    client: Client,
    driver: Child,
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

fn browser_required() -> bool {
    std::env::var_os("CI").is_some() || std::env::var_os("FLOTILLA_REQUIRE_BROWSER").is_some()
}

impl Browser {
    /// A headless Chromium, or `None` (with the reason printed) when there
    /// is none and none is required.
    async fn start() -> Option<Browser> {
        let driver = which("chromedriver");
        let chromium = std::env::var_os("FLOTILLA_CHROMIUM")
            .map(PathBuf::from)
            .or_else(|| which("chromium"))
            .or_else(|| which("chromium-browser"));
        let (Some(driver), Some(chromium)) = (driver, chromium) else {
            let why = "chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)";
            if browser_required() {
                panic!("the browser tests must run here: {why}");
            }
            eprintln!("SKIPPED: {why}");
            return None;
        };
        Some(
            Self::launch(&driver, &chromium)
                .await
                .expect("start chromedriver and a headless Chromium"),
        )
    }

    async fn launch(driver: &PathBuf, chromium: &PathBuf) -> Result<Browser> {
        let port = free_port();
        let mut child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start chromedriver")?;
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("chromedriver did not listen on {port}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,2000",
                         "--no-first-run", "--disable-extensions"]
            }
        });
        let caps = caps.as_object().cloned().expect("an object");
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&url)
            .await
            .context("open a WebDriver session")?;
        Ok(Browser {
            client,
            driver: child,
        })
    }

    /// Runs `script` in the page and returns its value.
    async fn js(&self, script: &str) -> Result<Value> {
        Ok(self.client.execute(script, vec![]).await?)
    }

    /// Waits until `script` returns something truthy (checked every 50 ms);
    /// returns that value.
    async fn until(&self, what: &str, timeout: Duration, script: &str) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.js(script).await?;
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!("") && v != json!(0);
            if truthy {
                return Ok(v);
            }
            if Instant::now() > deadline {
                let page = self
                    .js("return document.body.innerText.slice(0, 3000)")
                    .await
                    .unwrap_or_default();
                bail!("{what}: not seen within {timeout:?}; the page shows: {page}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn click(&self, css: &str) -> Result<()> {
        self.client
            .find(Locator::Css(css))
            .await
            .with_context(|| format!("find {css}"))?
            .click()
            .await
            .with_context(|| format!("click {css}"))?;
        Ok(())
    }

    /// Saves a screenshot of the page under `target/dashboard-screenshots/`.
    async fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let png = self.client.screenshot().await?;
        let dir = workspace_root().join("target/dashboard-screenshots");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png)?;
        eprintln!("screenshot: {}", path.display());
        Ok(path)
    }

    /// The worker cards as the page shows them: id -> (state, restarts).
    async fn cards(&self) -> Result<Vec<(u64, String, String)>> {
        let v = self
            .js(
                "return [...document.querySelectorAll('#workers .card[data-worker]')].map(c => \
                 [Number(c.dataset.worker), c.dataset.state, \
                  c.querySelector('[data-field=restarts]').textContent])",
            )
            .await?;
        Ok(v.as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|c| {
                (
                    c[0].as_u64().unwrap_or(u64::MAX),
                    c[1].as_str().unwrap_or_default().to_string(),
                    c[2].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }

    async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

/// chromedriver (and the browser it started) ends with the test, even a
/// failed one.
impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn manifest(name: &str, capacities: &[usize]) -> String {
    let workers: String = capacities
        .iter()
        .map(|c| format!("    - capacity: {c}\n"))
        .collect();
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Cluster\nmetadata:\n  name: {name}\nspec:\n  heartbeat: {{ intervalSeconds: 0.5, timeoutSeconds: 5 }}\n  telemetry: {{ jaegerUrl: 'http://jaeger.example:16686' }}\n  resources:\n    - {{ name: total, type: Integer, initialValue: 7 }}\n  workers:\n{workers}"
    )
}

/// The page follows a live cluster: every worker, a submitted task in the
/// stream, the table and its detail, a `/stop` and the restart, and the
/// actions (add a worker, cancel a task) done from the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_live_cluster_and_acts_on_it() -> Result<()> {
    let Some(browser) = Browser::start().await else {
        return Ok(());
    };
    let cluster = Cluster::start_with(
        &manifest("dash-live", &[4, 4, 6]),
        &["--slots", "2", "--ephemeral"],
        &[],
    )
    .await?;
    browser.client.goto(&cluster.url).await?;

    // Every worker, active, with its hooks.
    browser
        .until(
            "three active worker cards",
            Duration::from_secs(15),
            "return document.querySelectorAll('#workers .card[data-state=active]').length === 3",
        )
        .await?;
    let cards = browser.cards().await?;
    let ids: Vec<u64> = cards.iter().map(|c| c.0).collect();
    assert_eq!(ids, vec![0, 1, 2], "{cards:?}");
    let name = browser
        .js("return document.querySelector('#cluster-name').textContent")
        .await?;
    assert_eq!(name, "dash-live");
    let resource = browser
        .until(
            "the resource row",
            Duration::from_secs(5),
            "const r = document.querySelector('#resources tr[data-resource=total]'); return r && r.textContent",
        )
        .await?;
    assert!(resource.as_str().unwrap().contains("Integer"), "{resource}");

    // Without a token, another site's page still cannot make the browser
    // submit work (the page's own origin can).
    let host = cluster.url.trim_start_matches("http://").to_string();
    for (header, value, expected) in [
        ("origin", "http://evil.example".to_string(), 403),
        ("sec-fetch-site", "cross-site".to_string(), 403),
        ("origin", format!("http://{host}"), 200),
    ] {
        let status = cluster
            .http
            .post(format!("{}/send", cluster.url))
            .header(header, &value)
            .body(r#"{"type": "python", "command": "response = 1"}"#)
            .send()
            .await?
            .status();
        assert_eq!(status, expected, "POST /send with {header}: {value}");
    }

    // Some work to look at: short tasks of varied length, a few failures,
    // and lock takers on `total` (7 + 6).
    let mut batch: Vec<Value> = (0..150)
        .map(|i| json!({"type": "python", "command": format!("import time, random\ntime.sleep(random.uniform(0.02, 0.25))\nresponse = {i}")}))
        .collect();
    for i in 0..3 {
        batch.push(
            json!({"type": "python", "command": format!("raise ValueError('bad input {i}')")}),
        );
    }
    for _ in 0..6 {
        batch.push(json!({"type": "python", "command": "import time\nwith write_resource('total') as t:\n    time.sleep(0.05)\n    t.value += 1\nresponse = 'locked'"}));
    }
    let (status, body) = cluster.post("/tasks", json!({ "tasks": batch })).await?;
    assert_eq!(status, 200, "{body}");
    let last = body["task_ids"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_u64()
        .unwrap();
    for id in body["task_ids"].as_array().unwrap() {
        let (_, t) = cluster.get(&format!("/tasks/{id}?wait=30")).await?;
        assert!(
            ["succeeded", "failed"].contains(&t["state"].as_str().unwrap()),
            "{t}"
        );
    }
    browser
        .until(
            "the batch in the stream and the resource at 13",
            Duration::from_secs(10),
            &format!("return !!document.querySelector('#stream rect[data-task=\"{last}\"]') && document.querySelector('#resources tr[data-resource=total]').textContent.includes('13')"),
        )
        .await?;
    browser
        .until(
            "a lock grant in the event log",
            Duration::from_secs(5),
            "return !!document.querySelector('#events li[data-kind=lock_grant]')",
        )
        .await?;

    // A submitted task: in the stream, in the table, and its detail.
    let id = cluster
        .send_python("import time\ntime.sleep(0.3)\nprint('hello from the dashboard test')\nresponse = 6 * 7")
        .await?;
    browser
        .until(
            "the task's bar in the stream",
            Duration::from_secs(10),
            &format!("return !!document.querySelector('#stream rect[data-task=\"{id}\"]')"),
        )
        .await?;
    browser
        .until(
            "the task's bar as succeeded",
            Duration::from_secs(10),
            &format!(
                "return !!document.querySelector('#stream rect.o-succeeded[data-task=\"{id}\"]')"
            ),
        )
        .await?;
    browser
        .until(
            "the task's row in the table",
            Duration::from_secs(10),
            &format!("const r = document.querySelector('#table-viewport .row[data-task=\"{id}\"]'); return r && r.textContent.includes('succeeded')"),
        )
        .await?;
    browser
        .click(&format!("#table-viewport .row[data-task=\"{id}\"]"))
        .await?;
    let detail = browser
        .until(
            "the task's detail with its result",
            Duration::from_secs(10),
            &format!(
                "const d = document.querySelector('#detail[data-task=\"{id}\"]'); \
                 return d && !d.hidden && d.querySelector('pre.result') && \
                 {{result: d.querySelector('pre.result').textContent, text: d.innerText, \
                   attempts: d.querySelectorAll('tr[data-attempt]').length, \
                   jaeger: !!d.querySelector('a[href^=\"http://jaeger.example\"]')}}"
            ),
        )
        .await?;
    assert_eq!(detail["result"], "42", "{detail}");
    let text = detail["text"].as_str().unwrap();
    assert!(text.contains("hello from the dashboard test"), "{text}");
    assert!(text.contains("response = 6 * 7"), "{text}");
    assert_eq!(detail["attempts"], 1, "{detail}");
    // Trace export is off: no trace, so no Jaeger link.
    assert!(text.contains("trace export is off"), "{text}");
    assert_eq!(detail["jaeger"], false);
    browser.screenshot("overview").await?;
    // Two views at a laptop's size, for people (README).
    browser.client.set_window_size(1280, 900).await?;
    browser.js("window.scrollTo(0, 0); return true").await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    browser.screenshot("view-workers").await?;
    browser
        .js("document.querySelector('#tasks-section').scrollIntoView(); return true")
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    browser.screenshot("view-task").await?;
    browser.client.set_window_size(1400, 2000).await?;

    // /stop of worker 1: its card leaves `active` within 2 s of the stop, and
    // is back, active with 1 restart, within 2 s of the master having it so.
    let (status, body) = cluster.post("/stop/1", json!({})).await?;
    assert_eq!(status, 200, "{body}");
    let stopped = Instant::now();
    let seen_down = browser
        .until(
            "worker 1's card dead or restarting",
            Duration::from_secs(2),
            "const c = document.querySelector('.card[data-worker=\"1\"]'); return c && c.dataset.state !== 'active' && c.dataset.state",
        )
        .await?;
    eprintln!(
        "card 1 showed {seen_down} {:?} after the stop",
        stopped.elapsed()
    );
    cluster
        .wait_until(Duration::from_secs(20), |nodes| {
            nodes[1]["state"] == "active" && nodes[1]["restarts"] == 1
        })
        .await?;
    let back_in_api = Instant::now();
    browser
        .until(
            "worker 1's card active again with 1 restart",
            Duration::from_secs(2),
            "const c = document.querySelector('.card[data-worker=\"1\"]'); \
             return c && c.dataset.state === 'active' && c.querySelector('[data-field=restarts]').textContent === '1'",
        )
        .await?;
    eprintln!(
        "card 1 active again {:?} after the API said so",
        back_in_api.elapsed()
    );
    browser
        .until(
            "the stop and restart in the event log",
            Duration::from_secs(5),
            "return !!document.querySelector('#events li[data-kind=dead]') && !!document.querySelector('#events li[data-kind=restart]')",
        )
        .await?;

    // An action from the page: add a worker (with its confirmation).
    browser
        .client
        .find(Locator::Css("#add-capacity"))
        .await?
        .clear()
        .await?;
    browser
        .client
        .find(Locator::Css("#add-capacity"))
        .await?
        .send_keys("2")
        .await?;
    browser.click("#add-worker").await?;
    browser
        .until(
            "the confirmation",
            Duration::from_secs(5),
            "return document.querySelector('#confirm').open",
        )
        .await?;
    browser.screenshot("confirm-add-worker").await?;
    browser.click("#confirm-ok").await?;
    let nodes = cluster
        .wait_until(Duration::from_secs(20), |nodes| {
            nodes.len() == 4 && nodes[3]["state"] == "active"
        })
        .await?;
    assert_eq!(nodes[3]["capacity"], 2);
    browser
        .until(
            "the new worker's card",
            Duration::from_secs(5),
            "return !!document.querySelector('.card[data-worker=\"3\"][data-state=active]')",
        )
        .await?;

    // Another: cancel a running task from its detail.
    let long = cluster.send_python("import time\ntime.sleep(60)").await?;
    browser
        .until(
            "the long task's row",
            Duration::from_secs(10),
            &format!(
                "return !!document.querySelector('#table-viewport .row[data-task=\"{long}\"]')"
            ),
        )
        .await?;
    browser
        .click(&format!("#table-viewport .row[data-task=\"{long}\"]"))
        .await?;
    browser
        .until(
            "the cancel button",
            Duration::from_secs(10),
            &format!("return !!document.querySelector('#detail[data-task=\"{long}\"] button[data-action=cancel]')"),
        )
        .await?;
    browser
        .click(&format!(
            "#detail[data-task=\"{long}\"] button[data-action=cancel]"
        ))
        .await?;
    browser
        .until(
            "the confirmation",
            Duration::from_secs(5),
            "return document.querySelector('#confirm').open",
        )
        .await?;
    browser.click("#confirm-ok").await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, task) = cluster.get(&format!("/tasks/{long}")).await?;
        if task["state"] == "cancelled" {
            break;
        }
        if Instant::now() > deadline {
            bail!("task {long} not cancelled from the page: {task}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    browser
        .until(
            "the detail showing the cancel",
            Duration::from_secs(5),
            &format!("return document.querySelector('#detail[data-task=\"{long}\"]')?.dataset.state === 'cancelled'"),
        )
        .await?;

    // A failed task shows its traceback, and the table filters by state.
    let failed = cluster.send_python("1 / 0").await?;
    cluster.wait_task(failed, Duration::from_secs(20)).await?;
    let select = browser.client.find(Locator::Css("#filter-state")).await?;
    select.select_by_value("failed").await?;
    let rows = browser
        .until(
            "only failed rows",
            Duration::from_secs(10),
            &format!(
                "const rows = [...document.querySelectorAll('#table-viewport .row')]; \
                 return rows.length > 0 && rows.every(r => r.textContent.includes('failed')) && \
                 rows.some(r => r.dataset.task === '{failed}') && rows.length"
            ),
        )
        .await?;
    assert_eq!(rows, 4, "the three of the batch and 1 / 0");
    browser
        .click(&format!("#table-viewport .row[data-task=\"{failed}\"]"))
        .await?;
    let text = browser
        .until(
            "the traceback",
            Duration::from_secs(10),
            &format!("const d = document.querySelector('#detail[data-task=\"{failed}\"]'); return d && d.innerText.includes('ZeroDivisionError') && d.innerText"),
        )
        .await?;
    assert!(text.as_str().unwrap().contains("Traceback"), "{text}");
    // The throughput chart has a line by now.
    browser
        .until(
            "the throughput line",
            Duration::from_secs(10),
            "return !!document.querySelector('#chart-throughput polyline')",
        )
        .await?;
    browser.screenshot("task-detail").await?;
    browser.close().await;
    Ok(())
}

/// With a token: the page asks for it and shows nothing before; a wrong
/// token is refused; the right one gives a cookie (HttpOnly, SameSite=Strict,
/// not the token) that the page's own calls use, and that cannot change
/// state from elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_asks_for_it_and_shows_nothing_before() -> Result<()> {
    let Some(browser) = Browser::start().await else {
        return Ok(());
    };
    let token = "dashboard-test-token-4b1d";
    let cluster = Cluster::start_with(
        &manifest("dash-token", &[2, 2]),
        &["--ephemeral"],
        &[("FLOTILLA_TOKEN", token)],
    )
    .await?;
    browser.client.goto(&cluster.url).await?;
    browser
        .until(
            "the login form",
            Duration::from_secs(10),
            "return !document.querySelector('#login').hidden",
        )
        .await?;
    // Nothing of the cluster: no cards, no name, the app hidden, and the
    // data routes refuse a request without the cookie.
    let shown = browser
        .js("return {app: document.querySelector('#app').hidden, cards: document.querySelectorAll('[data-worker]').length, name: document.querySelector('#cluster-name').textContent, text: document.body.innerText}")
        .await?;
    assert_eq!(shown["app"], true, "{shown}");
    assert_eq!(shown["cards"], 0, "{shown}");
    assert_eq!(shown["name"], "Flotilla", "{shown}");
    assert!(!shown["text"].as_str().unwrap().contains("dash-token"));
    for path in ["/ui/events", "/ui/tasks", "/nodes"] {
        let status = cluster
            .http
            .get(format!("{}{path}", cluster.url))
            .send()
            .await?
            .status();
        assert_eq!(status, 401, "{path} without a token or cookie");
    }
    browser.screenshot("login").await?;

    // A wrong token: refused, still nothing shown.
    browser
        .client
        .find(Locator::Css("#token"))
        .await?
        .send_keys("not-the-token")
        .await?;
    browser.click("#login-submit").await?;
    browser
        .until(
            "the refusal",
            Duration::from_secs(5),
            "return document.querySelector('#login-error').textContent === 'Wrong token.'",
        )
        .await?;
    let shown = browser
        .js("return {app: document.querySelector('#app').hidden, cards: document.querySelectorAll('[data-worker]').length}")
        .await?;
    assert_eq!(shown, json!({"app": true, "cards": 0}));
    assert!(browser.client.get_all_cookies().await?.is_empty());
    let wrong = cluster
        .http
        .post(format!("{}/ui/login", cluster.url))
        .body(r#"{"token": "nope"}"#)
        .send()
        .await?;
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());

    // The right one.
    browser
        .client
        .find(Locator::Css("#token"))
        .await?
        .clear()
        .await?;
    browser
        .client
        .find(Locator::Css("#token"))
        .await?
        .send_keys(token)
        .await?;
    browser.click("#login-submit").await?;
    browser
        .until(
            "both worker cards after the login",
            Duration::from_secs(10),
            "return document.querySelectorAll('#workers .card[data-state=active]').length === 2",
        )
        .await?;
    let cookies = browser.client.get_all_cookies().await?;
    let session = cookies
        .iter()
        .find(|c| c.name() == "flotilla_session")
        .ok_or_else(|| anyhow!("no session cookie: {cookies:?}"))?;
    assert_eq!(session.http_only(), Some(true), "{session}");
    assert_eq!(
        format!("{:?}", session.same_site()),
        "Some(Strict)",
        "{session}"
    );
    assert!(
        !session.value().contains(token),
        "the cookie is not the token"
    );
    let page_url = browser.client.current_url().await?;
    assert!(!page_url.as_str().contains(token), "{page_url}");
    // The script cannot read it (HttpOnly).
    let visible = browser.js("return document.cookie").await?;
    assert!(!visible.as_str().unwrap().contains("flotilla_session"));

    // The cookie alone cannot change state from elsewhere: without the
    // dashboard's header, or from another site's page, it is refused.
    let cookie = format!("flotilla_session={}", session.value());
    let bare = cluster
        .http
        .post(format!("{}/add", cluster.url))
        .header("cookie", &cookie)
        .body("{}")
        .send()
        .await?;
    assert_eq!(bare.status(), 403, "a cookie-only POST");
    let foreign = cluster
        .http
        .post(format!("{}/add", cluster.url))
        .header("cookie", &cookie)
        .header("x-flotilla-dashboard", "1")
        .header("origin", "http://evil.example")
        .body("{}")
        .send()
        .await?;
    assert_eq!(foreign.status(), 403, "a POST from another origin");
    let read = cluster
        .http
        .get(format!("{}/nodes", cluster.url))
        .header("cookie", &cookie)
        .send()
        .await?;
    assert_eq!(read.status(), 200, "the cookie reads");
    assert_eq!(cluster.nodes().await?.len(), 2, "nothing was added");

    // The page's own action works with it: stop worker 0 from its card.
    browser
        .click(".card[data-worker=\"0\"] button[data-action=stop]")
        .await?;
    browser
        .until(
            "the confirmation",
            Duration::from_secs(5),
            "return document.querySelector('#confirm').open",
        )
        .await?;
    browser.click("#confirm-ok").await?;
    cluster
        .wait_until(Duration::from_secs(20), |nodes| {
            nodes[0]["restarts"] == 1 && nodes[0]["state"] == "active"
        })
        .await?;
    browser
        .until(
            "worker 0 back with 1 restart",
            Duration::from_secs(5),
            "const c = document.querySelector('.card[data-worker=\"0\"]'); return c && c.dataset.state === 'active' && c.querySelector('[data-field=restarts]').textContent === '1'",
        )
        .await?;

    // Signing out forgets the session.
    browser.click("#logout").await?;
    browser
        .until(
            "the login form again",
            Duration::from_secs(5),
            "return !document.querySelector('#login').hidden && document.querySelector('#app').hidden",
        )
        .await?;
    browser.close().await;
    Ok(())
}

/// The page reconnects by itself to a master started again after a kill
/// (same port and state directory), and shows the new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_reconnects_after_a_master_restart() -> Result<()> {
    let Some(browser) = Browser::start().await else {
        return Ok(());
    };
    let port = free_port().to_string();
    let dir = fresh_state_dir();
    let dir = dir.to_str().unwrap();
    let args = ["--port", &port, "--state-dir", dir];
    let mut first = Cluster::start_with(&manifest("dash-restart", &[2]), &args, &[]).await?;
    browser.client.goto(&first.url).await?;
    let before = browser
        .until(
            "the first master",
            Duration::from_secs(10),
            "return document.querySelector('#conn').dataset.connected === 'true' && document.querySelector('#cluster-runtime').textContent",
        )
        .await?;
    let id = first.send_python("response = 'kept'").await?;
    first.wait_task(id, Duration::from_secs(20)).await?;
    first.kill_master();
    browser
        .until(
            "the page noticing the master is gone",
            Duration::from_secs(10),
            "return document.querySelector('#conn').dataset.connected === 'false'",
        )
        .await?;
    drop(first);
    let second = Cluster::start_with(&manifest("dash-restart", &[2]), &args, &[]).await?;
    let after = browser
        .until(
            "the second master, without a reload",
            Duration::from_secs(15),
            &format!(
                "const t = document.querySelector('#cluster-runtime').textContent; \
                 return document.querySelector('#conn').dataset.connected === 'true' && t !== {before} && t"
            ),
        )
        .await?;
    assert_ne!(before, after);
    // The task the first master finished is still in the table.
    browser
        .until(
            "the first master's task in the table",
            Duration::from_secs(10),
            &format!("return !!document.querySelector('#table-viewport .row[data-task=\"{id}\"]')"),
        )
        .await?;
    drop(second);
    browser.close().await;
    Ok(())
}
