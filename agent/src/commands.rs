//! Commands other than `inventory` (which the session handles, since it sends a message):
//! `ping`, `exec` of allowlisted programs, and plug-ins.
//!
//! Nothing goes through a shell: `exec` runs `program` with `args` as given, and only when
//! `program` is in the agent's own allowlist, so a compromised server cannot run
//! arbitrary code on the fleet. Output is capped and every run has a timeout.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use agent_protocol::ResultStatus;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::config::Config;
use crate::journal::Outcome;

/// What a command name refers to.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind {
    Ping,
    Inventory,
    Exec,
    Plugin(PathBuf),
    Unknown,
}

pub fn kind(cfg: &Config, name: &str) -> Kind {
    match name {
        "ping" => Kind::Ping,
        "inventory" => Kind::Inventory,
        "exec" => Kind::Exec,
        _ => match plugin(cfg.plugin_dir.as_deref(), name) {
            Some(path) => Kind::Plugin(path),
            None => Kind::Unknown,
        },
    }
}

/// The plug-in `name`: an executable regular file directly in the plug-in directory.
fn plugin(dir: Option<&Path>, name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = dir?;
    // The name is a file name, never a path.
    if agent_protocol::check_client_id(name).is_err() || name.starts_with('.') {
        return None;
    }
    let path = dir.join(name);
    let meta = std::fs::metadata(&path).ok()?;
    (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(path)
}

fn ok(output: Value) -> Outcome {
    Outcome {
        status: ResultStatus::Ok,
        output,
    }
}

pub fn failed(error: &str, message: impl Into<String>) -> Outcome {
    Outcome {
        status: ResultStatus::Error,
        output: json!({"error": error, "message": message.into()}),
    }
}

pub fn ping() -> Outcome {
    ok(json!({"pong": true, "ts": crate::journal::now_ms()}))
}

/// `exec`'s arguments.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecArgs {
    program: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    timeout_seconds: Option<f64>,
}

/// `{"program", "args": [...], "timeout_seconds"?}` → `{"exit_code", "stdout", "stderr"}`;
/// status `ok` when the program exits 0.
pub async fn exec(cfg: &Config, args: &str, output_cap: usize) -> Outcome {
    let args: ExecArgs = match serde_json::from_str(args) {
        Ok(a) => a,
        Err(e) => {
            return failed(
                "invalid_args",
                format!("exec takes {{\"program\", \"args\": [...], \"timeout_seconds\"?}}: {e}"),
            );
        }
    };
    if !cfg.exec_allow.contains(&args.program) {
        return failed(
            "not_allowed",
            format!(
                "`{}` is not in this agent's exec allowlist (exec_allow / AGENT_EXEC_ALLOW)",
                args.program
            ),
        );
    }
    let limit = match args.timeout_seconds {
        Some(t) if t.is_finite() && t > 0.0 => Duration::from_secs_f64(t).min(cfg.command_timeout),
        Some(t) => {
            return failed(
                "invalid_args",
                format!("timeout_seconds {t} must be positive"),
            );
        }
        None => cfg.command_timeout,
    };
    let mut cmd = Command::new(&args.program);
    cmd.args(&args.args);
    run(cmd, None, limit, output_cap)
        .await
        .map(|r| {
            let status = if r.exit_code == Some(0) {
                ResultStatus::Ok
            } else {
                ResultStatus::Error
            };
            Outcome {
                status,
                output: r.to_json(),
            }
        })
        .unwrap_or_else(|e| e)
}

/// Runs the plug-in with the args as JSON on stdin; its stdout (JSON) is the output.
pub async fn plugin_run(cfg: &Config, path: &Path, args: &str, output_cap: usize) -> Outcome {
    let cmd = Command::new(path);
    let r = match run(
        cmd,
        Some(args.as_bytes().to_vec()),
        cfg.command_timeout,
        output_cap,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return e,
    };
    if r.exit_code != Some(0) {
        return Outcome {
            status: ResultStatus::Error,
            output: r.to_json(),
        };
    }
    match serde_json::from_str::<Value>(&r.stdout) {
        Ok(output) if !r.truncated => ok(output),
        _ => failed(
            "invalid_plugin_output",
            format!(
                "the plug-in's stdout is not one JSON document{}: {}",
                if r.truncated { " (too long)" } else { "" },
                r.stdout.chars().take(200).collect::<String>()
            ),
        ),
    }
}

struct Ran {
    /// `None` when killed by a signal or the timeout.
    exit_code: Option<i32>,
    stdout: String,
    stderr: String,
    truncated: bool,
    timed_out: bool,
}

impl Ran {
    fn to_json(&self) -> Value {
        let mut v = json!({
            "exit_code": self.exit_code,
            "stdout": self.stdout,
            "stderr": self.stderr,
        });
        if self.truncated {
            v["truncated"] = true.into();
        }
        if self.timed_out {
            v["error"] = "timeout".into();
        }
        v
    }
}

async fn run(
    mut cmd: Command,
    stdin: Option<Vec<u8>>,
    limit: Duration,
    cap: usize,
) -> Result<Ran, Outcome> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let program = format!("{:?}", cmd.as_std().get_program());
    let mut child = cmd
        .spawn()
        .map_err(|e| failed("spawn_failed", format!("cannot run {program}: {e}")))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        tokio::spawn(async move {
            let _ = pipe.write_all(&input).await;
        });
    }
    let stdout = child
        .stdout
        .take()
        .map(|p| tokio::spawn(read_capped(p, cap)));
    let stderr = child
        .stderr
        .take()
        .map(|p| tokio::spawn(read_capped(p, cap)));
    let (exit_code, timed_out) = match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) => (status.code(), false),
        Ok(Err(e)) => return Err(failed("wait_failed", e.to_string())),
        Err(_) => {
            let _ = child.kill().await;
            (None, true)
        }
    };
    let collect = |h: Option<tokio::task::JoinHandle<(String, bool)>>| async move {
        match h {
            // A grandchild may hold the pipe open: bound the wait.
            Some(h) => tokio::time::timeout(Duration::from_secs(2), h)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default(),
            None => Default::default(),
        }
    };
    let (stdout, t1) = collect(stdout).await;
    let (stderr, t2) = collect(stderr).await;
    Ok(Ran {
        exit_code,
        stdout,
        stderr,
        truncated: t1 || t2,
        timed_out,
    })
}

/// Reads to the end, keeping the first `cap` bytes (so the writer never blocks on a full
/// pipe); true when some were dropped.
async fn read_capped(mut pipe: impl AsyncRead + Unpin, cap: usize) -> (String, bool) {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    let mut truncated = false;
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                truncated |= n > room;
            }
        }
    }
    (String::from_utf8_lossy(&kept).into_owned(), truncated)
}
