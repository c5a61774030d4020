//! External tools (docker, kind, kubectl, helm) run with a bound and a clear error.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

use crate::wait;

/// A tool the kind target needs, and how to get it.
pub struct Tool {
    pub name: &'static str,
    pub install: &'static str,
}

pub const TOOLS: &[Tool] = &[
    Tool {
        name: "docker",
        install: "Docker Engine: https://docs.docker.com/engine/install/ (the daemon must be running)",
    },
    Tool {
        name: "kind",
        install: "kind v0.31.0 (the release the pinned node image is built for): a release binary from https://kind.sigs.k8s.io/docs/user/quick-start/#installation, or `go install sigs.k8s.io/kind@v0.31.0`",
    },
    Tool {
        name: "kubectl",
        install: "kubectl: https://kubernetes.io/docs/tasks/tools/#kubectl",
    },
    Tool {
        name: "helm",
        install: "Helm 3.18+ or 4: https://helm.sh/docs/intro/install/",
    },
];

/// Looks `name` up on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|p| p.join(name))
        .find(|p| p.is_file())
}

/// Runs `program args` within `bound`, capturing its output; fails with its stderr.
pub async fn output(program: &str, args: &[&str], bound: Duration) -> Result<String> {
    let what = format!("{program} {}", args.join(" "));
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting `{what}`"))?;
    let out = wait::bounded(&format!("`{what}`"), bound, child.wait_with_output())
        .await?
        .with_context(|| format!("running `{what}`"))?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args` within `bound` with its output shown as it comes (long builds).
pub async fn streamed(
    program: &str,
    args: &[&str],
    dir: Option<&Path>,
    bound: Duration,
) -> Result<()> {
    let what = format!("{program} {}", args.join(" "));
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting `{what}`"))?;
    let status = wait::bounded(&format!("`{what}`"), bound, child.wait())
        .await?
        .with_context(|| format!("running `{what}`"))?;
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    Ok(())
}
