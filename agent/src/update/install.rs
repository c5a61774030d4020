//! Putting a checked build in place: its self-check, the atomic switch (the previous
//! build kept beside the executable as `<exe>.previous`), the restore, and `exec`.
//!
//! The switch renames the new build over the executable, so every process started from
//! that path afterwards (a systemd restart included) runs it; the restore renames the
//! previous build back. Both renames stay within the executable's directory, so each is
//! atomic: at every moment the path holds one complete build.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Bound on a build's self-check.
pub const SELF_CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// Where this process's executable is: the path the switch replaces.
pub fn current_exe() -> Result<PathBuf, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find this agent's executable: {e}"))?;
    if exe.to_string_lossy().ends_with(" (deleted)") {
        return Err(format!(
            "this agent's executable {} was replaced or removed while it runs; restart the agent before updating it",
            exe.display()
        ));
    }
    Ok(exe)
}

/// `<exe>.previous`: where the build that is replaced is kept.
pub fn previous_of(exe: &Path) -> PathBuf {
    let mut name = exe.file_name().unwrap_or_default().to_os_string();
    name.push(".previous");
    exe.with_file_name(name)
}

/// Runs `build --self-check ARGS` (the agent's own arguments, so it loads the same
/// configuration) and requires it to print `expected`, its version. A build that cannot
/// start, exits with an error, hangs or reports another version is refused.
pub async fn self_check(build: &Path, args: &[OsString], expected: &str) -> Result<(), String> {
    let _ = std::fs::set_permissions(build, std::fs::Permissions::from_mode(0o755));
    let child = tokio::process::Command::new(build)
        .arg("--self-check")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("self-check: the build cannot be started: {e}"))?;
    let out = match tokio::time::timeout(SELF_CHECK_TIMEOUT, child.wait_with_output()).await {
        Err(_) => {
            return Err(format!(
                "self-check: the build did not answer within {} s",
                SELF_CHECK_TIMEOUT.as_secs()
            ));
        }
        Ok(Err(e)) => return Err(format!("self-check: {e}")),
        Ok(Ok(out)) => out,
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim();
    if !out.status.success() {
        return Err(format!(
            "self-check: the build exited with {}{}",
            describe(out.status),
            if stderr.is_empty() {
                String::new()
            } else {
                format!(": {}", clip(stderr, 300))
            }
        ));
    }
    let reported = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if reported != expected {
        return Err(format!(
            "self-check: the build reports version {:?}, not {expected}",
            clip(&reported, 100)
        ));
    }
    Ok(())
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("status {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => "an unknown status".into(),
    }
}

fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Keeps the running build as `<exe>.previous` and renames `build` over `exe`.
pub fn switch(build: &Path, exe: &Path) -> Result<(), String> {
    let dir = exe
        .parent()
        .ok_or_else(|| format!("{} has no directory", exe.display()))?;
    let fail = |what: &str, e: std::io::Error| {
        let hint = match e.raw_os_error() {
            Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM) => {
                " (the agent needs write access to its executable's directory to update itself; a packaged agent is updated by its package manager)"
            }
            _ => "",
        };
        format!("{what}: {e}{hint}")
    };
    let previous = previous_of(exe);
    match std::fs::remove_file(&previous) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(fail(&format!("cannot replace {}", previous.display()), e));
        }
        _ => {}
    }
    // A second name for the running build, unless the file system refuses links.
    if std::fs::hard_link(exe, &previous).is_err() {
        copy_synced(exe, &previous).map_err(|e| {
            fail(
                &format!("cannot keep the previous build as {}", previous.display()),
                e,
            )
        })?;
    }
    let mut name = OsString::from(".");
    name.push(exe.file_name().unwrap_or_default());
    name.push(".incoming");
    let incoming = dir.join(name);
    // Same directory as the executable, so that the final rename is atomic.
    copy_synced(build, &incoming)
        .map_err(|e| fail(&format!("cannot write {}", incoming.display()), e))?;
    std::fs::set_permissions(&incoming, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| fail(&format!("cannot make {} executable", incoming.display()), e))?;
    if let Err(e) = std::fs::rename(&incoming, exe) {
        let _ = std::fs::remove_file(&incoming);
        return Err(fail(&format!("cannot replace {}", exe.display()), e));
    }
    sync_dir(dir);
    let _ = std::fs::remove_file(build);
    Ok(())
}

/// Renames `<exe>.previous` back over `exe`.
pub fn restore(exe: &Path, previous: &Path) -> Result<(), String> {
    std::fs::rename(previous, exe).map_err(|e| {
        format!(
            "cannot restore the previous build {} over {}: {e}",
            previous.display(),
            exe.display()
        )
    })?;
    if let Some(dir) = exe.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Replaces this process with `exe ARGS` (same process id, same environment). Returns
/// only on failure.
pub fn exec(exe: &Path, args: &[OsString]) -> String {
    let e = std::process::Command::new(exe).args(args).exec();
    format!("cannot run {}: {e}", exe.display())
}

fn copy_synced(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::copy(from, to)?;
    std::fs::File::open(to)?.sync_all()
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(path: &Path, body: &str) {
        std::fs::write(path, body).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn self_check_refuses_builds_that_fail_hang_or_report_another_version() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        script(
            &good,
            "#!/bin/sh\n[ \"$1\" = --self-check ] && echo 1.1.0\n",
        );
        self_check(&good, &[], "1.1.0").await.unwrap();

        let exits = dir.path().join("exits");
        script(&exits, "#!/bin/sh\necho broken >&2\nexit 3\n");
        let e = self_check(&exits, &[], "1.1.0").await.unwrap_err();
        assert!(e.contains("status 3") && e.contains("broken"), "{e}");

        let other = dir.path().join("other");
        script(&other, "#!/bin/sh\necho 9.9.9\n");
        let e = self_check(&other, &[], "1.1.0").await.unwrap_err();
        assert!(e.contains("\"9.9.9\", not 1.1.0"), "{e}");

        let garbage = dir.path().join("garbage");
        std::fs::write(&garbage, b"\x00\x01not an executable").unwrap();
        // Refused at start, or by the shell some exec implementations fall back to.
        assert!(self_check(&garbage, &[], "1.1.0").await.is_err());
    }

    #[test]
    fn switch_keeps_the_previous_build_and_restore_brings_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("agent");
        std::fs::write(&exe, "old").unwrap();
        let build = dir.path().join("download");
        std::fs::write(&build, "new").unwrap();
        switch(&build, &exe).unwrap();
        assert_eq!(std::fs::read_to_string(&exe).unwrap(), "new");
        let previous = previous_of(&exe);
        assert_eq!(previous, dir.path().join("agent.previous"));
        assert_eq!(std::fs::read_to_string(&previous).unwrap(), "old");
        restore(&exe, &previous).unwrap();
        assert_eq!(std::fs::read_to_string(&exe).unwrap(), "old");
        assert!(!previous.exists());
    }
}
