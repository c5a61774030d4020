//! The chart's values, read the way Helm merges them: `chart/values.yaml` overlaid with
//! `chart/ci/kind-values.yaml`. The local target takes its ingress and server settings
//! from here, so that both targets run what the chart deploys.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_yaml_ng::Value;

/// The merged values.
pub struct ChartValues(Value);

/// The routes of the chart's `routes` values with their paths, as
/// `chart/templates/_helpers.tpl` (`agent-server.routes`) lists them: an Ingress path
/// is a prefix, so `inventory` covers all of `/api/v1/agents`.
pub const ROUTES: [(&str, &[&str]); 4] = [
    ("websocket", &["/ws"]),
    ("inventory", &["/api/v1/agents"]),
    ("binaries", &["/api/v1/binaries"]),
    ("default", &["/api", "/"]),
];

/// One route's limits at the ingress (`routes.<name>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteLimits {
    /// The key under `routes`.
    pub name: &'static str,
    /// Its path prefixes.
    pub paths: &'static [&'static str],
    /// `routes.<name>.timeout`: ingress-nginx's proxy read and send timeouts.
    pub timeout: Duration,
    /// `routes.<name>.bodySize` in nginx's syntax (`10m`), as the chart renders it.
    pub body_size: String,
    /// The same, in bytes.
    pub body_size_bytes: u64,
    /// Whether the body is streamed to the server rather than buffered first (the
    /// binaries route's `proxy-request-buffering: off`).
    pub stream_body: bool,
}

/// What the local target needs from the values.
#[derive(Clone, Debug)]
pub struct IngressSettings {
    /// `ingress.nginx.proxyConnectTimeout`, seconds.
    pub connect_timeout: Duration,
    /// Every route of [`ROUTES`], in that order.
    pub routes: Vec<RouteLimits>,
}

impl IngressSettings {
    /// The limits of route `name` (a key of [`ROUTES`]).
    pub fn route(&self, name: &str) -> &RouteLimits {
        self.routes
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no route `{name}` in the chart's routes"))
    }

    /// `routes.websocket.timeout`: how long an agent's WebSocket may stay silent.
    pub fn websocket_timeout(&self) -> Duration {
        self.route("websocket").timeout
    }
}

#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// `config.wsHeartbeatInterval`, as the server reads it.
    pub heartbeat: Duration,
    /// `config.wsOfflineTimeout`.
    pub offline_timeout: Duration,
    /// `config.drainWindow`, seconds.
    pub drain_window: Duration,
}

impl ChartValues {
    /// Reads `values.yaml` and overlays each of `overlays` in order.
    pub fn load(chart: &Path, overlays: &[&Path]) -> Result<Self> {
        let mut merged = read(&chart.join("values.yaml"))?;
        for overlay in overlays {
            merge(&mut merged, read(overlay)?);
        }
        Ok(Self(merged))
    }

    fn get(&self, path: &str) -> Result<&Value> {
        let mut v = &self.0;
        for key in path.split('.') {
            v = v
                .get(key)
                .with_context(|| format!("chart values have no `{path}`"))?;
        }
        Ok(v)
    }

    /// A number or a numeric string.
    fn seconds(&self, path: &str) -> Result<Duration> {
        let v = self.get(path)?;
        let text = match v {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            other => bail!("`{path}` is {other:?}, not a duration"),
        };
        parse_duration(&text).with_context(|| format!("`{path}`: `{text}` is not a duration"))
    }

    /// A string (or number) value, as text.
    pub fn text(&self, path: &str) -> Result<String> {
        match self.get(path)? {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            other => bail!("`{path}` is {other:?}, not a scalar"),
        }
    }

