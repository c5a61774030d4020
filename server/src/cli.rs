//! Command line: `serve` (the default), `token` to mint tokens with the server's own
//! configuration, and `check` for `helm test` and smoke checks.

use std::time::Duration;

use agent_protocol::ServerMessage;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::app::{StartError, signing_key};
use crate::auth::{MAX_TTL, MIN_TTL, MintOptions, Role, Tokens, TtlOutOfRange};
use crate::config::{Config, parse_duration};
use crate::ids::check_client_id;

/// The `--help` text, also printed (on stderr, exit 64) after a usage error.
pub const USAGE: &str = "\
usage:
  agent-server                     serve (configuration from the environment; see README)
  agent-server token --sub ID --role agent|admin [--ttl DURATION]
                                   print a token signed with this configuration's key
  agent-server check --url URL [--timeout DURATION]
                                   check /health and a WebSocket handshake at URL
  agent-server --version | --help";

/// What the command line asks for, as [`parse`] reads it.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// No arguments: run the server.
    Serve,
    /// `token`: print a token signed with this configuration's key.
    Token {
        /// `--sub`: the subject, a `client_id` for an agent.
        sub: String,
        /// `--role`: `agent` or `admin`.
        role: Role,
        /// `--ttl` (`24h`, `30d`, `3600`), 1 s to 10 years; default 30 days for an agent, one
        /// day for an admin.
        ttl: Duration,
    },
    /// `check`: a health and WebSocket handshake check against a running server.
    Check {
        /// `--url`: the server's base URL (`http://agent-server:8080`).
        url: String,
        /// `--timeout` for the whole check (default 10 s).
        timeout: Duration,
    },
    /// `--help`, `-h` or `help`.
    Help,
    /// `--version` or `-V`.
    Version,
}

/// Default token lifetimes: agents hold theirs for a long time, humans for a day.
pub(crate) fn default_ttl(role: Role) -> Duration {
    match role {
        Role::Agent => crate::auth::DEFAULT_AGENT_TOKEN_TTL,
        Role::Admin => crate::auth::DEFAULT_ADMIN_TOKEN_TTL,
    }
}

/// Reads the arguments after the program name. `Err` is a message naming the argument at
/// fault, to print with [`USAGE`].
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut args = args.into_iter();
    let sub = args.next();
    let mut flags = std::collections::HashMap::new();
    let rest: Vec<String> = args.collect();
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let Some(name) = flag.strip_prefix("--") else {
            return Err(format!("unexpected argument `{flag}`"));
        };
        let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
        flags.insert(name.to_string(), value.clone());
    }
    let mut take = |name: &str| flags.remove(name);
    let command = match sub.as_deref() {
        None | Some("serve") => Command::Serve,
        Some("--help") | Some("-h") | Some("help") => Command::Help,
        Some("--version") | Some("-V") => Command::Version,
        Some("token") => {
            let sub = take("sub").ok_or("token needs --sub ID")?;
            check_client_id(&sub).map_err(|e| format!("--sub: {e}"))?;
            let role: Role = take("role")
                .ok_or("token needs --role agent|admin")?
                .parse()?;
            let ttl = match take("ttl") {
                None => default_ttl(role),
                Some(v) => {
                    let ttl = parse_duration(&v).ok_or_else(|| {
                        format!("--ttl: `{v}` is not a duration such as 24h, 30d or 3600")
                    })?;
                    // Bounded so that `exp` cannot overflow and no token outlives a key.
                    if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
                        return Err(format!("--ttl: `{v}` is out of range: {TtlOutOfRange}"));
                    }
                    ttl
                }
            };
            Command::Token { sub, role, ttl }
        }
        Some("check") => {
            let url = take("url").ok_or("check needs --url http://HOST:PORT")?;
            let timeout = match take("timeout") {
                None => Duration::from_secs(10),
                Some(v) => parse_duration(&v)
                    .ok_or_else(|| format!("--timeout: `{v}` is not a duration"))?,
            };
            Command::Check { url, timeout }
        }
        Some(other) => return Err(format!("unknown command `{other}`")),
    };
    if let Some(extra) = flags.keys().next() {
        return Err(format!("unknown option --{extra}"));
    }
    Ok(command)
}

/// Mints a token offline with this configuration's key: the bootstrap path, before any
/// admin token exists. It carries a fresh `jti` (so that the audit log can tell tokens
/// apart) but is not recorded in `api_tokens`: only rotating SECRET_KEY revokes it.
pub fn mint(config: &Config, sub: &str, role: Role, ttl: Duration) -> Result<String, StartError> {
    let key = signing_key(config)?;
    let options = MintOptions {
        jti: Some(uuid::Uuid::now_v7().to_string()),
        generation: None,
    };
    Ok(Tokens::new(&key, config.jwt_algorithm)
        .mint_with(sub, role, ttl, options)
        .token)
}

