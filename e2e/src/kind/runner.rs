//! One sequence of steps, two ways to go through it: run it (`e2e kind`) or only write it
//! down (`e2e kind --plan`).
//!
//! The setup code calls the [`Runner`] for every command, manifest, API patch and wait.
//! Each call is recorded as a line of the plan (paths shown relative to the repository),
//! and, in [`Mode::Live`], carried out. In [`Mode::Plan`] nothing runs: commands return
//! `None` (the caller substitutes a placeholder for their output), API calls and waits are
//! skipped. The plan is therefore the real run's own sequence, not a description of it
//! kept by hand; `tests/kind_plan.rs` compares it with a reviewed snapshot.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ::kube::Client;
use anyhow::{Context, Result};

use super::command::{output, streamed};

/// Whether steps run or are only recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Print what would run; needs no Docker, no cluster.
    Plan,
    /// Run it.
    Live,
}

/// Records (and in live mode performs) the kind target's steps.
pub struct Runner {
    mode: Mode,
    /// Absolute paths under it are shown relative to it.
    repo: PathBuf,
    /// The plan so far.
    lines: Vec<String>,
    steps: usize,
    /// The API client, once the cluster exists (live mode only).
    client: Option<Client>,
}

/// How a command is run.
pub struct Cmd<'a> {
    pub program: &'a str,
    pub args: Vec<String>,
    pub bound: Duration,
    /// Run from this directory (the repository for `docker build`).
    pub dir: Option<&'a Path>,
    /// Show the command's output as it comes instead of capturing it (long builds).
    pub streamed: bool,
}

impl<'a> Cmd<'a> {
    pub fn new(program: &'a str, args: &[&str], bound: Duration) -> Self {
        Self {
            program,
            args: args.iter().map(|a| a.to_string()).collect(),
            bound,
            dir: None,
            streamed: false,
        }
    }

    pub fn streamed(mut self, dir: Option<&'a Path>) -> Self {
        self.streamed = true;
        self.dir = dir;
        self
    }
}

impl Runner {
    pub fn new(mode: Mode, repo: &Path) -> Self {
        Self {
            mode,
            repo: repo.to_path_buf(),
            lines: Vec::new(),
            steps: 0,
            client: None,
        }
    }

    pub fn live(&self) -> bool {
        self.mode == Mode::Live
    }

    /// The plan recorded so far.
    pub fn plan(&self) -> String {
        let mut text = self.lines.join("\n");
        text.push('\n');
        text
    }

    /// `path` as the plan shows it: relative to the repository when inside it.
    pub fn show(&self, path: &Path) -> String {
        path.strip_prefix(&self.repo)
            .map_or_else(|_| path.display().to_string(), |p| p.display().to_string())
    }

    /// Text with every absolute path inside the repository made relative.
    fn relative(&self, text: &str) -> String {
        let prefix = format!("{}/", self.repo.display());
        text.replace(&prefix, "")
    }

    fn record(&mut self, line: String) {
        let line = self.relative(&line);
        if self.live() {
            println!("{line}");
        }
        self.lines.push(line);
    }

    /// A numbered step heading.
    pub fn step(&mut self, title: &str) {
        self.steps += 1;
        let line = format!("==> {}. {title}", self.steps);
        if !self.lines.is_empty() {
            self.lines.push(String::new());
        }
        self.record(line);
    }

    /// A remark in the plan (a decision the harness made, a version it pins).
    pub fn note(&mut self, text: &str) {
        self.record(format!("  # {text}"));
    }

    /// Runs a command (live) and returns its standard output; `None` in plan mode.
    pub async fn run(&mut self, cmd: Cmd<'_>) -> Result<Option<String>> {
        let shown: Vec<String> = cmd.args.iter().map(|a| shell_word(a)).collect();
        self.record(format!("  $ {} {}", cmd.program, shown.join(" ")));
        if !self.live() {
            return Ok(None);
        }
        let args: Vec<&str> = cmd.args.iter().map(String::as_str).collect();
        if cmd.streamed {
            streamed(cmd.program, &args, cmd.dir, cmd.bound).await?;
            Ok(Some(String::new()))
        } else {
            output(cmd.program, &args, cmd.bound).await.map(Some)
        }
    }

    /// Writes a file the following commands use (kind config, manifests, values), and
    /// records its whole text in the plan.
    pub fn write(&mut self, path: &Path, text: &str, private: bool) -> Result<()> {
        self.record(format!("  write {}:", self.show(path)));
        let body: Vec<String> = text.lines().map(|l| format!("  | {l}")).collect();
        let body = self.relative(&body.join("\n"));
        if self.live() {
            if private {
                write_private(path, text)?;
            } else {
                std::fs::write(path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        } else {
            self.lines.push(body);
        }
        Ok(())
    }

    /// An API call (a patch, a read that asserts something); returns the client in live
    /// mode, so the caller performs it, and `None` in plan mode.
    pub fn api(&mut self, what: &str) -> Option<Client> {
        self.record(format!("  api: {what}"));
        self.client.clone()
    }

    /// A bounded wait; returns the client in live mode, `None` in plan mode.
    pub fn wait(&mut self, what: &str, bound: Duration) -> Option<Client> {
        self.record(format!("  wait ≤{}s: {what}", bound.as_secs()));
        self.client.clone()
    }

    /// A check that runs without the API (a local port, a file).
    pub fn check(&mut self, what: &str) -> bool {
        self.record(format!("  check: {what}"));
        self.live()
    }

    pub fn set_client(&mut self, client: Client) {
        self.client = Some(client);
    }

    pub fn client(&self) -> Option<Client> {
        self.client.clone()
    }
}

/// A word as a shell would need it: quoted when it holds anything beyond the safe set.
fn shell_word(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Writes `text` readable by the owner only (kubeconfig, values with the secret key).
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_only_when_a_shell_needs_it() {
        assert_eq!(shell_word("--type=merge"), "--type=merge");
        assert_eq!(shell_word("{{.Id}}"), "'{{.Id}}'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }

    #[tokio::test]
    async fn the_plan_records_commands_and_files_without_running_them() {
        let repo = Path::new("/nowhere/repo");
        let mut runner = Runner::new(Mode::Plan, repo);
        runner.step("first");
        let out = runner
            .run(Cmd::new(
                "no-such-program",
                &["--kubeconfig", "/nowhere/repo/target/k"],
                Duration::from_secs(1),
            ))
            .await
            .unwrap();
        assert!(out.is_none());
        runner
            .write(
                &repo.join("target/x.yaml"),
                "a: 1\nb: /nowhere/repo/c",
                false,
            )
            .unwrap();
        assert!(runner.wait("something", Duration::from_secs(60)).is_none());
        assert_eq!(
            runner.plan(),
            "==> 1. first\n  $ no-such-program --kubeconfig target/k\n  write target/x.yaml:\n  | a: 1\n  | b: c\n  wait ≤60s: something\n"
        );
    }
}
