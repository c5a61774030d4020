//! The REST API through the ingress, with every request counted.
//!
//! A request fails when it gets no response (refused, reset, timed out) or a status the
//! caller did not expect. Failures are recorded, never retried: a retry would hide exactly
//! the errors the scenarios exist to find (a 502 while a pod goes away). One exception, the
//! one every browser makes: a GET on a reused keep-alive connection that the ingress closed
//! before any byte of a response (an nginx worker retiring on a reload closes its idle
//! connections, racing a request just written) is sent again once on a new connection, as
//! RFC 9112 §9.3.1 allows for idempotent methods. A pod going away is not hidden by it:
//! nginx answers that with a 502, not a silent close.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::endpoint::Endpoint;

/// Bound on one API request, body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What a request carries.
pub enum Body {
    None,
    Json(Value),
    /// Raw bytes sent as `application/json` (oversized inventories).
    Raw(Vec<u8>),
}

/// A response with an expected status.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    failures: Mutex<Vec<String>>,
}

/// An admin client; clones share the counters.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    endpoint: Endpoint,
    admin: String,
    counters: Arc<Counters>,
}

impl Api {
    pub fn new(endpoint: &Endpoint, admin_token: String) -> Self {
        Self {
            http: endpoint.http_client(REQUEST_TIMEOUT),
            endpoint: endpoint.clone(),
            admin: admin_token,
            counters: Arc::default(),
        }
    }

    pub fn requests(&self) -> u64 {
        self.counters.requests.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.counters.failures.lock().expect("lock").len() as u64
    }

    /// The first few failures, in words.
    pub fn failures(&self, at_most: usize) -> Vec<String> {
        let all = self.counters.failures.lock().expect("lock");
        all.iter().take(at_most).cloned().collect()
    }

    /// Sends one request (with the admin token unless `token` is given) and checks its
    /// status against `expect`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Body,
        expect: &[u16],
    ) -> Result<Reply, String> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let what = format!("{method} {path}");
        let mut req = self
            .http
            .request(method.clone(), self.endpoint.http_url(path))
            .bearer_auth(token.unwrap_or(&self.admin));
        req = match body {
            Body::None => req,
            Body::Json(v) => req.json(&v),
            Body::Raw(bytes) => req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(bytes),
        };
        let idempotent = method == Method::GET;
        let retry = if idempotent { req.try_clone() } else { None };
        let mut sent = req.send().await;
        if let (Err(e), Some(retry)) = (&sent, retry)
            && closed_before_a_response(e)
        {
            sent = retry.send().await;
        }
        let outcome = match sent {
            Err(e) => Err(format!("{what}: no response: {}", error_chain(&e))),
            Ok(resp) => {
                let status = resp.status().as_u16();
                let content_type = resp
                    .headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                match resp.text().await {
                    Err(e) => Err(format!(
                        "{what}: {status}, body unreadable: {}",
                        error_chain(&e)
                    )),
                    Ok(text) if expect.contains(&status) => Ok(Reply {
                        status,
                        content_type,
                        text,
                    }),
                    Ok(text) => Err(format!(
                        "{what}: status {status} (expected {expect:?}): {}",
                        text.chars().take(200).collect::<String>()
                    )),
                }
            }
        };
        if let Err(e) = &outcome {
            self.counters.failures.lock().expect("lock").push(e.clone());
        }
        outcome
    }

    pub async fn get(&self, path: &str) -> Result<Value, String> {
        self.call(Method::GET, path, None, Body::None, &[200])
            .await
            .map(|r| r.json())
    }

    /// Queues a command; returns its id.
    pub async fn submit(&self, agent: &str, name: &str, args: Value) -> Result<String, String> {
        let reply = self
            .call(
                Method::POST,
                &format!("/api/v1/agents/{agent}/commands"),
                None,
                Body::Json(json!({"name": name, "args": args})),
                &[202],
            )
            .await?;
        reply.json()["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("202 without an id: {}", reply.text))
    }

    pub async fn command(&self, id: &str) -> Result<Value, String> {
        self.get(&format!("/api/v1/commands/{id}")).await
    }
}

/// The connection closed before any response arrived (hyper's incomplete message): on
/// a pooled connection, the server closed it as idle while the request was on its way.
fn closed_before_a_response(e: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
        {
            return true;
        }
        source = cause.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// Reads one request head (the requests here carry no body).
    async fn read_head(conn: &mut TcpStream) -> bool {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match conn.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        true
    }

    /// A server that answers the first request of each connection and closes the
    /// connection, without a response, on its second: an ingress retiring idle
    /// keep-alive connections as a request arrives on one.
    async fn closing_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    if !read_head(&mut conn).await {
                        return;
                    }
                    let body = "{}";
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    conn.write_all(reply.as_bytes()).await.unwrap();
                    // The second request on this connection is read, then dropped.
                    read_head(&mut conn).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_get_on_a_keep_alive_connection_closed_before_a_response_is_sent_again_once() {
        let api = Api::new(&Endpoint::direct(closing_server().await), "t".into());
        for _ in 0..3 {
            api.get("/health").await.expect("the GET is answered");
        }
        assert_eq!((api.requests(), api.failed()), (3, 0));
    }

    #[tokio::test]
    async fn a_post_on_such_a_connection_is_never_sent_again() {
        let api = Api::new(&Endpoint::direct(closing_server().await), "t".into());
        api.get("/health")
            .await
            .expect("the first request is answered");
        let post = api
            .call(Method::POST, "/api/v1/x", None, Body::None, &[200])
            .await;
        assert!(post.unwrap_err().contains("no response"));
        assert_eq!(api.failed(), 1);
    }
}
