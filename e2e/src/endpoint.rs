//! Where clients connect: the ingress, addressed without DNS.
//!
//! Every target exposes its ingress on a loopback address. The kind cluster's ingress
//! answers on 127.0.0.1:<--http-port> for the host name in `chart/ci/kind-values.yaml`;
//! the local target's nginx answers on 127.0.0.1:<port>. Clients open TCP connections to `addr` and
//! send `authority` as the Host, so no name is ever looked up.

use std::net::SocketAddr;
use std::time::Duration;

/// The ingress as clients see it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Where TCP connections go (always a loopback address).
    pub addr: SocketAddr,
    /// The URL authority and Host header: `agent-server.localtest.me:38080` or
    /// `127.0.0.1:8080`. A port here is the one `addr` has (a client that overrides the
    /// name's address still takes the port from the URL).
    pub authority: String,
}

impl Endpoint {
    pub fn new(addr: SocketAddr, authority: impl Into<String>) -> Self {
        Self {
            addr,
            authority: authority.into(),
        }
    }

    /// An endpoint addressed by its own socket address (no virtual host).
    pub fn direct(addr: SocketAddr) -> Self {
        Self::new(addr, addr.to_string())
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.authority)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.authority)
    }

    /// An HTTP client whose requests to this endpoint's host go to `addr`.
    pub fn http_client(&self, timeout: Duration) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5));
        let host = self
            .authority
            .rsplit_once(':')
            .map_or(self.authority.as_str(), |(h, _)| h);
        if host.parse::<std::net::IpAddr>().is_err() {
            builder = builder.resolve(host, self.addr);
        }
        builder.build().expect("HTTP client without TLS builds")
    }
}
