//! TLS on SERVER_PORT (TLS_CERT_FILE, TLS_KEY_FILE): HTTPS and WSS trusting a CA made
//! here, plain HTTP refused cleanly, and a certificate replaced on disk served to new
//! connections without a restart.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{Backend, WAIT, eventually, spawn_app_with};

/// A CA that signs server certificates for 127.0.0.1.
struct Ca {
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "agent-server test CA");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes a certificate for 127.0.0.1 named `name` and its key; returns its DER.
    fn issue(&self, name: &str, cert_file: &Path, key_file: &Path) -> CertificateDer<'static> {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        // The key first: a reload between the two writes sees a mismatch and keeps the
        // previous pair, then the certificate's write triggers the real reload.
        std::fs::write(key_file, key.serialize_pem()).unwrap();
        std::fs::write(cert_file, cert.pem()).unwrap();
        cert.der().clone()
    }

    fn connector(&self) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsConnector::from(Arc::new(config))
    }
}

async fn tls_connect(ca: &Ca, addr: SocketAddr) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    tokio::time::timeout(WAIT, ca.connector().connect(name, tcp))
        .await
        .expect("handshake within the wait bound")
        .expect("the server's certificate is trusted")
}

fn peer_cert(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// One HTTP/1.1 GET over an established TLS stream: (status, body).
async fn https_get(stream: TlsStream<TcpStream>, path: &str, token: &str) -> (u16, String) {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "127.0.0.1")
        .header("authorization", format!("Bearer {token}"))
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn https_and_wss_on_server_port_with_a_certificate_reloaded_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let ca = Ca::new();
    let first = ca.issue("first", &cert_file, &key_file);
    let app = spawn_app_with(
        Backend::Sqlite,
        &[
            ("TLS_CERT_FILE", cert_file.to_str().unwrap()),
            ("TLS_KEY_FILE", key_file.to_str().unwrap()),
            ("HTTP_HEADER_TIMEOUT", "1s"),
        ],
    )
    .await
    .unwrap();

    // A client that connects and never starts its handshake (slowloris) holds up no one.
    let mut silent = TcpStream::connect(app.addr).await.unwrap();

    // HTTPS, trusting the CA, with ALPN http/1.1.
    let stream = tls_connect(&ca, app.addr).await;
    assert_eq!(peer_cert(&stream), first);
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (status, body) = https_get(stream, "/api/v1/pods", &app.admin).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("pod-test"), "{body}");

    // The silent client is cut off after HTTP_HEADER_TIMEOUT.
    let mut byte = [0u8; 1];
    let cut = tokio::time::timeout(WAIT, silent.read(&mut byte))
        .await
        .expect("a silent TLS client is disconnected within the handshake bound");
    assert!(matches!(cut, Ok(0) | Err(_)), "{cut:?}");

    // WSS: an agent session over the same port.
    let stream = tls_connect(&ca, app.addr).await;
    let mut req = format!("wss://{}/ws/tls-agent", app.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", app.agent_token("tls-agent"))
            .parse()
            .unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::client_async(req, stream)
        .await
        .expect("WebSocket handshake over TLS");
    assert_eq!(resp.status().as_u16(), 101);
    let welcome = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("a welcome within the wait bound")
        .unwrap()
        .unwrap();
    let Message::Text(text) = welcome else {
        panic!("expected the welcome, got {welcome:?}");
    };
    let welcome: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
    assert_eq!(welcome["type"], "welcome");
    eventually(WAIT, "the agent is online", async || {
        let stream = tls_connect(&ca, app.addr).await;
        let (_, body) = https_get(stream, "/api/v1/agents/tls-agent", &app.admin).await;
        body.contains(r#""online":true"#)
    })
    .await;

    // Plain HTTP on the TLS port: the handshake fails and the connection is closed,
    // without an answer and without disturbing the server.
    let mut plain = TcpStream::connect(app.addr).await.unwrap();
    plain
        .write_all(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, plain.read_to_end(&mut answer))
        .await
        .expect("the server closes a plain-HTTP connection");
    assert!(
        read.is_err() || !String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "plain HTTP must not be served: {answer:?}"
    );

    // The metrics port stays plain HTTP.
    let metrics = app.http.get(app.metrics_url()).send().await.unwrap();
    assert_eq!(metrics.status().as_u16(), 200);

    // A renewed certificate on disk reaches new connections without a restart.
    let second = ca.issue("second", &cert_file, &key_file);
    assert_ne!(first, second);
    // Polled every 250 ms, not eventually()'s 20 ms: each poll is a full handshake, and
    // a tight loop of them would load the machine the other tests share.
    let started = std::time::Instant::now();
    while peer_cert(&tls_connect(&ca, app.addr).await) != second {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "new connections get the renewed certificate: not within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (status, _) = https_get(tls_connect(&ca, app.addr).await, "/health", &app.admin).await;
    assert_eq!(status, 200);

    // The WebSocket session opened before the renewal is still up.
    ws.send(Message::Text(
        serde_json::json!({"type": "heartbeat"}).to_string().into(),
    ))
    .await
    .unwrap();
}
