//! The machine a benchmark ran on, printed with every figure: figures from another
//! machine (or a busy one) are not comparable.

use std::process::Command;

pub struct Machine {
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub cpu: String,
    pub postgres: String,
    pub redis: String,
    pub commit: String,
}

impl Machine {
    pub fn detect(pg_url: &str, redis_bin: &str) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let memory_kib: f64 = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0.0);
        let out = |cmd: &str, args: &[&str]| {
            Command::new(cmd)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_else(|| "unknown".into())
        };
        let postgres = out("psql", &[pg_url, "-Atc", "show server_version"])
            .split_whitespace()
            .next()
            .unwrap_or("unknown")
            .to_string();
        let redis = out(redis_bin, &["--version"])
            .split_whitespace()
            .find_map(|w| w.strip_prefix("v="))
            .unwrap_or("unknown")
            .to_string();
        let mut commit = out("git", &["rev-parse", "--short", "HEAD"]);
        if !out("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty()
            && commit != "unknown"
        {
            commit.push_str("+changes");
        }
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: memory_kib / 1024.0 / 1024.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            cpu,
            postgres,
            redis,
            commit,
        }
    }

    /// One line; the load average is read now, since other work on the machine skews
    /// latencies.
    pub fn line(&self) -> String {
        format!(
            "machine: {} cores ({}), {:.1} GiB, Linux {}, load {} | PostgreSQL {}, Redis {} | agent-server {}",
            self.cores,
            self.cpu,
            self.memory_gib,
            self.kernel,
            super::procfs::loadavg(),
            self.postgres,
            self.redis,
            self.commit
        )
    }
}
