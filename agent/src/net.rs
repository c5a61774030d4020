//! Transport: TCP, directly or through an HTTP proxy's CONNECT tunnel (`HTTPS_PROXY` for
//! `wss`/`https`, `HTTP_PROXY` for `ws`/`http`, `NO_PROXY` to bypass), then TLS with
//! rustls (system roots plus an optional CA file). The WebSocket and the HTTP calls
//! (enrollment, the inventory upload, build downloads) share it, so the agent's token
//! only ever goes to the server it is configured for.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::{AUTHORIZATION, HeaderValue, RETRY_AFTER};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::config::{Config, Scheme, Secret, ServerUrl};

/// Any byte stream: plain TCP or TLS, direct or tunnelled.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type Stream = Box<dyn Io>;
pub type Ws = WebSocketStream<Stream>;

/// Bound on connecting: TCP, proxy, TLS and the upgrade together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the proxy's answer to CONNECT.
const MAX_PROXY_RESPONSE: usize = 8 * 1024;

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server answered the upgrade with an HTTP error.
    #[error("the server refused the connection: HTTP {status}: {message}")]
    Refused {
        status: u16,
        retry_after: Option<Duration>,
        message: String,
    },
    #[error("{0}")]
    Transport(String),
}

#[derive(Clone, Debug)]
struct Proxy {
    authority: String,
}

/// Everything needed to open connections to the server. Cheap to clone.
#[derive(Clone)]
pub struct Net {
    server: ServerUrl,
    tls: Option<tokio_rustls::TlsConnector>,
    proxy: Option<Proxy>,
}

/// Reads PEM certificates, failing when the file holds none.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

impl Net {
    pub fn new(cfg: &Config, env: &dyn Fn(&str) -> Option<String>) -> Result<Net, String> {
        let tls = match cfg.server.scheme {
            Scheme::Plain => None,
            Scheme::Tls => {
                let mut roots = rustls::RootCertStore::empty();
                let native = rustls_native_certs::load_native_certs();
                for e in &native.errors {
                    tracing::warn!(error = %e, "could not read some system root certificates");
                }
                let (added, _) = roots.add_parsable_certificates(native.certs);
                if let Some(path) = &cfg.ca_file {
                    for cert in read_ca_file(path)? {
                        roots
                            .add(cert)
                            .map_err(|e| format!("{}: {e}", path.display()))?;
                    }
                }
                if roots.is_empty() {
                    return Err(
                        "no trusted root certificates: install ca-certificates or set ca_file"
                            .into(),
                    );
                }
                tracing::debug!(system_roots = added, "TLS roots loaded");
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
            }
        };
        let proxy = proxy_for(&cfg.server, env)?;
        if let Some(p) = &proxy {
            tracing::info!(proxy = %p.authority, "connecting through a proxy");
        }
        Ok(Net {
            server: cfg.server.clone(),
            tls,
            proxy,
        })
    }

