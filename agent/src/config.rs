//! Configuration: a TOML file (`/etc/agent/agent.toml` or `--config PATH`), every key
//! overridable by an `AGENT_*` environment variable of the same name in capitals
//! (`server_url` → `AGENT_SERVER_URL`). Parsed once; a bad value is an error naming the key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_protocol::{check_client_id, client_id_from_hostname};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/agent/agent.toml";

/// A configuration error, naming the key (and its environment variable) to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{key} (AGENT_{}): {message}", key.to_uppercase())]
    Key { key: &'static str, message: String },
    #[error("{path}: `{key}` is not a configuration key; known keys: {}", KEYS.join(", "))]
    UnknownKey { path: PathBuf, key: String },
}

fn bad(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key,
        message: message.into(),
    }
}

/// Every key; the environment variable is `AGENT_` + the key in capitals.
pub const KEYS: &[&str] = &[
    "server_url",
    "client_id",
    "token",
    "token_file",
    "enroll_secret",
    "enroll_secret_file",
    "state_dir",
    "labels",
    "exec_allow",
    "plugin_dir",
    "ca_file",
    "command_timeout",
    "ws_max_message_bytes",
    "update_welcome_timeout",
    "log",
];

/// A token or an enroll secret: never printed, not even by `{:?}`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Where the token comes from. A file is read again before every connection, so a token
/// rotated on disk is picked up after a 4003 (token expired) without a restart.
#[derive(Clone, Debug)]
pub enum TokenSource {
    Inline(Secret),
    File(PathBuf),
    /// The agent enrolls itself: with no token in `path` (or an expired one) it trades
    /// `secret` for its own token at `POST /api/v1/enroll` and keeps it in `path`
    /// (`<state_dir>/token`, see `enroll.rs`).
    Enroll {
        secret: Secret,
        path: PathBuf,
    },
}

impl TokenSource {
    /// The token to present now. For an enrolling agent, the stored token; an error
    /// when it has none yet.
    pub fn read(&self) -> Result<Secret, String> {
        match self {
            TokenSource::Inline(s) => Ok(s.clone()),
            TokenSource::File(path) | TokenSource::Enroll { path, .. } => {
                match std::fs::read_to_string(path) {
                    Ok(s) if !s.trim().is_empty() => Ok(Secret(s.trim().to_string())),
                    Ok(_) => Err(format!("token file {} is empty", path.display())),
                    Err(e) => Err(format!("cannot read token file {}: {e}", path.display())),
                }
            }
        }
    }
}

/// Reads a secret from a file: trimmed, and not empty.
fn read_secret_file(path: &Path) -> Result<Secret, String> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(Secret(s.trim().to_string())),
        Ok(_) => Err(format!("{} is empty", path.display())),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// `ws://`, `http://`.
    Plain,
    /// `wss://`, `https://`.
    Tls,
}

/// The server's address, from `server_url`.
#[derive(Clone, Debug)]
pub struct ServerUrl {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash (empty for the root).
    pub prefix: String,
}

impl ServerUrl {
    /// `wss://agents.example.com` (or `ws://`, `https://`, `http://`, with a port and a
    /// path prefix).
    pub fn parse(s: &str) -> Result<ServerUrl, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("`{s}` is not a URL ({e})"))?;
        let scheme = match uri.scheme_str() {
            Some("wss") | Some("https") => Scheme::Tls,
            Some("ws") | Some("http") => Scheme::Plain,
            _ => {
                return Err(format!(
                    "`{s}` must start with wss://, ws://, https:// or http://"
                ));
            }
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("`{s}` has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(match scheme {
            Scheme::Tls => 443,
            Scheme::Plain => 80,
        });
        if uri.query().is_some() {
            return Err(format!(
                "`{s}` has a query string; give the token with `token` or `token_file`"
            ));
        }
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(ServerUrl {
            scheme,
            host,
            port,
            prefix,
        })
    }

    /// `host:port`, with brackets around an IPv6 address.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn ws_url(&self, client_id: &str) -> String {
        let scheme = match self.scheme {
            Scheme::Tls => "wss",
            Scheme::Plain => "ws",
        };
        format!(
            "{scheme}://{}{}/ws/{client_id}",
            self.authority(),
            self.prefix
        )
    }

    /// The path (with prefix) of an HTTP API call.
    pub fn path(&self, path: &str) -> String {
        format!("{}{path}", self.prefix)
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerUrl,
    pub client_id: String,
    pub token: TokenSource,
    /// The journal of commands, and an enrolled agent's token, live here
    /// (`/var/lib/agent`; systemd's StateDirectory).
    pub state_dir: PathBuf,
    /// Sent in every hello; a rollout may target one.
    pub labels: Vec<String>,
    /// Programs `exec` may run, exactly as named in the command's `program`. Empty by
    /// default: a compromised server must not be able to run anything on the fleet.
    pub exec_allow: Vec<String>,
    /// Each executable here is a command of its file name.
    pub plugin_dir: Option<PathBuf>,
    /// PEM certificates trusted in addition to the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Bound on a plug-in's run, and the default (and maximum) of `exec`'s `timeout_seconds`.
    pub command_timeout: Duration,
    /// The server's WS_MAX_MESSAGE_BYTES: larger inventories go over HTTP.
    pub ws_max_message_bytes: usize,
    /// After switching to a new build, it must reach `welcome` within this bound, or the
    /// previous build is restored and run again.
    pub update_welcome_timeout: Duration,
    /// A tracing filter (`info`, `agent=debug`).
    pub log: String,
}