/// The prefix of the client id `check` connects as. Each run uses a fresh id
/// (`agent-server-check-<8 hex digits>`), removed again when the check passes: deleting
/// an agent revokes every token minted for its id before, so a fixed id would make the
/// next run's token look like a revoked one.
pub(crate) const CHECK_CLIENT_ID: &str = "agent-server-check";

/// GET /health, then a WebSocket handshake that must yield the `welcome` message.
pub async fn check(config: &Config, url: &str, timeout: Duration) -> Result<String, String> {
    let authority = url
        .strip_prefix("http://")
        .ok_or("--url must be http://HOST[:PORT] (the Service, not the TLS ingress)")?
        .trim_end_matches('/');
    let authority = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let client_id = format!("{CHECK_CLIENT_ID}-{:08x}", rand::random::<u32>());
    let agent_token = mint(config, &client_id, Role::Agent, Duration::from_secs(300))
        .map_err(|e| e.to_string())?;
    let admin_token = mint(
        config,
        CHECK_CLIENT_ID,
        Role::Admin,
        Duration::from_secs(300),
    )
    .map_err(|e| e.to_string())?;

    let work = async {
        let status = http_request(&authority, "GET", "/health", None).await?;
        if status != 200 {
            return Err(format!("GET /health answered {status}"));
        }
        let mut request = format!("ws://{authority}/ws/{client_id}")
            .into_client_request()
            .map_err(|e| e.to_string())?;
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {agent_token}")
                .parse()
                .map_err(|_| "bad token")?,
        );
        let tcp = TcpStream::connect(&authority)
            .await
            .map_err(|e| format!("connect {authority}: {e}"))?;
        let (mut ws, _) = tokio_tungstenite::client_async(request, tcp)
            .await
            .map_err(|e| format!("WebSocket handshake failed: {e}"))?;
        let first = ws
            .next()
            .await
            .ok_or("connection closed before the welcome message")?;
        let text = match first.map_err(|e| e.to_string())? {
            Message::Text(t) => t.to_string(),
            other => return Err(format!("expected a welcome text message, got {other:?}")),
        };
        let pod = match ServerMessage::parse(&text) {
            Ok(ServerMessage::Welcome { pod, .. }) => pod.into_owned(),
            _ => return Err(format!("expected a welcome message, got {text}")),
        };
        let _ = ws.close(None).await;
        let _ = ws.flush().await;
        // Best effort: leave no check agent behind.
        let _ = http_request(
            &authority,
            "DELETE",
            &format!("/api/v1/agents/{client_id}"),
            Some(&admin_token),
        )
        .await;
        Ok(format!("ok: /health 200, WebSocket welcome from pod {pod}"))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no answer from {url} within {timeout:?}"))?
}

async fn http_request(
    authority: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<u16, String> {
    let tcp = TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connect {authority}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", authority);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn no_arguments_means_serve() {
        assert_eq!(parse(args("")), Ok(Command::Serve));
    }

    #[test]
    fn token_command_reads_sub_role_and_ttl() {
        assert_eq!(
            parse(args("token --sub host-1 --role agent --ttl 2h")),
            Ok(Command::Token {
                sub: "host-1".into(),
                role: Role::Agent,
                ttl: Duration::from_secs(7200)
            })
        );
    }

    #[test]
    fn token_command_refuses_bad_input_with_a_reason() {
        assert!(
            parse(args("token --sub host-1"))
                .unwrap_err()
                .contains("--role")
        );
        assert!(
            parse(args("token --sub a/b --role agent"))
                .unwrap_err()
                .contains("--sub")
        );
        assert!(
            parse(args("token --sub a --role root"))
                .unwrap_err()
                .contains("not a role")
        );
        assert!(
            parse(args("token --sub a --role agent --ttl soon"))
                .unwrap_err()
                .contains("--ttl")
        );
        for huge in ["18446744073709551615", "3651d", "0"] {
            let e = parse(args(&format!("token --sub a --role agent --ttl {huge}"))).unwrap_err();
            assert!(e.contains("out of range"), "{huge}: {e}");
        }
        assert!(
            parse(args("token --sub a --role agent --bogus 1"))
                .unwrap_err()
                .contains("--bogus")
        );
    }
}