    /// A byte stream to the server: TCP (through the proxy if any), then TLS if `wss`.
    async fn stream(&self) -> Result<Stream, String> {
        let target = self.server.authority();
        let tcp = match &self.proxy {
            None => TcpStream::connect((self.server.host.as_str(), self.server.port))
                .await
                .map_err(|e| format!("cannot connect to {target}: {e}"))?,
            Some(proxy) => {
                let mut tcp = TcpStream::connect(proxy.authority.as_str())
                    .await
                    .map_err(|e| format!("cannot connect to the proxy {}: {e}", proxy.authority))?;
                tunnel(&mut tcp, &target)
                    .await
                    .map_err(|e| format!("proxy {}: {e}", proxy.authority))?;
                tcp
            }
        };
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some(tls) => {
                let name = ServerName::try_from(self.server.host.clone())
                    .map_err(|e| format!("{}: {e}", self.server.host))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {target}: {e}"))?;
                Ok(Box::new(stream))
            }
        }
    }

    /// Opens the WebSocket `/ws/{client_id}` with the token in the Authorization header
    /// (never the query string, which proxies log).
    pub async fn websocket(&self, client_id: &str, token: &Secret) -> Result<Ws, ConnectError> {
        let attempt = async {
            let stream = self.stream().await.map_err(ConnectError::Transport)?;
            let mut req = self
                .server
                .ws_url(client_id)
                .into_client_request()
                .map_err(|e| ConnectError::Transport(e.to_string()))?;
            let bearer =
                HeaderValue::from_str(&format!("Bearer {}", token.expose())).map_err(|_| {
                    ConnectError::Transport("the token is not a valid header value".into())
                })?;
            req.headers_mut().insert(AUTHORIZATION, bearer);
            // One connection per host: a small read buffer is plenty, and large inventories
            // travel over HTTP, so messages stay small.
            let config = WebSocketConfig::default()
                .read_buffer_size(16 * 1024)
                .write_buffer_size(0)
                .max_message_size(Some(16 << 20))
                .max_frame_size(Some(16 << 20));
            match tokio_tungstenite::client_async_with_config(req, stream, Some(config)).await {
                Ok((ws, _)) => Ok(ws),
                Err(WsError::Http(resp)) => {
                    let retry_after = resp
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(retry_after_secs);
                    let message = resp
                        .body()
                        .as_deref()
                        .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                        .unwrap_or_default();
                    Err(ConnectError::Refused {
                        status: resp.status().as_u16(),
                        retry_after,
                        message,
                    })
                }
                Err(e) => Err(ConnectError::Transport(format!("WebSocket handshake: {e}"))),
            }
        };
        timeout(CONNECT_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| Err(ConnectError::Transport("connecting timed out".into())))
    }

    /// POSTs a JSON body to `path` with the agent's token; an error carries the status
    /// and the server's message.
    pub async fn post_json(&self, path: &str, token: &Secret, body: String) -> Result<(), String> {
        let resp = self.post(path, Some(token), body).await?;
        if (200..300).contains(&resp.status) {
            return Ok(());
        }
        let message = String::from_utf8_lossy(&resp.body[..resp.body.len().min(1024)]).into_owned();
        Err(format!("HTTP {}: {message}", resp.status))
    }

    /// POSTs a JSON body to `path`, with the token if one is given, and returns the
    /// answer whatever its status; an error only when no answer came (connection, TLS,
    /// timeout). Bodies are read up to [`MAX_RESPONSE_BYTES`].
    pub async fn post(
        &self,
        path: &str,
        token: Option<&Secret>,
        body: String,
    ) -> Result<HttpResponse, String> {
        let attempt = async {
            let stream = self.stream().await?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut req = http::Request::post(self.server.path(path))
                .header(http::header::HOST, self.server.authority())
                .header(http::header::CONTENT_TYPE, "application/json");
            if let Some(token) = token {
                req = req.header(
                    http::header::AUTHORIZATION,
                    format!("Bearer {}", token.expose()),
                );
            }
            let req = req
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| e.to_string())?;
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(retry_after_secs);
            let body = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| format!("reading the answer: {e}"))?;
            Ok(HttpResponse {
                status,
                retry_after,
                body,
            })
        };
        timeout(CONNECT_TIMEOUT * 4, attempt)
            .await
            .unwrap_or_else(|_| Err("the request timed out".into()))
    }
}

impl Net {
    /// GETs `path` (with its query) from the server with the agent's token, from byte
    /// `from` on when it is not 0 (`Range: bytes={from}-`). The response's body streams
    /// while the caller reads it; connecting and the response headers are bounded by the
    /// connect timeout, reading the body is the caller's to bound.
    pub async fn get(
        &self,
        path: &str,
        token: &Secret,
        from: u64,
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        let attempt = async {
            let stream = self.stream().await?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut req = http::Request::get(path)
                .header(http::header::HOST, self.server.authority())
                .header(
                    http::header::AUTHORIZATION,
                    format!("Bearer {}", token.expose()),
                );
            if from > 0 {
                req = req.header(http::header::RANGE, format!("bytes={from}-"));
            }
            let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
            sender.send_request(req).await.map_err(|e| e.to_string())
        };
        timeout(CONNECT_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| Err("connecting timed out".into()))
    }
}

/// An HTTP answer: its status, `Retry-After` (RFC 9110 §10.2.3, delay-seconds form) and
/// body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

impl HttpResponse {
    /// The `message` of the server's `{"error": {"code", "message"}}` body, else the
    /// start of the body.
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| {
                String::from_utf8_lossy(&self.body[..self.body.len().min(1024)]).into_owned()
            })
    }
}