    pub fn ingress(&self) -> Result<IngressSettings> {
        let routes = ROUTES
            .iter()
            .map(|&(name, paths)| {
                let size = self.text(&format!("routes.{name}.bodySize"))?;
                let (body_size, body_size_bytes) = byte_size(&size).with_context(|| {
                    format!("routes.{name}.bodySize `{size}` is not a size like 10Mi")
                })?;
                Ok(RouteLimits {
                    name,
                    paths,
                    timeout: self.seconds(&format!("routes.{name}.timeout"))?,
                    body_size,
                    body_size_bytes,
                    stream_body: name == "binaries",
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(IngressSettings {
            connect_timeout: self.seconds("ingress.nginx.proxyConnectTimeout")?,
            routes,
        })
    }

    pub fn server(&self) -> Result<ServerSettings> {
        Ok(ServerSettings {
            heartbeat: self.seconds("config.wsHeartbeatInterval")?,
            offline_timeout: self.seconds("config.wsOfflineTimeout")?,
            drain_window: self.seconds("config.drainWindow")?,
        })
    }
}

fn read(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: Value =
        serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    // An empty file (`{}` or comments only) overlays nothing.
    Ok(if value.is_null() {
        Value::Mapping(Default::default())
    } else {
        value
    })
}

/// Helm's rule: maps merge key by key, anything else is replaced.
fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// The server's duration syntax: seconds (`15`) or a number with `ms`, `s`, `m`, `h`.
pub fn parse_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return None,
    })
}

/// The chart's size syntax (`10Mi`, `64Ki`, `1Gi`, plain bytes) as nginx writes it
/// (`10m`) and in bytes, the way `agent-server.nginxSize` and `agent-server.bytes`
/// render it.
pub fn byte_size(v: &str) -> Option<(String, u64)> {
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let (suffix, factor) = match unit {
        "" => ("", 1),
        "Ki" => ("k", 1024),
        "Mi" => ("m", 1024 * 1024),
        "Gi" => ("g", 1024 * 1024 * 1024),
        _ => return None,
    };
    Some((format!("{n}{suffix}"), n.checked_mul(factor)?))
}

/// A duration as nginx and Helm values write it: whole seconds.
pub fn whole_seconds(d: Duration) -> u64 {
    d.as_secs().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Value {
        serde_yaml_ng::from_str(s).unwrap()
    }

    #[test]
    fn overlays_merge_maps_and_replace_everything_else() {
        let mut base = yaml("a: {b: 1, c: [1, 2]}\nd: x");
        merge(&mut base, yaml("a: {c: [3]}\nd: y\ne: z"));
        assert_eq!(base, yaml("a: {b: 1, c: [3]}\nd: y\ne: z"));
    }

    #[test]
    fn sizes_and_durations_parse_as_the_chart_and_the_server_read_them() {
        assert_eq!(byte_size("10Mi"), Some(("10m".into(), 10 * 1024 * 1024)));
        assert_eq!(byte_size("64Ki"), Some(("64k".into(), 64 * 1024)));
        assert_eq!(byte_size("100"), Some(("100".into(), 100)));
        assert_eq!(byte_size("10m"), None);
        assert_eq!(parse_duration("15"), Some(Duration::from_secs(15)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    }

    #[test]
    fn the_repository_chart_gives_the_kind_settings() {
        let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../chart");
        let values = ChartValues::load(&chart, &[&chart.join("ci/kind-values.yaml")]).unwrap();
        let ingress = values.ingress().unwrap();
        assert!(ingress.websocket_timeout() >= Duration::from_secs(60));
        let inventory = ingress.route("inventory");
        assert_eq!(inventory.body_size, "10m");
        assert_eq!(inventory.body_size_bytes, 10 * 1024 * 1024);
        assert_eq!(ingress.route("default").body_size_bytes, 1024 * 1024);
        assert_eq!(ingress.route("binaries").body_size_bytes, 512 * 1024 * 1024);
        assert!(ingress.route("binaries").stream_body);
        let server = values.server().unwrap();
        assert!(server.heartbeat < ingress.websocket_timeout());
    }
}