/// The raw values: the file's, overridden by the environment's.
struct Values {
    file: toml::Table,
    env: HashMap<&'static str, String>,
}

impl Values {
    fn string(&self, key: &'static str) -> Result<Option<String>, ConfigError> {
        if let Some(v) = self.env.get(key) {
            return Ok(Some(v.clone()));
        }
        match self.file.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(bad(
                key,
                format!("expected a string, found {}", other.type_str()),
            )),
        }
    }

    /// A list: a TOML array of strings, or a comma-separated environment value.
    fn list(&self, key: &'static str) -> Result<Vec<String>, ConfigError> {
        if let Some(v) = self.env.get(key) {
            return Ok(v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect());
        }
        match self.file.get(key) {
            None => Ok(Vec::new()),
            Some(toml::Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    other => Err(bad(
                        key,
                        format!("expected strings, found {}", other.type_str()),
                    )),
                })
                .collect(),
            Some(toml::Value::String(s)) => Ok(s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()),
            Some(other) => Err(bad(
                key,
                format!("expected a list of strings, found {}", other.type_str()),
            )),
        }
    }

    fn integer(&self, key: &'static str, default: u64, max: u64) -> Result<u64, ConfigError> {
        let n = if let Some(v) = self.env.get(key) {
            v.trim()
                .parse::<u64>()
                .map_err(|_| bad(key, format!("`{v}` is not a whole number")))?
        } else {
            match self.file.get(key) {
                None => return Ok(default),
                Some(toml::Value::Integer(n)) if *n >= 0 => *n as u64,
                Some(other) => {
                    return Err(bad(
                        key,
                        format!("expected a whole number, found {other:?}"),
                    ));
                }
            }
        };
        if n == 0 || n > max {
            return Err(bad(key, format!("{n} is out of range (1 to {max})")));
        }
        Ok(n)
    }
}

