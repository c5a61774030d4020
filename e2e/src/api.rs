//! The REST API through the ingress, with every request counted.
//!
//! A request fails when it gets no response (refused, reset, timed out) or a status the
//! caller did not expect. Failures are recorded, never retried: a retry would hide exactly
//! the errors the scenarios exist to find (a 502 while a pod goes away).

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
            .request(method, self.endpoint.http_url(path))
            .bearer_auth(token.unwrap_or(&self.admin));
        req = match body {
            Body::None => req,
            Body::Json(v) => req.json(&v),
            Body::Raw(bytes) => req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(bytes),
        };
        let outcome = match req.send().await {
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
