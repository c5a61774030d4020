//! TCP connections from chosen loopback source addresses.
//!
//! Each (source address, destination) pair has one ephemeral port range, about 28,000
//! ports here, and a port stays in TIME_WAIT for a minute after a close. Spreading agents
//! over 127.0.0.2, 127.0.0.3, … (all of 127.0.0.0/8 is loopback on Linux) multiplies the
//! range, so neither 20,000 idle agents nor thousands of reconnections per second run out
//! of ports.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::net::{TcpSocket, TcpStream};

/// `count` loopback source addresses from 127.0.0.2 on; 127.0.0.1 is left to everything
/// else on the machine.
pub fn loopback_sources(count: u16) -> Vec<IpAddr> {
    (0..u32::from(count))
        .map(|i| IpAddr::V4(Ipv4Addr::from(0x7f00_0002 + i)))
        .collect()
}

/// Connects to `target`, from `source` when given.
pub async fn connect_from(source: Option<IpAddr>, target: SocketAddr) -> io::Result<TcpStream> {
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(source) = source {
        bind_address_no_port(&socket);
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Lets `connect` choose the source port for the whole 4-tuple instead of `bind` reserving
/// one per source address for every destination; without it, one address holds at most
/// one range of connections in total.
#[cfg(target_os = "linux")]
fn bind_address_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
    // Failure only loses the optimisation, so the result is ignored.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn bind_address_no_port(_socket: &TcpSocket) {}

/// Raises this process's open-file soft limit to its hard limit and returns it: every
/// agent is a socket.
pub fn raise_open_files_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a pointer to a live rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_start_after_127_0_0_1() {
        let s = loopback_sources(300);
        assert_eq!(s[0], "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(s[253], "127.0.0.255".parse::<IpAddr>().unwrap());
        assert_eq!(s[254], "127.0.1.0".parse::<IpAddr>().unwrap());
    }

    #[tokio::test]
    async fn connects_from_a_chosen_loopback_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        let source: IpAddr = "127.0.0.7".parse().unwrap();
        let _client = connect_from(Some(source), target).await.unwrap();
        let (_conn, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), source);
    }
}
