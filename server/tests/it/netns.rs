//! A host on a network of its own: a network namespace joined to the test's by a veth
//! pair, so that a service inside it (redis-server, PostgreSQL) can be cut off by the
//! network instead of being stopped.
//!
//! A cut makes packets vanish in both directions, as a failed switch or a partitioned
//! cloud network does: each end's neighbour entry for the other is replaced by a MAC
//! address no interface has, so frames arrive addressed elsewhere and the receiving
//! kernel drops them. Nobody is told: no RST, no ICMP, no error on `send`; established
//! connections hang, new ones wait for a SYN-ACK that never comes. Only iproute2 is
//! needed (no iptables or tc actions). Restoring puts the real addresses back.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};

/// Where no interface listens: frames sent there are dropped by the receiver.
const NOWHERE_MAC: &str = "02:00:5e:00:de:ad";

pub struct NetHost {
    /// The namespace's name (`ip netns`).
    pub ns: String,
    /// The veth end in the test's namespace.
    outer_if: String,
    /// The veth end inside the namespace.
    inner_if: String,
    /// This side's address on the link.
    outer_addr: Ipv4Addr,
    /// The host's address: services inside listen on it.
    pub addr: Ipv4Addr,
    outer_mac: String,
    inner_mac: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetHost {
    /// A new namespace joined by a veth pair, or `None` with a loud skip where network
    /// namespaces cannot be made here: not root, no iproute2, or a container without
    /// CAP_NET_ADMIN and CAP_SYS_ADMIN.
    pub fn create() -> Option<NetHost> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: network cuts need root (network namespaces and veth pairs)");
            return None;
        }
        if Command::new("ip").arg("-V").output().is_err() {
            eprintln!("SKIPPED: network cuts need iproute2's `ip`");
            return None;
        }
        static NEXT: AtomicU8 = AtomicU8::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names have at most 15 bytes; the subnet keeps test binaries that run
        // at once apart by their pid, tests within one by a counter.
        let tag = format!("{:x}{n:02x}", pid & 0xffff);
        let (o2, o3) = (100 + (pid % 100) as u8, n);
        let host = NetHost {
            ns: format!("agent-it-{tag}"),
            outer_if: format!("ao{tag}"),
            inner_if: format!("ai{tag}"),
            outer_addr: Ipv4Addr::new(10, o2, o3, 1),
            addr: Ipv4Addr::new(10, o2, o3, 2),
            outer_mac: format!("02:a6:{o2:02x}:{o3:02x}:00:01"),
            inner_mac: format!("02:a6:{o2:02x}:{o3:02x}:00:02"),
        };
        match host.set_up() {
            Ok(()) => Some(host),
            Err(e) => {
                eprintln!("SKIPPED: cannot make a network namespace here ({e})");
                None
            }
        }
    }

    fn set_up(&self) -> Result<(), String> {
        let (outer, inner, ns) = (&self.outer_if, &self.inner_if, &self.ns);
        ip(&["netns", "add", ns])?;
        ip(&["link", "add", outer, "type", "veth", "peer", "name", inner])?;
        ip(&["link", "set", outer, "address", &self.outer_mac])?;
        ip(&["link", "set", inner, "address", &self.inner_mac])?;
        ip(&["link", "set", inner, "netns", ns])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", self.outer_addr),
            "dev",
            outer,
        ])?;
        ip(&["link", "set", outer, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/30", self.addr),
            "dev",
            inner,
        ])?;
        ip(&["-n", ns, "link", "set", inner, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        self.point_neighbours(&self.inner_mac, &self.outer_mac)
    }

    /// Permanent neighbour entries on both ends: the given MAC for the other side.
    fn point_neighbours(&self, to_inner: &str, to_outer: &str) -> Result<(), String> {
        let (addr, outer_addr) = (self.addr.to_string(), self.outer_addr.to_string());
        ip(&[
            "neigh",
            "replace",
            &addr,
            "lladdr",
            to_inner,
            "dev",
            &self.outer_if,
            "nud",
            "permanent",
        ])?;
        ip(&[
            "-n",
            &self.ns,
            "neigh",
            "replace",
            &outer_addr,
            "lladdr",
            to_outer,
            "dev",
            &self.inner_if,
            "nud",
            "permanent",
        ])
    }

    /// From now on every packet between the two sides vanishes.
    pub fn cut(&self) {
        self.point_neighbours(NOWHERE_MAC, NOWHERE_MAC)
            .expect("neighbour entries replaced");
    }

    /// Packets flow again; connections that survived the cut resume.
    pub fn restore(&self) {
        self.point_neighbours(&self.inner_mac, &self.outer_mac)
            .expect("neighbour entries restored");
    }

    /// `program` to run inside the namespace.
    pub fn command(&self, program: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }
}

impl Drop for NetHost {
    fn drop(&mut self) {
        // Deleting the outer end deletes its peer; the namespace goes once no process
        // is left in it.
        let _ = ip(&["link", "del", &self.outer_if]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}
