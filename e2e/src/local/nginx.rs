//! nginx as the local target's ingress.
//!
//! Its configuration is generated from the chart's ingress values and mirrors what
//! ingress-nginx renders for the chart's Ingresses, one location per path of each route
//! of `routes`: WebSocket upgrade headers, HTTP/1.1 to the upstream, the route's proxy
//! read/send timeouts and `client_max_body_size`, the connect timeout, no response
//! buffering (no request buffering on the binaries route), and ingress-nginx's default
//! `proxy_next_upstream error timeout` with three tries (a connection refused by a dead
//! pod is tried on the next one; a request already sent is never repeated).
//!
//! Upstream changes play the part of Kubernetes endpoint changes: the harness rewrites the
//! `upstream` block and reloads nginx (SIGHUP), then waits until the new configuration is
//! the only one accepting connections: the new generation answers on a fresh connection
//! and every worker of the previous generation has stopped accepting ("shutting down").
//! Old workers keep their open WebSockets until those close, as nginx does on any reload.
//!
//! nginx runs in the foreground as a child of the harness, with every path (pid, logs,
//! temporary files) inside the run's directory; nothing outside it is touched.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use super::process::{signal, spawn_logged, tail, wait_exit};
use crate::values::{RouteLimits, whole_seconds};
use crate::wait::{self, Check};

/// What the configuration carries besides the upstreams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub connect_timeout: Duration,
    /// Each route's paths, timeouts and body size.
    pub routes: Vec<RouteLimits>,
}

pub struct Nginx {
    bin: String,
    dir: PathBuf,
    pub port: u16,
    generation: u64,
    child: Child,
    /// Fresh connections only: a pooled connection to an old worker would report the
    /// old generation.
    http: reqwest::Client,
}

impl Nginx {
    /// Starts nginx on `port` in front of `upstreams` (server ports on 127.0.0.1).
    pub async fn start(
        bin: &str,
        dir: &Path,
        port: u16,
        upstreams: &[u16],
        settings: &Settings,
    ) -> Result<Nginx> {
        std::fs::create_dir_all(dir)?;
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, render(1, dir, port, upstreams, settings))?;
        test_config(bin, dir).await?;
        let mut command = Command::new(bin);
        command
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"));
        let (child, _) = spawn_logged(command, &dir.join("nginx.out"))?;
        let mut nginx = Nginx {
            bin: bin.to_string(),
            dir: dir.to_path_buf(),
            port,
            generation: 1,
            child,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .pool_max_idle_per_host(0)
                .build()?,
        };
        nginx.wait_generation(&HashSet::new()).await?;
        Ok(nginx)
    }

    fn master(&self) -> Result<u32> {
        self.child.id().context("nginx exited")
    }

    /// Rewrites the configuration and reloads; returns once only the new one accepts
    /// connections.
    pub async fn reconfigure(&mut self, upstreams: &[u16], settings: &Settings) -> Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!(
                "nginx exited ({status}):\n{}",
                tail(&self.dir.join("error.log"), 20)
            );
        }
        self.generation += 1;
        std::fs::write(
            self.dir.join("nginx.conf"),
            render(self.generation, &self.dir, self.port, upstreams, settings),
        )?;
        test_config(&self.bin, &self.dir).await?;
        let master = self.master()?;
        let before = children(master);
        signal(master, libc::SIGHUP)?;
        self.wait_generation(&before).await
    }

    async fn wait_generation(&mut self, old_workers: &HashSet<u32>) -> Result<()> {
        let generation = self.generation;
        let url = format!("http://127.0.0.1:{}/__e2e/generation", self.port);
        let http = self.http.clone();
        let error_log = self.dir.join("error.log");
        wait::until(
            &format!("nginx to serve configuration {generation}"),
            Duration::from_secs(15),
            Duration::from_millis(25),
            || async {
                let served = match http.get(&url).send().await {
                    Ok(r) => r.text().await.unwrap_or_default().trim().to_string(),
                    Err(e) => format!("no answer ({e})"),
                };
                let accepting: Vec<u32> = old_workers
                    .iter()
                    .copied()
                    .filter(|pid| accepting_worker(*pid))
                    .collect();
                Ok(
                    if served == generation.to_string() && accepting.is_empty() {
                        Check::Ready(())
                    } else {
                        Check::Pending(format!(
                            "serving `{served}`, {} old workers still accepting",
                            accepting.len()
                        ))
                    },
                )
            },
        )
        .await
        .with_context(|| format!("nginx error log:\n{}", tail(&error_log, 20)))
    }

    /// Fast shutdown: open connections are closed at once.
    pub async fn stop(mut self) -> Result<()> {
        if let Ok(pid) = self.master() {
            signal(pid, libc::SIGTERM)?;
            wait_exit(&mut self.child, Duration::from_secs(10)).await?;
        }
        Ok(())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // kill_on_drop would SIGKILL only the master and orphan its workers, which would
        // keep the port; SIGTERM lets the master take its workers down.
        if let Some(pid) = self.child.id() {
            let _ = signal(pid, libc::SIGTERM);
        }
    }
}

