//! The web UI in a real browser: headless Chromium driven over the WebDriver protocol by
//! chromedriver. Signs in, watches the real host agent (`agent`, started as a process)
//! come online with this host's facts, sends it a command and sees the result, uploads a
//! binary and rolls it out with a failure brake, sees the real agent refuse the build at
//! its self-check and the brake pause the rollout with both reasons, resumes it, runs a
//! command on real agents with a label as a fleet job and sees every result; screenshots
//! of every page go to `target/ui-artifacts/`.
//!
//! Needs `chromium` and `chromedriver` (Debian: `apt-get install chromium
//! chromium-driver`), found on PATH or through CHROMIUM / CHROMEDRIVER, and the `agent`
//! binary (`cargo build -p agent`). Without them the test is a loud skip locally and a
//! failure in CI.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::helpers::*;
use crate::host_agent::{self, HostAgent};

const PASSWORD: &str = "correct horse battery staple";
/// The W3C WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_program(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target/tmp has a parent")
        .join("ui-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A chromedriver process with one browser session.
struct Browser {
    http: reqwest::Client,
    session: String,
    driver: String,
    _chromedriver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium; `None` (after saying so) when they
    /// are not installed outside CI.
    async fn start() -> Option<Browser> {
        let chromium = find_program(
            "CHROMIUM",
            &["chromium", "chromium-browser", "google-chrome"],
        );
        let chromedriver = find_program("CHROMEDRIVER", &["chromedriver"]);
        let (Some(chromium), Some(chromedriver)) = (chromium, chromedriver) else {
            let why = "chromium and chromedriver are needed (apt-get install -y chromium chromium-driver, or set CHROMIUM and CHROMEDRIVER)";
            if std::env::var_os("CI").is_some() {
                panic!("{why}");
            }
            eprintln!("SKIPPED: browser test: {why}");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let http = reqwest::Client::new();
        let driver = format!("http://127.0.0.1:{port}");
        eventually(WAIT, "chromedriver ready", async || {
            let ready = http.get(format!("{driver}/status")).send().await;
            match ready {
                Ok(resp) => resp
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            }
        })
        .await;
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-dev-shm-usage",
                    "--window-size=1440,1000", "--force-device-scale-factor=1",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let resp: Value = http
            .post(format!("{driver}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = resp["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {resp}"))
            .to_string();
        Some(Browser {
            http,
            session,
            driver,
            _chromedriver: child,
            _profile: profile,
        })
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.driver, self.session);
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp: Value = req.send().await.unwrap().json().await.unwrap();
        resp["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    /// The element matching `css`, waiting for it within [`WAIT`].
    async fn find(&self, css: &str) -> String {
        self.find_where(css, |_| true).await.0
    }

    /// The first element matching `css` whose text satisfies `check`, within [`WAIT`].
    async fn find_where(&self, css: &str, check: impl Fn(&str) -> bool) -> (String, String) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut last = String::new();
        loop {
            let found = self
                .cmd(
                    reqwest::Method::POST,
                    "/elements",
                    Some(json!({"using": "css selector", "value": css})),
                )
                .await;
            for el in found.as_array().cloned().unwrap_or_default() {
                let Some(id) = el[ELEMENT].as_str() else {
                    continue;
                };
                let text = self
                    .cmd(reqwest::Method::GET, &format!("/element/{id}/text"), None)
                    .await;
                last = text.as_str().unwrap_or_default().to_string();
                if check(&last) {
                    return (id.to_string(), last);
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no `{css}` as expected within {WAIT:?}; last text: {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clicks the element matching `css`. Live pages re-render on events, so the element
    /// found may be replaced before the click lands: then it is found again.
    async fn click(&self, css: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let id = self.find(css).await;
            let r = self
                .cmd(
                    reqwest::Method::POST,
                    &format!("/element/{id}/click"),
                    Some(json!({})),
                )
                .await;
            if r.is_null() {
                return;
            }
            assert!(
                r["error"] == "stale element reference" && tokio::time::Instant::now() < deadline,
                "click on {css} failed: {r}"
            );
        }
    }

    async fn click_element(&self, id: &str) {
        let r = self
            .cmd(
                reqwest::Method::POST,
                &format!("/element/{id}/click"),
                Some(json!({})),
            )
            .await;
        assert!(r.is_null(), "click failed: {r}");
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/clear"),
            Some(json!({})),
        )
        .await;
        let r = self
            .cmd(
                reqwest::Method::POST,
                &format!("/element/{id}/value"),
                Some(json!({ "text": text })),
            )
            .await;
        assert!(r.is_null(), "typing into {css} failed: {r}");
    }

    /// A picture of the whole page: the window grows to the document's height for it.
    /// Toasts are transient and would hide what the page shows, so they are cleared.
    async fn screenshot(&self, name: &str) {
        let script = "document.getElementById('toasts').replaceChildren(); window.scrollTo(0, 0); \
                      return document.documentElement.scrollHeight;";
        let height = self
            .cmd(
                reqwest::Method::POST,
                "/execute/sync",
                Some(json!({"script": script, "args": []})),
            )
            .await
            .as_u64()
            .unwrap_or(1000);
        self.resize(height + 200).await;
        let png = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        self.resize(1000).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("a base64 screenshot"))
            .unwrap();
        std::fs::write(artifacts().join(name), bytes).unwrap();
    }

    async fn resize(&self, height: u64) {
        self.cmd(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": 1440, "height": height.clamp(900, 5000)})),
        )
        .await;
    }
}

impl Drop for Browser {
    /// Ends the browser session, also when the test failed half-way: killing chromedriver
    /// alone would leave Chromium running. Blocking, and bounded by [`WAIT`], on purpose:
    /// drop cannot await.
    fn drop(&mut self) {
        use std::io::{Read, Write};
        let Ok(mut conn) = std::net::TcpStream::connect(self.driver.trim_start_matches("http://"))
        else {
            return;
        };
        let _ = conn.set_read_timeout(Some(WAIT));
        let request = format!(
            "DELETE /session/{} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\n\r\n",
            self.session
        );
        if conn.write_all(request.as_bytes()).is_err() {
            return;
        }
        // chromedriver answers once the browser has quit; read exactly that answer.
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        while let Ok(n @ 1..) = conn.read(&mut chunk) {
            got.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&got);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if body.len() >= length {
                    return;
                }
            }
        }
    }
}

async fn a_person_signs_in_watches_an_agent_sends_a_command_and_rolls_out_a_binary(app: TestApp) {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let Some(agent_binary) = host_agent::binary() else {
        return;
    };
    let arch = std::env::consts::ARCH;
    // Some fleet around the agent under test, so the pages have something to show.
    for id in ["db-1", "db-2", "cache-1"] {
        app.enroll(id).await;
    }
    let mut cache = app.connect("cache-1").await;
    cache
        .send(json!({"type": "hello", "version": "2.5.0", "hostname": "cache-1.eu", "os": "linux", "arch": arch}))
        .await;

    browser.goto(&app.url("/")).await;
    browser.find("#password").await;
    browser.screenshot("01-sign-in.png").await;
    browser.type_into("#password", "not the password").await;
    browser.click("#sign-in").await;
    browser
        .find_where("#sign-in-error", |t| t.contains("not right"))
        .await;
    browser.type_into("#password", PASSWORD).await;
    browser.click("#sign-in").await;
    browser.find("#agents-table").await;

    // The real agent starts while the page is open: it appears online, with its own
    // version, without a reload. `uname` is the one program it allows.
    let agent = HostAgent::start(
        &app,
        &agent_binary,
        "web-1",
        &[("AGENT_EXEC_ALLOW", "uname")],
    );
    let version = env!("CARGO_PKG_VERSION");
    browser
        .find_where("tr[data-agent='web-1']", |t| {
            t.contains("Online") && t.contains(version)
        })
        .await;
    browser.screenshot("02-agents.png").await;

    // Its page shows this host's inventory, as the agent read it.
    browser.click("tr[data-agent='web-1'] a").await;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    browser
        .find_where(".tree", |t| {
            t.contains("kernel") && t.contains(kernel.trim())
        })
        .await;
    browser.type_into("#command-name", "exec").await;
    browser
        .type_into(
            "#command-args",
            "{\"program\": \"uname\", \"args\": [\"-s\"]}",
        )
        .await;
    browser.click("#send-command").await;
    // The page posts the command in the background: wait until the server has it.
    let history = app
        .eventually("/api/v1/agents/web-1/commands", |h| {
            h["commands"][0]["id"].is_string()
        })
        .await;
    let command = history["commands"][0]["id"].as_str().unwrap().to_string();
    browser
        .find_where(&format!("tr[data-command='{command}']"), |t| {
            t.contains("succeeded") && t.contains("Linux")
        })
        .await;
    browser.screenshot("03-agent.png").await;

    browser.click("a[href='#/binaries']").await;
    let build = tempfile::tempdir().unwrap();
    let path = build.path().join(format!("agent-2.5.0-linux-{arch}"));
    std::fs::write(&path, vec![0x7f; 3 * 1024 * 1024]).unwrap();
    let file = browser.find("#upload-file").await;
    browser
        .cmd(
            reqwest::Method::POST,
            &format!("/element/{file}/value"),
            Some(json!({ "text": path.display().to_string() })),
        )
        .await;
    browser.type_into("#upload-name", "agent").await;
    browser.type_into("#upload-version", "2.5.0").await;
    browser.type_into("#upload-os", "linux").await;
    browser.type_into("#upload-arch", arch).await;
    browser
        .type_into("#upload-notes", "Fixes the reconnect storm")
        .await;
    browser.click("#upload-submit").await;
    let (row, _) = browser
        .find_where("#binaries-table tbody tr", |t| t.contains("2.5.0"))
        .await;
    let (_, listed) = app.get("/api/v1/binaries").await;
    assert_eq!(listed["binaries"][0]["size_bytes"], 3 * 1024 * 1024);

    // Roll it out: the agent, on an older version, is told to update.
    let roll = browser
        .cmd(
            reqwest::Method::POST,
            &format!("/element/{row}/element"),
            Some(json!({"using": "xpath", "value": ".//button[contains(., 'Roll out')]"})),
        )
        .await;
    browser
        .click_element(roll[ELEMENT].as_str().expect("a Roll out button"))
        .await;
    // With a failure brake: pause once more than half of the finished updates failed.
    browser.type_into("#rollout-brake", "50").await;
    browser.type_into("#rollout-sample", "1").await;
    browser.click("#rollout-start").await;

    // The real agent downloads the build, checks its size and sha256, and runs it with
    // `--self-check`: these bytes are no program, so the update fails there (before
    // anything is switched) and the agent reports why. The page shows the failure with
    // the agent's reason, and the pause the brake decided, with its reason.
    agent.logged("update offered: downloading").await;
    agent.logged("the server stored the update's outcome").await;
    browser
        .find_where("[data-rollout][data-status='paused']", |t| {
            t.contains("Failed 1")
                && t.contains("Already current 1")
                && t.contains("self-check")
                && t.contains("Paused: failure brake: 1 of 1 updates failed")
        })
        .await;
    browser.screenshot("04-binaries.png").await;
    browser.screenshot("04b-rollout-paused.png").await;
    browser
        .click("[data-rollout] button[data-action='resume']")
        .await;
    browser
        .find_where("[data-rollout][data-status='active']", |t| {
            t.contains("Failed 1")
        })
        .await;

    browser.click("a[href='#/cluster']").await;
    browser
        .find_where("tr[data-pod='pod-test']", |t| t.contains('2'))
        .await;
    browser.screenshot("05-cluster.png").await;

    // The audit log shows what this person just did, by their UI session.
    browser.click("a[href='#/audit']").await;
    for action in [
        "sign_in_failed",
        "sign_in_succeeded",
        "command_created",
        "binary_uploaded",
        "rollout_created",
        "rollout_resumed",
    ] {
        browser
            .find_where(&format!("#audit-table tr[data-action='{action}']"), |t| {
                action.starts_with("sign_in") || t.contains("UI session")
            })
            .await;
    }
    browser.screenshot("06-audit.png").await;

    // An enroll secret is shown once, then listed with its use count only.
    browser.click("a[href='#/credentials']").await;
    browser.type_into("#enroll-name", "rack 12").await;
    browser.type_into("#enroll-labels", "rack-12, eu").await;
    browser.click("#enroll-form button[type='submit']").await;
    let (_, secret) = browser
        .find_where("#enroll-secret-value", |t| t.starts_with("agent-enroll-"))
        .await;
    browser
        .find_where("#enroll-secrets-table tbody tr", |t| t.contains("rack 12"))
        .await;
    let resp = app
        .http
        .post(app.url("/api/v1/enroll"))
        .json(&json!({"secret": secret, "client_id": "rack12-host"}))
        .send()
        .await
        .unwrap();
    let (status, enrolled) = status_json(resp).await;
    assert_eq!(
        status, 201,
        "the secret the page showed enrolls: {enrolled}"
    );
    browser.screenshot("07-credentials.png").await;

    browser.click("#sign-out").await;
    browser.find("#password").await;
    drop(cache);
}

/// Real agents with labels, each with a plug-in `restart-collector` that answers
/// `ran on <id>`.
fn answering_agents(
    app: &TestApp,
    binary: &std::path::Path,
    plugins: &Path,
    agents: &[(&str, &str)],
) -> Vec<HostAgent> {
    agents
        .iter()
        .map(|(id, labels)| {
            let dir = plugins.join(id);
            std::fs::create_dir_all(&dir).unwrap();
            host_agent::plugin(
                &dir,
                "restart-collector",
                &format!("#!/bin/sh\ncat >/dev/null\necho '{{\"stdout\": \"ran on {id}\"}}'\n"),
            );
            let dir = dir.display().to_string();
            HostAgent::start(
                app,
                binary,
                id,
                &[("AGENT_LABELS", labels), ("AGENT_PLUGIN_DIR", &dir)],
            )
        })
        .collect()
}

async fn a_person_runs_a_command_on_agents_with_a_label_and_sees_every_result(app: TestApp) {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let Some(agent_binary) = host_agent::binary() else {
        return;
    };
    let plugins = tempfile::tempdir().unwrap();
    let gpu = "gpu,rack-a3";
    let fleet = answering_agents(
        &app,
        &agent_binary,
        plugins.path(),
        &[
            ("gpu-1", gpu),
            ("gpu-2", gpu),
            ("gpu-3", gpu),
            ("cpu-1", "rack-a3"),
        ],
    );
    for id in ["gpu-1", "gpu-2", "gpu-3", "cpu-1"] {
        app.eventually(&format!("/api/v1/agents/{id}"), |a| a["online"] == true)
            .await;
    }

    browser.goto(&app.url("/")).await;
    browser.type_into("#password", PASSWORD).await;
    browser.click("#sign-in").await;
    browser
        .find_where("tr[data-agent='gpu-1']", |t| {
            t.contains("gpu") && t.contains("rack-a3")
        })
        .await;
    browser.type_into("#agent-label", "gpu").await;
    browser
        .find_where("#run-command", |t| t == "Run a command on 3 agents")
        .await;
    browser.screenshot("06-agents-by-label.png").await;

    browser.click("#run-command").await;
    browser.type_into("#job-name", "restart-collector").await;
    browser
        .type_into("#job-args", "{\"unit\": \"collector\"}")
        .await;
    browser.type_into("#job-max-in-flight", "2").await;
    browser.click("#job-start").await;
    browser
        .find_where("#job-status", |t| t.contains("completed"))
        .await;
    browser
        .find_where("#job-progress", |t| {
            t.contains("Succeeded 3") && t.contains("of 3")
        })
        .await;
    for id in ["gpu-1", "gpu-2", "gpu-3"] {
        browser
            .find_where(&format!("#results-table tr[data-agent='{id}']"), |t| {
                t.contains("succeeded") && t.contains(&format!("ran on {id}"))
            })
            .await;
    }
    browser.screenshot("07-job.png").await;
    browser.click("#result-filter [data-status='failed']").await;
    browser
        .find_where("#results-table tbody", |t| t.contains("No result matches"))
        .await;

    let (_, jobs) = app.get("/api/v1/jobs").await;
    let job = &jobs["jobs"][0];
    assert_eq!(job["target"], json!({"labels": ["gpu"]}));
    assert_eq!(job["max_in_flight"], 2);
    assert_eq!(job["args"], json!({"unit": "collector"}));

    browser.click("nav a[href='#/jobs']").await;
    browser
        .find_where(".card.job", |t| {
            t.contains("restart-collector") && t.contains("completed")
        })
        .await;
    browser.screenshot("08-jobs.png").await;
    drop(fleet);
}

on_sqlite! {
    a_person_signs_in_watches_an_agent_sends_a_command_and_rolls_out_a_binary
        with ["ADMIN_PASSWORD" = "correct horse battery staple"];
    a_person_runs_a_command_on_agents_with_a_label_and_sees_every_result
        with ["ADMIN_PASSWORD" = "correct horse battery staple"];
}