impl Config {
    /// Reads the file at `path` (which may be absent when `required` is false) and the
    /// environment through `env`, so tests never touch the process environment.
    pub fn load(
        path: &Path,
        required: bool,
        env: &dyn Fn(&str) -> Option<String>,
        hostname: &dyn Fn() -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = match std::fs::read_to_string(path) {
            Ok(text) => text.parse::<toml::Table>().map_err(|e| ConfigError::File {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => toml::Table::new(),
            Err(e) => {
                return Err(ConfigError::File {
                    path: path.to_path_buf(),
                    message: format!("cannot read the configuration file: {e}"),
                });
            }
        };
        if let Some(key) = file.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(ConfigError::UnknownKey {
                path: path.to_path_buf(),
                key: key.clone(),
            });
        }
        let env = KEYS
            .iter()
            .filter_map(|k| env(&format!("AGENT_{}", k.to_uppercase())).map(|v| (*k, v)))
            .collect();
        Config::from_values(Values { file, env }, hostname)
    }

    fn from_values(
        v: Values,
        hostname: &dyn Fn() -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let server = v.string("server_url")?.ok_or_else(|| {
            bad(
                "server_url",
                "required, for example wss://agents.example.com",
            )
        })?;
        let server = ServerUrl::parse(&server).map_err(|e| bad("server_url", e))?;

        let client_id = match v.string("client_id")? {
            Some(id) => {
                check_client_id(&id).map_err(|e| bad("client_id", e))?;
                id
            }
            None => hostname()
                .as_deref()
                .and_then(client_id_from_hostname)
                .ok_or_else(|| {
                    bad(
                        "client_id",
                        "not set, and the host name gives no valid id; set one",
                    )
                })?,
        };

        let state_dir = PathBuf::from(
            v.string("state_dir")?
                .unwrap_or_else(|| "/var/lib/agent".into()),
        );
        let enroll_secret = match (v.string("enroll_secret")?, v.string("enroll_secret_file")?) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "enroll_secret",
                    "set either enroll_secret or enroll_secret_file, not both",
                ));
            }
            (Some(s), None) if !s.trim().is_empty() => Some(Secret(s.trim().to_string())),
            (Some(_), None) => return Err(bad("enroll_secret", "is empty")),
            (None, Some(path)) => {
                Some(read_secret_file(Path::new(&path)).map_err(|e| bad("enroll_secret_file", e))?)
            }
            (None, None) => None,
        };
        let token = match (v.string("token")?, v.string("token_file")?, enroll_secret) {
            (Some(_), Some(_), _) => {
                return Err(bad("token", "set either token or token_file, not both"));
            }
            (Some(_), None, Some(_)) | (None, Some(_), Some(_)) => {
                return Err(bad(
                    "enroll_secret",
                    "set either a token (token or token_file) or an enroll secret (enroll_secret or enroll_secret_file), not both: an enrolling agent keeps the token it is issued in state_dir",
                ));
            }
            (Some(t), None, None) if !t.trim().is_empty() => {
                TokenSource::Inline(Secret(t.trim().to_string()))
            }
            (Some(_), None, None) => return Err(bad("token", "is empty")),
            (None, Some(path), None) => {
                let source = TokenSource::File(PathBuf::from(path));
                source.read().map_err(|e| bad("token_file", e))?;
                source
            }
            (None, None, Some(secret)) => TokenSource::Enroll {
                secret,
                path: state_dir.join(crate::enroll::TOKEN_FILE),
            },
            (None, None, None) => {
                return Err(bad(
                    "token",
                    "required (or token_file, or enroll_secret to enroll with the server); mint one with `agent-server token --sub ID --role agent`",
                ));
            }
        };

        let labels = v.list("labels")?;
        if labels.len() > 32 {
            return Err(bad(
                "labels",
                format!("{} labels; at most 32", labels.len()),
            ));
        }
        for label in &labels {
            let ok = (1..=64).contains(&label.len())
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._:/-".contains(c));
            if !ok {
                return Err(bad(
                    "labels",
                    format!("`{label}` must be 1 to 64 of A-Z a-z 0-9 . _ : / -"),
                ));
            }
        }

        let exec_allow = v.list("exec_allow")?;
        if let Some(p) = exec_allow.iter().find(|p| p.is_empty() || p.contains('\0')) {
            return Err(bad("exec_allow", format!("`{p}` is not a program name")));
        }

        let plugin_dir = v.string("plugin_dir")?.map(PathBuf::from);
        if let Some(dir) = &plugin_dir
            && !dir.is_dir()
        {
            return Err(bad(
                "plugin_dir",
                format!("{} is not a directory", dir.display()),
            ));
        }
        let ca_file = v.string("ca_file")?.map(PathBuf::from);
        if let Some(path) = &ca_file {
            crate::net::read_ca_file(path).map_err(|e| bad("ca_file", e))?;
        }

        Ok(Config {
            server,
            client_id,
            token,
            state_dir,
            labels,
            exec_allow,
            plugin_dir,
            ca_file,
            command_timeout: Duration::from_secs(v.integer("command_timeout", 300, 86_400)?),
            ws_max_message_bytes: v.integer("ws_max_message_bytes", 64 * 1024, 1 << 30)? as usize,
            update_welcome_timeout: Duration::from_secs(v.integer(
                "update_welcome_timeout",
                120,
                86_400,
            )?),
            log: v.string("log")?.unwrap_or_else(|| "info".into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, file).unwrap();
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load(&path, true, &|k| env.get(k).cloned(), &|| {
            Some("Web 1.example.com".into())
        })
    }

    const MINIMAL: &str = "server_url = \"wss://agents.example.com\"\ntoken = \"t0k3n\"\n";

    #[test]
    fn a_minimal_file_takes_the_defaults() {
        let c = load(MINIMAL, &[]).unwrap();
        assert_eq!(c.client_id, "Web-1.example.com");
        assert_eq!(
            c.server.ws_url(&c.client_id),
            "wss://agents.example.com:443/ws/Web-1.example.com"
        );
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/agent"));
        assert!(c.exec_allow.is_empty());
        assert_eq!(c.command_timeout, Duration::from_secs(300));
        assert_eq!(c.update_welcome_timeout, Duration::from_secs(120));
    }

    #[test]
    fn the_environment_overrides_every_key_of_the_file() {
        let c = load(
            "server_url = \"wss://a.example.com\"\ntoken = \"t\"\nlabels = [\"x\"]\nexec_allow = [\"uptime\"]\n",
            &[
                ("AGENT_SERVER_URL", "ws://127.0.0.1:8080/prefix/"),
                ("AGENT_CLIENT_ID", "host-9"),
                ("AGENT_LABELS", "canary, region:eu"),
                ("AGENT_EXEC_ALLOW", ""),
                ("AGENT_COMMAND_TIMEOUT", "5"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.server.ws_url(&c.client_id),
            "ws://127.0.0.1:8080/prefix/ws/host-9"
        );
        assert_eq!(c.labels, ["canary", "region:eu"]);
        assert!(c.exec_allow.is_empty());
        assert_eq!(c.command_timeout, Duration::from_secs(5));
    }

    #[test]
    fn a_bad_value_names_its_key_and_variable() {
        let e = load(MINIMAL, &[("AGENT_SERVER_URL", "ftp://x")]).unwrap_err();
        assert!(
            e.to_string().starts_with("server_url (AGENT_SERVER_URL): "),
            "{e}"
        );
        let e = load(MINIMAL, &[("AGENT_CLIENT_ID", "a b")]).unwrap_err();
        assert!(
            e.to_string().starts_with("client_id (AGENT_CLIENT_ID): "),
            "{e}"
        );
        let e = load("server_url = \"ws://x\"\n", &[]).unwrap_err();
        assert!(
            e.to_string().starts_with("token (AGENT_TOKEN): required"),
            "{e}"
        );
        let e = load(&format!("{MINIMAL}command_timeout = \"soon\"\n"), &[]).unwrap_err();
        assert!(e.to_string().starts_with("command_timeout"), "{e}");
        let e = load(&format!("{MINIMAL}exec_alow = []\n"), &[]).unwrap_err();
        assert!(
            e.to_string()
                .contains("`exec_alow` is not a configuration key"),
            "{e}"
        );
        let e = load(MINIMAL, &[("AGENT_LABELS", "bad label")]).unwrap_err();
        assert!(e.to_string().starts_with("labels"), "{e}");
    }

    #[test]
    fn the_token_never_prints() {
        let c = load(MINIMAL, &[]).unwrap();
        assert!(!format!("{c:?}").contains("t0k3n"));
    }

    #[test]
    fn an_enroll_secret_instead_of_a_token_keeps_the_issued_token_in_the_state_dir() {
        let file =
            "server_url = \"wss://a.example.com\"\nenroll_secret = \"agent-enroll-s3cr3t\"\n";
        let c = load(file, &[("AGENT_STATE_DIR", "/srv/agent")]).unwrap();
        match &c.token {
            TokenSource::Enroll { secret, path } => {
                assert_eq!(secret.expose(), "agent-enroll-s3cr3t");
                assert_eq!(path, &PathBuf::from("/srv/agent/token"));
            }
            other => panic!("expected enrollment, got {other:?}"),
        }
        assert!(!format!("{c:?}").contains("s3cr3t"));

        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("enroll-secret");
        std::fs::write(&secret_file, "agent-enroll-from-file\n").unwrap();
        let c = load(
            "server_url = \"wss://a.example.com\"\n",
            &[("AGENT_ENROLL_SECRET_FILE", secret_file.to_str().unwrap())],
        )
        .unwrap();
        assert!(
            matches!(&c.token, TokenSource::Enroll { secret, .. } if secret.expose() == "agent-enroll-from-file")
        );
    }

    #[test]
    fn a_token_and_an_enroll_secret_together_are_refused_by_name() {
        let e = load(MINIMAL, &[("AGENT_ENROLL_SECRET", "agent-enroll-x")]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("enroll_secret (AGENT_ENROLL_SECRET): set either a token"),
            "{e}"
        );
        let e = load(
            "server_url = \"ws://x\"\n",
            &[("AGENT_ENROLL_SECRET_FILE", "/nonexistent/secret")],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("enroll_secret_file (AGENT_ENROLL_SECRET_FILE): cannot read"),
            "{e}"
        );
    }
}