async fn test_config(bin: &str, dir: &Path) -> Result<()> {
    let out = Command::new(bin)
        .arg("-t")
        .arg("-q")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .output()
        .await
        .with_context(|| {
            format!("running `{bin} -t` (is nginx installed? apt-get install -y nginx)")
        })?;
    if !out.status.success() {
        bail!(
            "nginx rejected the generated configuration ({}):\n{}{}",
            dir.join("nginx.conf").display(),
            String::from_utf8_lossy(&out.stderr),
            tail(&dir.join("error.log"), 10)
        );
    }
    Ok(())
}

/// Children of `pid` (nginx's workers), from /proc.
fn children(pid: u32) -> HashSet<u32> {
    let mut found = HashSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            found.insert(child);
        }
    }
    found
}

/// A worker that still accepts connections: alive, and not yet retitled "shutting down"
/// (nginx retitles a worker when it closes its listening sockets on a reload).
fn accepting_worker(pid: u32) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let title = String::from_utf8_lossy(&cmdline);
            title.contains("worker process") && !title.contains("shutting down")
        }
        Err(_) => false,
    }
}

/// The whole nginx.conf for one generation.
pub fn render(
    generation: u64,
    dir: &Path,
    port: u16,
    upstreams: &[u16],
    settings: &Settings,
) -> String {
    let d = dir.display();
    let mut servers = String::new();
    for upstream in upstreams {
        // max_fails=0: like ingress-nginx's balancer, never take a pod out on errors;
        // endpoint changes (here: reloads) decide who is in.
        let _ = writeln!(servers, "        server 127.0.0.1:{upstream} max_fails=0;");
    }
    // As root, nginx would switch its workers to `nobody`, who cannot write the temporary
    // directories under the run directory.
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root root;\n"
    } else {
        ""
    };
    format!(
        r#"# Generated by the e2e harness from the chart's ingress values; generation {generation}.
{user}daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {d}/nginx.pid;
error_log {d}/error.log notice;

events {{
    worker_connections 8192;
}}

http {{
    # The path only: a `?token=` must not reach the access log.
    log_format e2e '$time_iso8601 $request_method $uri $status $upstream_addr $request_time';
    access_log {d}/access.log e2e;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    upstream agent_server {{
{servers}    }}

    server {{
        listen 127.0.0.1:{port};

        location = /__e2e/generation {{
            return 200 "{generation}\n";
        }}

{locations}    }}
}}
"#,
        locations = locations(settings),
    )
}

/// One location per path of each route, with that route's limits (what ingress-nginx
/// writes for a path of an Ingress with the route's annotations).
fn locations(settings: &Settings) -> String {
    let connect = whole_seconds(settings.connect_timeout).min(75);
    let mut out = String::new();
    for route in &settings.routes {
        let timeout = whole_seconds(route.timeout);
        let buffering = if route.stream_body { "off" } else { "on" };
        for path in route.paths {
            let _ = write!(
                out,
                r#"
        # routes.{name}
        location {path} {{
            client_max_body_size {body};
            proxy_pass http://agent_server;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_connect_timeout {connect}s;
            proxy_read_timeout {timeout}s;
            proxy_send_timeout {timeout}s;
            proxy_buffering off;
            proxy_request_buffering {buffering};
            proxy_next_upstream error timeout;
            proxy_next_upstream_tries 3;
        }}
"#,
                name = route.name,
                body = route.body_size,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_carries_each_routes_limits_and_every_upstream() {
        let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../chart");
        let values = crate::values::ChartValues::load(&chart, &[]).unwrap();
        let settings = Settings {
            connect_timeout: Duration::from_secs(30),
            routes: values.ingress().unwrap().routes,
        };
        let conf = render(7, Path::new("/tmp/x"), 8080, &[1001, 1002], &settings);
        let location = |path: &str| {
            let start = conf
                .find(&format!("location {path} {{"))
                .unwrap_or_else(|| panic!("no location {path}:\n{conf}"));
            let block = &conf[start..];
            block[..block.find('}').unwrap()].to_string()
        };
        let ws = location("/ws");
        assert!(ws.contains("proxy_read_timeout 3600s;"), "{ws}");
        assert!(ws.contains("proxy_send_timeout 3600s;"), "{ws}");
        let inventory = location("/api/v1/agents");
        assert!(
            inventory.contains("client_max_body_size 10m;"),
            "{inventory}"
        );
        assert!(inventory.contains("proxy_read_timeout 60s;"), "{inventory}");
        let binaries = location("/api/v1/binaries");
        assert!(
            binaries.contains("client_max_body_size 512m;"),
            "{binaries}"
        );
        assert!(
            binaries.contains("proxy_request_buffering off;"),
            "{binaries}"
        );
        for path in ["/api", "/"] {
            let rest = location(path);
            assert!(rest.contains("client_max_body_size 1m;"), "{rest}");
            assert!(rest.contains("proxy_read_timeout 60s;"), "{rest}");
            assert!(rest.contains("proxy_connect_timeout 30s;"), "{rest}");
        }
        assert!(conf.contains("server 127.0.0.1:1001 max_fails=0;"));
        assert!(conf.contains("server 127.0.0.1:1002 max_fails=0;"));
        assert!(conf.contains("return 200 \"7\\n\";"));
        assert!(conf.contains("pid /tmp/x/nginx.pid;"));
    }
}
