//! What a run with many connections on one machine needs from the kernel: open files per
//! process and in total, ephemeral ports, the listen backlog, TCP memory, connection
//! tracking and memory. Checked before a benchmark starts, so that a limit that is too
//! low fails with its name and the setting that raises it instead of showing up as
//! agents that never connect.

use anyhow::{Result, bail};

use crate::thousands;

/// What a run will hold at once.
pub struct Load {
    /// TCP connections between agents and servers (both ends are on this machine).
    pub connections: u64,
    /// Connections the busiest process holds (one file each).
    pub per_process: u64,
    /// Loopback source addresses the agents connect from.
    pub sources: u64,
    /// Server ports the agents connect to, at least one of which may be down.
    pub destinations: u64,
    /// Memory per connection, all processes and the kernel together, in KiB.
    pub kib_per_connection: u64,
}

/// One limit: what the run needs, what the machine has, and how to raise it.
struct Limit {
    name: &'static str,
    need: u64,
    have: Option<u64>,
    raise: &'static str,
}

/// Reads the limits, prints what the run needs of each, and fails naming every limit
/// that is too low.
pub fn check(load: &Load) -> Result<()> {
    let c = load.connections;
    let conntrack_on =
        read_u64("/proc/sys/net/netfilter/nf_conntrack_count").is_some_and(|n| n > 0);
    // With one server down, its agents spread over the others: ports per (source,
    // destination) pair, twice over for the connections still in TIME_WAIT.
    let busy_pairs = (load.sources * load.destinations.saturating_sub(1).max(1)).max(1);
    let mut limits = vec![
        Limit {
            name: "open files per process (RLIMIT_NOFILE)",
            need: load.per_process,
            have: Some(e2e::sim::net::raise_open_files_limit()),
            raise: "ulimit -n / LimitNOFILE (this machine's hard limit may not be raisable: use more processes)",
        },
        Limit {
            name: "open files in total (fs.file-max)",
            need: 2 * c + 10_000,
            have: read_u64("/proc/sys/fs/file-max"),
            raise: "sysctl -w fs.file-max=N",
        },
        Limit {
            name: "ephemeral ports per source address and server (net.ipv4.ip_local_port_range)",
            need: 2 * c.div_ceil(busy_pairs),
            have: port_range(),
            raise: "sysctl -w net.ipv4.ip_local_port_range=\"10240 65535\", or more source addresses",
        },
        Limit {
            name: "listen backlog (net.core.somaxconn)",
            need: 1024,
            have: read_u64("/proc/sys/net/core/somaxconn"),
            raise: "sysctl -w net.core.somaxconn=4096",
        },
        Limit {
            name: "TCP memory, pressure threshold in pages (net.ipv4.tcp_mem, 2nd value)",
            need: c,
            have: tcp_mem_pressure(),
            raise: "sysctl -w net.ipv4.tcp_mem=\"LOW PRESSURE HIGH\"",
        },
        Limit {
            name: "memory available, MiB",
            need: c * load.kib_per_connection / 1024,
            have: mem_available_mib(),
            raise: "a larger machine, or fewer agents (--agents)",
        },
    ];
    if conntrack_on {
        limits.push(Limit {
            name: "tracked connections (net.netfilter.nf_conntrack_max)",
            need: c + c / 10 + 1_000,
            have: read_u64("/proc/sys/net/netfilter/nf_conntrack_max"),
            raise: "sysctl -w net.netfilter.nf_conntrack_max=N",
        });
    }
    let mut low = Vec::new();
    println!(
        "  kernel limits for {} connections (both ends on this machine){}:",
        thousands(c),
        if conntrack_on {
            ""
        } else {
            "; connection tracking is off"
        }
    );
    for l in &limits {
        let ok = l.have.is_none_or(|have| have >= l.need);
        println!(
            "    {:<80} needs {:>9}  has {:>9}  {}",
            l.name,
            thousands(l.need),
            l.have.map_or("?".into(), thousands),
            if ok { "ok" } else { "TOO LOW" }
        );
        if !ok {
            low.push(format!(
                "{} ({}; raise: {})",
                l.name,
                thousands(l.have.unwrap_or(0)),
                l.raise
            ));
        }
    }
    if !low.is_empty() {
        bail!(
            "the kernel's limits are too low for this run: {}",
            low.join("; ")
        );
    }
    Ok(())
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn numbers(path: &str) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// Ports in `ip_local_port_range`.
fn port_range() -> Option<u64> {
    match numbers("/proc/sys/net/ipv4/ip_local_port_range")[..] {
        [lo, hi] if hi >= lo => Some(hi - lo + 1),
        _ => None,
    }
}

/// `tcp_mem`'s pressure threshold: above it the kernel trims socket buffers.
fn tcp_mem_pressure() -> Option<u64> {
    numbers("/proc/sys/net/ipv4/tcp_mem").get(1).copied()
}

fn mem_available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_has_readable_limits() {
        assert!(port_range().is_some_and(|p| p > 0));
        assert!(tcp_mem_pressure().is_some());
        assert!(mem_available_mib().is_some_and(|m| m > 0));
    }

    #[test]
    fn a_limit_too_low_fails_by_name() {
        let err = check(&Load {
            connections: u64::MAX / 4,
            per_process: 1,
            sources: 1,
            destinations: 1,
            kib_per_connection: 1,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("fs.file-max"), "{err}");
    }
}