/// Largest answer body read from the HTTP API.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// `Retry-After` in delay-seconds, the form the server sends.
fn retry_after_secs(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The proxy for this server from the environment (the lowercase names win, as curl has
/// it), unless `NO_PROXY` names the host.
fn proxy_for(
    server: &ServerUrl,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Proxy>, String> {
    let get = |name: &str| {
        env(&name.to_lowercase())
            .or_else(|| env(name))
            .filter(|v| !v.trim().is_empty())
    };
    let var = match server.scheme {
        Scheme::Tls => "HTTPS_PROXY",
        Scheme::Plain => "HTTP_PROXY",
    };
    let Some(url) = get(var) else {
        return Ok(None);
    };
    if let Some(no_proxy) = get("NO_PROXY") {
        let host = server.host.to_ascii_lowercase();
        let bypass = no_proxy.split(',').map(str::trim).any(|entry| {
            let entry = entry.trim_start_matches('.').to_ascii_lowercase();
            entry == "*"
                || (!entry.is_empty() && (host == entry || host.ends_with(&format!(".{entry}"))))
        });
        if bypass {
            return Ok(None);
        }
    }
    let with_scheme = if url.contains("://") {
        url.clone()
    } else {
        format!("http://{url}")
    };
    let uri: http::Uri = with_scheme
        .parse()
        .map_err(|e| format!("{var}: `{url}` is not a URL ({e})"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{var}: only http:// proxies are supported"));
    }
    let auth = uri
        .authority()
        .ok_or_else(|| format!("{var}: `{url}` has no host"))?;
    if auth.as_str().contains('@') {
        return Err(format!("{var}: proxy credentials are not supported"));
    }
    Ok(Some(Proxy {
        authority: format!("{}:{}", auth.host(), auth.port_u16().unwrap_or(80)),
    }))
}

/// Asks an HTTP proxy for a tunnel to `target` (RFC 9110 §9.3.6, CONNECT).
async fn tunnel(tcp: &mut TcpStream, target: &str) -> io::Result<()> {
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    tcp.write_all(req.as_bytes()).await?;
    // Read byte by byte up to the end of the headers, so nothing after them is consumed.
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_PROXY_RESPONSE {
            return Err(io::Error::other("response headers too long"));
        }
        let b = tcp.read_u8().await?;
        head.push(b);
    }
    let status_line = String::from_utf8_lossy(&head);
    let status_line = status_line.lines().next().unwrap_or_default();
    let status = status_line.split_whitespace().nth(1).unwrap_or_default();
    if status.starts_with('2') {
        Ok(())
    } else {
        Err(io::Error::other(format!("CONNECT refused: {status_line}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(url: &str, env: &[(&str, &str)]) -> Option<String> {
        let server = ServerUrl::parse(url).unwrap();
        let env: std::collections::HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        proxy_for(&server, &|k| env.get(k).cloned())
            .unwrap()
            .map(|p| p.authority)
    }

    #[test]
    fn https_proxy_applies_to_wss_unless_no_proxy_names_the_host() {
        let env = [
            ("HTTPS_PROXY", "http://proxy.corp:3128"),
            ("NO_PROXY", "localhost,.internal"),
        ];
        assert_eq!(
            proxy("wss://agents.example.com", &env).as_deref(),
            Some("proxy.corp:3128")
        );
        assert_eq!(proxy("wss://a.internal", &env), None);
        assert_eq!(proxy("ws://agents.example.com", &env), None);
        assert_eq!(
            proxy("ws://agents.example.com", &[("http_proxy", "proxy:8080")]).as_deref(),
            Some("proxy:8080")
        );
    }

    #[tokio::test]
    async fn connect_tunnel_passes_bytes_after_a_200() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 1024];
            let n = s.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\nhello")
                .await
                .unwrap();
            req
        });
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tunnel(&mut tcp, "agents.example.com:443").await.unwrap();
        let mut rest = [0u8; 5];
        tcp.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"hello");
        assert!(
            proxy
                .await
                .unwrap()
                .starts_with("CONNECT agents.example.com:443 HTTP/1.1\r\n")
        );
    }
}
