//! Child processes the local target owns: signals, bounded waits, logs to files.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: i32) -> Result<()> {
    // SAFETY: kill(2) on a pid this harness spawned; no memory is involved.
    if unsafe { libc::kill(pid as i32, signal) } != 0 {
        bail!(
            "kill({pid}, {signal}) failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Waits for `child` to exit, at most `bound`.
pub async fn wait_exit(child: &mut Child, bound: Duration) -> Result<(ExitStatus, Duration)> {
    let start = Instant::now();
    match tokio::time::timeout(bound, child.wait()).await {
        Ok(status) => Ok((status?, start.elapsed())),
        Err(_) => bail!("still running {bound:?} after the signal"),
    }
}

/// Copies every line of `stream` into `log`, and hands the lines to `lines` when given.
pub fn pump(
    stream: impl AsyncRead + Unpin + Send + 'static,
    log: PathBuf,
    lines: Option<mpsc::UnboundedSender<String>>,
) {
    tokio::spawn(async move {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .await;
        let Ok(mut file) = file else { return };
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            let _ = file.write_all(line.as_bytes()).await;
            let _ = file.write_all(b"\n").await;
            if let Some(tx) = &lines {
                let _ = tx.send(line);
            }
        }
        let _ = file.flush().await;
    });
}

/// Spawns `command` with both output streams appended to `log`; stderr lines are also
/// sent to the returned channel.
pub fn spawn_logged(
    mut command: Command,
    log: &Path,
) -> Result<(Child, mpsc::UnboundedReceiver<String>)> {
    let program = format!("{:?}", command.as_std().get_program());
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let (tx, rx) = mpsc::unbounded_channel();
    if let Some(out) = child.stdout.take() {
        pump(out, log.to_path_buf(), None);
    }
    if let Some(err) = child.stderr.take() {
        pump(err, log.to_path_buf(), Some(tx));
    }
    Ok((child, rx))
}

/// The last `n` lines of a log file, for error messages.
pub fn tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A port that was free a moment ago (the kernel's pick for port 0).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}
