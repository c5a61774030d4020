//! Figures read from /proc: resident memory, CPU time, kernel socket memory, machine.

use std::collections::HashMap;
use std::time::Instant;

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

/// CPU time of a process's live threads in nanoseconds, from the scheduler's own account
/// (`/proc/<pid>/task/*/schedstat`, first field). Clock ticks are 10 ms here, too coarse
/// for a process that idles at a few milliseconds a minute; threads that already exited
/// are not counted.
pub fn sched_ns(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum(),
    )
}

/// Proportional set size of a process in KiB (`/proc/<pid>/smaps_rollup`): its resident
/// pages, each shared page divided among the processes that map it. Summed over
/// PostgreSQL's backends it counts the shared buffers once, where RSS would count them
/// once per backend.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Pss:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// VmHWM of a process (its peak resident memory), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmHWM:")
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// User plus system CPU time of a process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields resume after its closing parenthesis.
    let rest = &s[s.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) … utime(11) stime(12).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Parent pid of a process.
pub fn ppid(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Clock ticks per second (USER_HZ).
pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Every process whose `comm` starts with `prefix`.
pub fn pids_named(prefix: &str) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim_end().starts_with(prefix))
            {
                out.push(pid);
            }
        }
    }
    out
}

/// A process and every process below it.
pub fn with_descendants(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        let procs: Vec<(u32, u32)> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|p| Some((p, ppid(p)?)))
            .collect();
        let mut i = 0;
        while i < all.len() {
            let parent = all[i];
            all.extend(
                procs
                    .iter()
                    .filter(|(_, pp)| *pp == parent)
                    .map(|(p, _)| *p),
            );
            i += 1;
        }
    }
    all
}

/// Open file descriptors of a process.
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// The soft open-files limit of a process.
pub fn max_open_files(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU used by a set of processes over a window of wall time.
pub struct CpuMeter {
    /// The processes now; a set that changes (database backends opened during the
    /// window) is listed again at each reading.
    list: Box<dyn Fn() -> Vec<u32> + Send + Sync>,
    start_ticks: HashMap<u32, u64>,
    start: Instant,
}

impl CpuMeter {
    pub fn start(pids: Vec<u32>) -> Self {
        Self::start_listing(move || pids.clone())
    }

    /// Meters whatever `list` returns at each reading: a process that appears during the
    /// window counts with all its CPU time, one that exits stops counting.
    pub fn start_listing(list: impl Fn() -> Vec<u32> + Send + Sync + 'static) -> Self {
        let start_ticks = list()
            .into_iter()
            .filter_map(|p| Some((p, cpu_ticks(p)?)))
            .collect();
        CpuMeter {
            list: Box::new(list),
            start_ticks,
            start: Instant::now(),
        }
    }

    /// (CPU seconds, wall seconds) since the start.
    pub fn read(&self) -> (f64, f64) {
        let ticks: u64 = (self.list)()
            .into_iter()
            .filter_map(|p| {
                let now = cpu_ticks(p)?;
                Some(now.saturating_sub(self.start_ticks.get(&p).copied().unwrap_or(0)))
            })
            .sum();
        (
            ticks as f64 / clk_tck() as f64,
            self.start.elapsed().as_secs_f64(),
        )
    }

    /// Share of one core used over the window, in percent.
    pub fn percent(&self) -> f64 {
        let (cpu, wall) = self.read();
        if wall > 0.0 { cpu / wall * 100.0 } else { 0.0 }
    }
}

/// TCP figures of /proc/net/sockstat.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sockstat {
    pub inuse: u64,
    pub time_wait: u64,
    /// Pages allocated to TCP socket buffers (tcp_memory_allocated).
    pub mem_pages: u64,
}

pub fn sockstat() -> Sockstat {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let mut s = Sockstat::default();
    if let Some(line) = text.lines().find(|l| l.starts_with("TCP:")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        for pair in words[1..].chunks(2) {
            if let [k, v] = pair {
                let v = v.parse().unwrap_or(0);
                match *k {
                    "inuse" => s.inuse = v,
                    "tw" => s.time_wait = v,
                    "mem" => s.mem_pages = v,
                    _ => {}
                }
            }
        }
    }
    s
}

/// Bytes of kernel slab memory in TCP socket objects (`struct tcp_sock`), when
/// /proc/slabinfo is readable (root).
pub fn tcp_slab_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/slabinfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect();
    // active_objs num_objs objsize: count allocated slots.
    Some(f.get(1)? * f.get(2)?)
}

pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

/// The 1-minute load average.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_rss_and_cpu_time() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(pss_kib(me).unwrap() > 0);
        assert!(cpu_ticks(me).is_some());
        assert!(open_fds(me).unwrap() >= 3);
        assert!(max_open_files(me).unwrap() > 0);
    }
}
