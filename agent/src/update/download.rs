//! Fetching a build: from the agent's own server with its own token, into
//! `<state_dir>/update/download/<sha256>.part`, resuming with `Range` after a cut, then
//! checked (size and sha256) and renamed to `<sha256>`. Memory stays bounded: the body is
//! written as it arrives, and the checksum is computed by reading the file back.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::config::Secret;
use crate::net::Net;

/// Attempts in a row that may end without a byte more before the download is given up.
const MAX_STALLED_ATTEMPTS: u32 = 5;
/// Silence on the connection after which an attempt is cut and resumed.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// What to fetch.
#[derive(Clone, Debug)]
pub struct Wanted {
    /// Path and query on the agent's server.
    pub path: String,
    /// Lowercase hex.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
}

/// Downloads (or finds, already checked) the build into `dir`; returns its path.
pub async fn fetch(
    net: &Net,
    token: &Secret,
    dir: &Path,
    wanted: &Wanted,
) -> Result<PathBuf, String> {
    let io = |what: &str, e: std::io::Error| format!("{what} in {}: {e}", dir.display());
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| io("cannot create the download directory", e))?;
    let done = dir.join(&wanted.sha256);
    let part = dir.join(format!("{}.part", wanted.sha256));
    remove_others(dir, &wanted.sha256).await;
    if tokio::fs::metadata(&done).await.is_ok() {
        if check(&done, wanted).await.is_ok() {
            return Ok(done);
        }
        let _ = tokio::fs::remove_file(&done).await;
    }

    let mut stalled = 0;
    let mut resumed = 0u32;
    loop {
        let have = tokio::fs::metadata(&part)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        if have > wanted.size {
            let _ = tokio::fs::remove_file(&part).await;
            continue;
        }
        if have == wanted.size {
            break;
        }
        if have > 0 {
            resumed += 1;
            tracing::info!(offset = have, size = wanted.size, "resuming the download");
        }
        match attempt(net, token, &part, have, wanted).await {
            Ok(()) => {}
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Cut(e)) => {
                let now = tokio::fs::metadata(&part)
                    .await
                    .map(|m| m.len())
                    .unwrap_or(0);
                stalled = if now > have { 0 } else { stalled + 1 };
                if stalled >= MAX_STALLED_ATTEMPTS {
                    return Err(format!(
                        "download failed {MAX_STALLED_ATTEMPTS} times in a row without progress: {e}"
                    ));
                }
                let delay = Duration::from_millis(200 << stalled.min(5));
                tracing::warn!(error = %e, received = now, size = wanted.size, delay_ms = delay.as_millis() as u64, "download cut; resuming");
                tokio::time::sleep(delay).await;
            }
        }
    }
    if let Err(e) = check(&part, wanted).await {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(e);
    }
    tokio::fs::rename(&part, &done)
        .await
        .map_err(|e| io("cannot keep the download", e))?;
    tracing::info!(path = %done.display(), bytes = wanted.size, resumed, "build downloaded and checked");
    Ok(done)
}

enum Attempt {
    /// Worth resuming: the connection failed or was cut.
    Cut(String),
    /// Not worth retrying: the server refused, or the disk failed.
    Fatal(String),
}

/// One request from byte `have` on, appended to `part`.
async fn attempt(
    net: &Net,
    token: &Secret,
    part: &Path,
    have: u64,
    wanted: &Wanted,
) -> Result<(), Attempt> {
    let resp = net
        .get(&wanted.path, token, have)
        .await
        .map_err(Attempt::Cut)?;
    let status = resp.status().as_u16();
    let append = match status {
        206 => {
            let start = resp
                .headers()
                .get(http::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            if start != Some(have) {
                return Err(Attempt::Fatal(format!(
                    "the server answered a range from byte {have} with Content-Range {:?}",
                    resp.headers().get(http::header::CONTENT_RANGE)
                )));
            }
            true
        }
        // The whole file (the server ignored the range): start again.
        200 => false,
        // Asked past the end: what we have is suspect; start again.
        416 => {
            let _ = tokio::fs::remove_file(part).await;
            return Err(Attempt::Cut("the server refused the range (416)".into()));
        }
        408 | 429 | 500..=599 => {
            return Err(Attempt::Cut(format!("the server answered HTTP {status}")));
        }
        _ => {
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let message = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
            return Err(Attempt::Fatal(format!(
                "the server refused the download: HTTP {status}: {message}"
            )));
        }
    };
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(part)
        .await
        .map_err(|e| Attempt::Fatal(format!("cannot write {}: {e}", part.display())))?;
    let mut written = if append { have } else { 0 };
    let mut body = resp.into_body();
    loop {
        let frame = match tokio::time::timeout(READ_TIMEOUT, body.frame()).await {
            Err(_) => {
                let _ = file.flush().await;
                return Err(Attempt::Cut(format!(
                    "nothing received for {} s",
                    READ_TIMEOUT.as_secs()
                )));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                let _ = file.flush().await;
                return Err(Attempt::Cut(e.to_string()));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        written += data.len() as u64;
        if written > wanted.size {
            drop(file);
            let _ = tokio::fs::remove_file(part).await;
            return Err(Attempt::Fatal(format!(
                "the server sent more than the {} bytes announced",
                wanted.size
            )));
        }
        file.write_all(&data)
            .await
            .map_err(|e| Attempt::Fatal(format!("cannot write {}: {e}", part.display())))?;
    }
    file.sync_all()
        .await
        .map_err(|e| Attempt::Fatal(format!("cannot write {}: {e}", part.display())))?;
    if written < wanted.size {
        return Err(Attempt::Cut(format!(
            "the response ended after {written} of {} bytes",
            wanted.size
        )));
    }
    Ok(())
}

/// Size, then sha256 (reading the file back in a blocking thread).
async fn check(path: &Path, wanted: &Wanted) -> Result<(), String> {
    let path = path.to_path_buf();
    let (size, expected) = (wanted.size, wanted.sha256.to_ascii_lowercase());
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len != size {
            return Err(format!("the download is {len} bytes; the update announced {size}"));
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let got: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if got != expected {
            return Err(format!(
                "the download's sha256 is {got}; the update announced {expected}: deleted, not installed"
            ));
        }
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Removes downloads of other builds: only one is kept.
async fn remove_others(dir: &Path, sha256: &str) {
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with(sha256) {
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
    }
}
