//! What the Helm chart in `chart/` renders, asserted on typed Kubernetes objects.
//!
//! Each test runs `helm template` with some values, parses the multi-document
//! output into k8s-openapi types (custom resources stay JSON) and checks one
//! behaviour the chart promises: probes, rollout, shutdown timing, security
//! context, NetworkPolicy rules, autoscaling, ingress annotations, secrets.
//!
//! `helm` is taken from PATH, else from `../shared/tools/helm` beside the
//! workspace. Without it the tests fail when `CI` is set and skip loudly
//! otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, PodSpec, Secret, SecurityContext, Service,
};
use k8s_openapi::api::networking::v1::{
    Ingress, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const RELEASE: &str = "agent-server";
const NAMESPACE: &str = "agent-system";

// ---------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e lives inside the workspace")
        .to_path_buf()
}

fn chart_dir() -> PathBuf {
    workspace_root().join("chart")
}

/// `helm` on PATH, else the copy CI keeps in `../shared/tools` beside the repository.
fn find_helm() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("helm"))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| {
        let shared = workspace_root().join("../shared/tools/helm");
        shared.is_file().then_some(shared)
    })
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The helm binary, or `None` after a loud skip notice (a failure under CI).
fn helm_or_skip() -> Option<PathBuf> {
    match find_helm() {
        Some(helm) => Some(helm),
        None if in_ci() => panic!(
            "helm not found on PATH nor at {}: the chart tests cannot run",
            workspace_root().join("../shared/tools/helm").display()
        ),
        None => {
            eprintln!(
                "\n*** SKIPPED: helm not found on PATH nor in ../shared/tools; \
                 the chart was NOT checked. Install helm to run these tests. ***\n"
            );
            None
        }
    }
}

/// `helm template` has no cluster behind it, so the chart's `lookup` finds
/// nothing and `secrets.generate: auto` refuses to make up secrets; the tests
/// stand in for a cluster with `secrets.generate=true` unless they choose.
fn helm_template(helm: &Path, args: &[&str]) -> std::process::Output {
    let chart = chart_dir();
    let chooses = args.iter().any(|a| a.contains("secrets.generate"))
        || args.iter().filter(|a| a.ends_with(".yaml")).any(|file| {
            std::fs::read_to_string(file)
                .map(|text| text.lines().any(|l| l.starts_with("secrets:")))
                .unwrap_or(false)
        });
    let generate: &[&str] = if chooses {
        &[]
    } else {
        &["--set", "secrets.generate=true"]
    };
    Command::new(helm)
        .arg("template")
        .arg(RELEASE)
        .arg(&chart)
        .args(["--namespace", NAMESPACE])
        .args(generate)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", helm.display()))
}

/// The manifests `helm template` renders with these extra arguments, or `None`
/// when helm is missing outside CI.
fn render(args: &[&str]) -> Option<Manifests> {
    let helm = helm_or_skip()?;
    let output = helm_template(&helm, args);
    assert!(
        output.status.success(),
        "helm template {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(Manifests::parse(&String::from_utf8_lossy(&output.stdout)))
}

/// The error message of a `helm template` that must fail.
fn render_error(args: &[&str]) -> Option<String> {
    let helm = helm_or_skip()?;
    let output = helm_template(&helm, args);
    assert!(
        !output.status.success(),
        "helm template {args:?} should have failed, but rendered:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    Some(String::from_utf8_lossy(&output.stderr).into_owned())
}

fn ci_values(name: &str) -> String {
    chart_dir()
        .join("ci")
        .join(format!("{name}-values.yaml"))
        .display()
        .to_string()
}

/// Renders, or returns from the calling test when helm is missing.
macro_rules! render {
    ($($arg:expr),* $(,)?) => {
        match render(&[$($arg),*]) {
            Some(manifests) => manifests,
            None => return,
        }
    };
}

struct Manifests {
    docs: Vec<Value>,
}

impl Manifests {
    fn parse(text: &str) -> Self {
        let docs = serde_yaml_ng::Deserializer::from_str(text)
            .map(|doc| Value::deserialize(doc).expect("helm template printed invalid YAML"))
            .filter(|doc| !doc.is_null())
            .collect();
        Manifests { docs }
    }

    fn raw_all(&self, kind: &str) -> impl Iterator<Item = &Value> {
        let kind = kind.to_string();
        self.docs.iter().filter(move |d| d["kind"] == kind.as_str())
    }

    fn raw(&self, kind: &str, name: &str) -> Option<&Value> {
        self.raw_all(kind).find(|d| d["metadata"]["name"] == name)
    }

    fn all<T: DeserializeOwned>(&self, kind: &str) -> Vec<T> {
        self.raw_all(kind)
            .map(|d| {
                serde_json::from_value(d.clone())
                    .unwrap_or_else(|e| panic!("{kind} does not parse as the Kubernetes type: {e}"))
            })
            .collect()
    }

    fn get<T: DeserializeOwned>(&self, kind: &str, name: &str) -> Option<T> {
        self.raw(kind, name).map(|d| {
            serde_json::from_value(d.clone()).unwrap_or_else(|e| {
                panic!("{kind}/{name} does not parse as the Kubernetes type: {e}")
            })
        })
    }

    fn one<T: DeserializeOwned>(&self, kind: &str, name: &str) -> T {
        self.get(kind, name)
            .unwrap_or_else(|| panic!("no {kind}/{name} rendered; kinds: {:?}", self.kinds()))
    }

    fn kinds(&self) -> Vec<String> {
        self.docs
            .iter()
            .map(|d| {
                format!(
                    "{}/{}",
                    d["kind"].as_str().unwrap_or("?"),
                    d["metadata"]["name"].as_str().unwrap_or("?")
                )
            })
            .collect()
    }

    fn deployment(&self) -> Deployment {
        self.one("Deployment", RELEASE)
    }

    fn pod_spec(&self) -> PodSpec {
        self.deployment()
            .spec
            .template
            .spec
            .expect("the Deployment has a pod spec")
    }

    fn server(&self) -> Container {
        self.pod_spec()
            .containers
            .into_iter()
            .find(|c| c.name == "server")
            .expect("a container named server")
    }

    fn pod_annotations(&self) -> BTreeMap<String, String> {
        self.deployment()
            .spec
            .template
            .metadata
            .and_then(|m| m.annotations)
            .unwrap_or_default()
    }

    fn server_policy(&self) -> NetworkPolicy {
        self.one("NetworkPolicy", RELEASE)
    }

    fn secret_data(&self, name: &str) -> BTreeMap<String, String> {
        let secret: Secret = self.one("Secret", name);
        secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8(v.0).expect("secret values are UTF-8")))
            .collect()
    }
}

fn env_value(container: &Container, name: &str) -> Option<String> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

fn env_var<'a>(container: &'a Container, name: &str) -> Option<&'a EnvVar> {
    container.env.iter().flatten().find(|e| e.name == name)
}

/// The (Secret, key) an environment variable of the container comes from.
fn secret_ref(container: &Container, name: &str) -> Option<(String, String)> {
    env_var(container, name)
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.secret_key_ref.as_ref())
        .map(|r| (r.name.clone(), r.key.clone()))
}

fn seconds(container: &Container, name: &str) -> i64 {
    env_value(container, name)
        .unwrap_or_else(|| panic!("{name} is not set on the server container"))
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number of seconds"))
}

fn ports(ports: &Option<Vec<NetworkPolicyPort>>) -> Vec<(String, i32)> {
    ports
        .iter()
        .flatten()
        .map(|p| {
            let port = match p.port.as_ref().expect("every rule names its port") {
                IntOrString::Int(n) => *n,
                IntOrString::String(s) => panic!("named port {s}: rules use numbers"),
            };
            (p.protocol.clone().unwrap_or_else(|| "TCP".into()), port)
        })
        .collect()
}

fn namespace_names(peer: &NetworkPolicyPeer) -> Vec<String> {
    let Some(selector) = &peer.namespace_selector else {
        return vec![];
    };
    let mut names: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .filter(|(k, _)| k.as_str() == "kubernetes.io/metadata.name")
        .map(|(_, v)| v.clone())
        .collect();
    for expr in selector.match_expressions.iter().flatten() {
        assert_eq!(
            expr.key, "kubernetes.io/metadata.name",
            "namespaces are selected by the label Kubernetes sets on every namespace"
        );
        assert_eq!(expr.operator, "In");
        names.extend(expr.values.iter().flatten().cloned());
    }
    names
}

fn egress_rule_for_port(
    policy: &NetworkPolicy,
    protocol: &str,
    port: i32,
) -> NetworkPolicyEgressRule {
    policy
        .spec
        .as_ref()
        .and_then(|s| s.egress.as_ref())
        .into_iter()
        .flatten()
        .find(|rule| ports(&rule.ports).contains(&(protocol.to_string(), port)))
        .cloned()
        .unwrap_or_else(|| panic!("no egress rule for {protocol}/{port}"))
}

// ---------------------------------------------------------------------------
// Server Deployment
// ---------------------------------------------------------------------------

#[test]
fn server_probes_use_health_and_readiness_with_the_design_timings() {
    let m = render!();
    let server = m.server();

    let liveness = server.liveness_probe.expect("a liveness probe");
    let http = liveness.http_get.expect("liveness is an HTTP GET");
    assert_eq!(http.path.as_deref(), Some("/health"));
    assert_eq!(http.port, IntOrString::String("http".into()));
    assert_eq!(liveness.initial_delay_seconds, Some(30));
    assert_eq!(liveness.period_seconds, Some(10));
    assert_eq!(liveness.timeout_seconds, Some(5));
    assert_eq!(liveness.failure_threshold, Some(3));

    let readiness = server.readiness_probe.expect("a readiness probe");
    let http = readiness.http_get.expect("readiness is an HTTP GET");
    assert_eq!(http.path.as_deref(), Some("/readiness"));
    assert_eq!(http.port, IntOrString::String("http".into()));
    assert_eq!(readiness.initial_delay_seconds, Some(10));
    assert_eq!(readiness.period_seconds, Some(5));
    assert_eq!(readiness.timeout_seconds, Some(3));
    assert_eq!(readiness.failure_threshold, Some(2));

    let port = server
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("http"));
    assert_eq!(
        port.map(|p| p.container_port),
        Some(8080),
        "the probes' named port is 8080"
    );
}

#[test]
fn rolling_update_surges_one_pod_and_never_drops_below_the_desired_count() {
    let m = render!();
    let spec = m.deployment().spec;
    assert_eq!(spec.replicas, Some(2));
    let strategy = spec.strategy.expect("an update strategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.expect("rolling update parameters");
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
}

#[test]
fn pods_learn_their_name_and_ip_from_the_downward_api() {
    let m = render!();
    let server = m.server();
    for (name, field) in [("POD_ID", "metadata.name"), ("POD_IP", "status.podIP")] {
        let var = env_var(&server, name).unwrap_or_else(|| panic!("{name} is set"));
        let path = var
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        assert_eq!(path, Some(field), "{name} comes from {field}");
    }
}

#[test]
fn server_reads_the_configmap_and_secret_through_env_from() {
    let m = render!();
    let server = m.server();
    let sources = server.env_from.expect("envFrom sources");
    let config = sources
        .iter()
        .find_map(|s| s.config_map_ref.as_ref())
        .expect("a ConfigMap source");
    let secret = sources
        .iter()
        .find_map(|s| s.secret_ref.as_ref())
        .expect("a Secret source");
    assert_eq!(config.name, RELEASE);
    assert_eq!(secret.name, RELEASE);

    let config_map: ConfigMap = m.one("ConfigMap", RELEASE);
    let data = config_map.data.expect("ConfigMap data");
    for key in [
        "SERVER_HOST",
        "SERVER_PORT",
        "SERVER_URL",
        "REDIS_HOST",
        "REDIS_PORT",
        "REDIS_DB",
        "WS_HEARTBEAT_INTERVAL",
        "WS_OFFLINE_TIMEOUT",
        "BINARY_STORAGE_PATH",
        "LOG_LEVEL",
        "DATA_DIR",
        "LOG_FORMAT",
    ] {
        assert!(data.contains_key(key), "the ConfigMap holds {key}");
    }
    assert_eq!(data["REDIS_HOST"], "agent-server-redis");
    assert_eq!(data["LOG_FORMAT"], "json");

    let secret = m.secret_data(RELEASE);
    for key in ["SECRET_KEY", "JWT_ALGORITHM", "REDIS_PASSWORD"] {
        assert!(secret.contains_key(key), "the Secret holds {key}");
    }
    assert!(
        !secret.contains_key("DATABASE_URL"),
        "the bundled database's URL holds no secret, so it is a plain variable"
    );
}

#[test]
fn pod_template_checksums_change_when_config_or_secret_change() {
    // Fixed passwords: generated ones differ on every `helm template` (in a
    // cluster, `lookup` keeps them), which would change the checksum anyway.
    const FIXED: &str = "postgresql.auth.password=pg-password,redis.auth.password=redis-password,auth.adminPassword=admin-password-1";
    let base = render!(
        "--set",
        FIXED,
        "--set",
        "auth.secretKey=0123456789abcdef0123456789abcdef-base"
    );
    let config_changed = render!(
        "--set",
        FIXED,
        "--set",
        "auth.secretKey=0123456789abcdef0123456789abcdef-base",
        "--set",
        "config.logLevel=debug"
    );
    let secret_changed = render!(
        "--set",
        FIXED,
        "--set",
        "auth.secretKey=0123456789abcdef0123456789abcdef-next"
    );

    let a = base.pod_annotations();
    let b = config_changed.pod_annotations();
    let c = secret_changed.pod_annotations();
    for key in ["checksum/config", "checksum/secret"] {
        assert_eq!(a[key].len(), 64, "{key} is a sha256");
    }
    assert_ne!(
        a["checksum/config"], b["checksum/config"],
        "a config change rolls the pods"
    );
    assert_eq!(a["checksum/secret"], b["checksum/secret"]);
    assert_ne!(
        a["checksum/secret"], c["checksum/secret"],
        "a secret change rolls the pods"
    );
    assert_eq!(a["checksum/config"], c["checksum/config"]);
}

#[test]
fn pods_advertise_prometheus_scraping_on_the_metrics_port() {
    let m = render!();
    let annotations = m.pod_annotations();
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9090");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
}

#[test]
fn metrics_have_their_own_port_that_no_ingress_or_route_reaches() {
    let m = render!(
        "-f",
        &ci_values("seed"),
        "--set",
        "gatewayApi.enabled=true",
        "--set",
        "gatewayApi.parentRefs[0].name=eg",
        "--set",
        "metrics.port=9464",
    );
    let server = m.server();
    let container_ports: BTreeMap<String, i32> = server
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    assert_eq!(
        container_ports,
        BTreeMap::from([("http".into(), 8080), ("metrics".into(), 9464)])
    );
    let config: ConfigMap = m.one("ConfigMap", RELEASE);
    assert_eq!(config.data.unwrap()["METRICS_PORT"], "9464");
    assert_eq!(m.pod_annotations()["prometheus.io/port"], "9464");

    // The main Service (what the Ingress and the HTTPRoute reach) has no metrics port;
    // a ClusterIP Service of its own has, and the ServiceMonitor selects that one.
    let main: Service = m.one("Service", RELEASE);
    let main_ports = main.spec.unwrap().ports.unwrap();
    assert_eq!(main_ports.len(), 1);
    assert_eq!(main_ports[0].name.as_deref(), Some("http"));
    let metrics: Service = m.one("Service", "agent-server-metrics");
    let metrics_labels = metrics.metadata.labels.clone().unwrap();
    let spec = metrics.spec.unwrap();
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    let port = &spec.ports.unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("metrics"), 9464));
    assert_eq!(
        port.target_port,
        Some(IntOrString::String("metrics".into()))
    );
    let monitor = m.raw("ServiceMonitor", RELEASE).expect("a ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(metrics_labels.get(key).map(String::as_str), value.as_str());
    }
    assert_eq!(
        main.metadata.labels.unwrap()["app.kubernetes.io/component"],
        "server",
        "the ServiceMonitor does not select the main Service"
    );

    let ingress: Ingress = m.one("Ingress", RELEASE);
    for rule in ingress.spec.unwrap().rules.unwrap() {
        for path in rule.http.unwrap().paths {
            let port = path.backend.service.unwrap().port.unwrap();
            assert_eq!(port.name.as_deref(), Some("http"), "{:?}", path.path);
        }
    }
    let route = m.raw("HTTPRoute", RELEASE).expect("an HTTPRoute");
    for rule in route["spec"]["rules"].as_array().unwrap() {
        for backend in rule["backendRefs"].as_array().unwrap() {
            assert_eq!(backend["name"], RELEASE);
            assert_eq!(backend["port"], 80);
        }
    }

    // Only Prometheus' namespaces reach the metrics port, and only it.
    let rules = m.server_policy().spec.unwrap().ingress.unwrap();
    for rule in &rules {
        let from: Vec<String> = rule
            .from
            .iter()
            .flatten()
            .flat_map(namespace_names)
            .collect();
        if ports(&rule.ports).contains(&("TCP".to_string(), 9464)) {
            assert_eq!(from, ["monitoring"]);
            assert_eq!(ports(&rule.ports).len(), 1);
        }
    }

    let Some(error) = render_error(&["--set", "metrics.port=8080"]) else {
        return;
    };
    assert!(error.contains("metrics.port"), "{error}");
}

fn assert_hardened(context: &SecurityContext, who: &str) {
    assert_eq!(context.run_as_non_root, Some(true), "{who}: runAsNonRoot");
    assert_eq!(
        context.allow_privilege_escalation,
        Some(false),
        "{who}: no privilege escalation"
    );
    assert_eq!(
        context.read_only_root_filesystem,
        Some(true),
        "{who}: read-only root filesystem"
    );
    let drop = context.capabilities.as_ref().and_then(|c| c.drop.clone());
    assert_eq!(
        drop,
        Some(vec!["ALL".to_string()]),
        "{who}: drops all capabilities"
    );
    assert!(
        context
            .capabilities
            .as_ref()
            .and_then(|c| c.add.as_ref())
            .is_none(),
        "{who}: adds no capability"
    );
    assert_eq!(
        context.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault"),
        "{who}: RuntimeDefault seccomp"
    );
}

#[test]
fn server_runs_as_65532_with_a_read_only_root_and_writable_volumes_only_where_it_writes() {
    let m = render!();
    let pod = m.pod_spec();
    let pod_context = pod
        .security_context
        .clone()
        .expect("a pod security context");
    assert_eq!(pod_context.run_as_non_root, Some(true));
    assert_eq!(pod_context.run_as_user, Some(65532));
    assert_eq!(pod_context.fs_group, Some(65532));
    assert_eq!(
        pod_context.seccomp_profile.map(|s| s.type_),
        Some("RuntimeDefault".to_string())
    );
    assert_eq!(
        pod.automount_service_account_token,
        Some(false),
        "no API token in the pod"
    );

    let server = m.server();
    let context = server
        .security_context
        .clone()
        .expect("a container security context");
    assert_hardened(&context, "server");
    assert_eq!(context.run_as_user, Some(65532));

    let mounts: BTreeMap<String, String> = server
        .volume_mounts
        .iter()
        .flatten()
        .map(|v| (v.mount_path.clone(), v.name.clone()))
        .collect();
    assert_eq!(
        mounts.get("/storage/binaries").map(String::as_str),
        Some("binaries")
    );
    assert_eq!(
        mounts.get("/var/lib/agent-server").map(String::as_str),
        Some("data")
    );
    assert_eq!(mounts.get("/tmp").map(String::as_str), Some("tmp"));

    let volumes = pod.volumes.unwrap_or_default();
    let binaries = volumes
        .iter()
        .find(|v| v.name == "binaries")
        .expect("a binaries volume");
    assert_eq!(
        binaries
            .persistent_volume_claim
            .as_ref()
            .map(|c| c.claim_name.as_str()),
        Some("agent-server-binaries")
    );
    for name in ["data", "tmp"] {
        let volume = volumes
            .iter()
            .find(|v| v.name == name)
            .expect("the volume exists");
        assert!(volume.empty_dir.is_some(), "{name} is an emptyDir");
    }
    let config: ConfigMap = m.one("ConfigMap", RELEASE);
    assert_eq!(config.data.unwrap()["DATA_DIR"], "/var/lib/agent-server");

    let service_account: k8s_openapi::api::core::v1::ServiceAccount =
        m.one("ServiceAccount", RELEASE);
    assert_eq!(service_account.automount_service_account_token, Some(false));
}

#[test]
fn binaries_claim_is_read_write_many_by_default_and_storage_is_configurable() {
    let m = render!();
    let claim: k8s_openapi::api::core::v1::PersistentVolumeClaim =
        m.one("PersistentVolumeClaim", "agent-server-binaries");
    let spec = claim.spec.expect("a claim spec");
    assert_eq!(spec.access_modes, Some(vec!["ReadWriteMany".to_string()]));
    assert_eq!(spec.storage_class_name, None, "the cluster default class");

    let kind = render!("-f", &ci_values("kind"));
    let claim: k8s_openapi::api::core::v1::PersistentVolumeClaim =
        kind.one("PersistentVolumeClaim", "agent-server-binaries");
    let spec = claim.spec.expect("a claim spec");
    assert_eq!(spec.access_modes, Some(vec!["ReadWriteOnce".to_string()]));
    assert_eq!(spec.storage_class_name.as_deref(), Some("standard"));
}

#[test]
fn an_existing_read_write_many_claim_replaces_the_charts_claim() {
    let m = render!("--set", "persistence.existingClaim=agent-binaries-rwx");
    assert!(
        m.raw_all("PersistentVolumeClaim").next().is_none(),
        "no claim of the chart's: {:?}",
        m.kinds()
    );
    let volumes = m.pod_spec().volumes.unwrap();
    let binaries = volumes.iter().find(|v| v.name == "binaries").unwrap();
    assert_eq!(
        binaries
            .persistent_volume_claim
            .as_ref()
            .map(|c| c.claim_name.as_str()),
        Some("agent-binaries-rwx")
    );
    assert_eq!(
        mount_path(&m.server(), "binaries").as_deref(),
        Some("/storage/binaries")
    );
}

#[test]
fn the_chart_renders_as_a_subchart_with_global_values() {
    let Some(helm) = helm_or_skip() else {
        return;
    };
    let umbrella =
        std::env::temp_dir().join(format!("agent-server-umbrella-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&umbrella);
    std::fs::create_dir_all(umbrella.join("charts")).unwrap();
    let status = Command::new("cp")
        .arg("-R")
        .arg(chart_dir())
        .arg(umbrella.join("charts/agent-server"))
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::write(
        umbrella.join("Chart.yaml"),
        "apiVersion: v2\nname: platform\nversion: 1.0.0\ndependencies:\n  - name: agent-server\n    version: 0.1.0\n    condition: agent-server.enabled\n",
    )
    .unwrap();
    std::fs::write(
        umbrella.join("values.yaml"),
        "global:\n  imageRegistry: registry.example.com\nagent-server:\n  enabled: true\n  secrets:\n    generate: true\n",
    )
    .unwrap();
    let render = |extra: &[&str]| {
        Command::new(&helm)
            .args(["template", "platform"])
            .arg(&umbrella)
            .args(["--namespace", NAMESPACE])
            .args(extra)
            .output()
            .unwrap()
    };
    let output = render(&[]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let m = Manifests::parse(&String::from_utf8_lossy(&output.stdout));
    let deployment: Deployment = m.one("Deployment", "platform-agent-server");
    assert_eq!(deployment.spec.replicas, Some(2));

    let output = render(&["--set", "agent-server.enabled=false"]);
    assert!(output.status.success());
    let m = Manifests::parse(&String::from_utf8_lossy(&output.stdout));
    assert!(
        m.docs.is_empty(),
        "the condition switches it off: {:?}",
        m.kinds()
    );
    let _ = std::fs::remove_dir_all(&umbrella);
}

// ---------------------------------------------------------------------------
// Shutdown: preStop sleep or DRAIN_DELAY, by Kubernetes version
// ---------------------------------------------------------------------------

#[test]
fn kubernetes_1_30_and_later_get_the_native_pre_stop_sleep() {
    for version in ["1.30.0", "1.31.0", "1.37.0"] {
        let m = render!("--kube-version", version);
        let server = m.server();
        let sleep = server
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.sleep.as_ref())
            .unwrap_or_else(|| panic!("Kubernetes {version}: a native preStop sleep"));
        assert_eq!(sleep.seconds, 10);
        let pre_stop = server
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .unwrap();
        assert!(
            pre_stop.exec.is_none(),
            "the distroless image has no shell for exec: sleep"
        );
        assert_eq!(
            seconds(&server, "DRAIN_DELAY"),
            0,
            "Kubernetes {version}: the hook does the waiting"
        );
        assert_eq!(m.pod_spec().termination_grace_period_seconds, Some(30));
    }
}

#[test]
fn older_kubernetes_gets_the_server_drain_delay_instead_of_a_pre_stop_hook() {
    let m = render!("--kube-version", "1.29.0");
    let server = m.server();
    assert!(
        server.lifecycle.is_none(),
        "no lifecycle hook before 1.30: {:?}",
        server.lifecycle
    );
    assert_eq!(seconds(&server, "DRAIN_DELAY"), 10);
    assert_eq!(m.pod_spec().termination_grace_period_seconds, Some(30));
}

#[test]
fn native_pre_stop_sleep_can_be_forced_either_way_by_value() {
    let off = render!(
        "--kube-version",
        "1.33.0",
        "--set",
        "preStop.nativeSleep=false"
    );
    assert!(off.server().lifecycle.is_none());
    assert_eq!(seconds(&off.server(), "DRAIN_DELAY"), 10);

    let on = render!(
        "--kube-version",
        "1.29.0",
        "--set",
        "preStop.nativeSleep=true"
    );
    assert!(
        on.server()
            .lifecycle
            .and_then(|l| l.pre_stop)
            .and_then(|h| h.sleep)
            .is_some()
    );
    assert_eq!(seconds(&on.server(), "DRAIN_DELAY"), 0);
}

#[test]
fn shutdown_fits_in_the_grace_period_on_every_kubernetes_version() {
    for version in ["1.29.0", "1.31.0"] {
        let m = render!("--kube-version", version);
        let server = m.server();
        let grace = m.pod_spec().termination_grace_period_seconds.unwrap();
        let pre_stop = server
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.sleep.as_ref())
            .map_or(0, |s| s.seconds);
        let drain_delay = seconds(&server, "DRAIN_DELAY");
        let drain_window = seconds(&server, "DRAIN_WINDOW");
        let shutdown = seconds(&server, "SHUTDOWN_TIMEOUT");
        assert_eq!(
            pre_stop + drain_delay,
            10,
            "Kubernetes {version}: 10 s of serving while endpoints go"
        );
        assert!(
            pre_stop + shutdown < grace,
            "Kubernetes {version}: preStop {pre_stop} + SHUTDOWN_TIMEOUT {shutdown} < grace {grace}"
        );
        assert!(
            drain_delay + drain_window < shutdown,
            "Kubernetes {version}: DRAIN_DELAY {drain_delay} + DRAIN_WINDOW {drain_window} < SHUTDOWN_TIMEOUT {shutdown}"
        );
    }
}

#[test]
fn a_shutdown_timeout_that_overruns_the_grace_period_is_refused() {
    let Some(error) = render_error(&["--set", "config.shutdownTimeout=25"]) else {
        return;
    };
    assert!(error.contains("terminationGracePeriodSeconds"), "{error}");
}

// ---------------------------------------------------------------------------
// Service, Ingress, Gateway API
// ---------------------------------------------------------------------------

#[test]
fn service_is_cluster_ip_without_session_affinity() {
    let m = render!();
    let service: Service = m.one("Service", RELEASE);
    let spec = service.spec.expect("a Service spec");
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.session_affinity.as_deref(), Some("None"));
    let port = &spec.ports.expect("ports")[0];
    assert_eq!(port.port, 80);
    assert_eq!(port.target_port, Some(IntOrString::String("http".into())));
    let selector = spec.selector.expect("a selector");
    assert_eq!(
        selector.len(),
        2,
        "selector is name + instance: {selector:?}"
    );
    assert_eq!(selector["app.kubernetes.io/name"], "agent-server");
    assert_eq!(selector["app.kubernetes.io/instance"], RELEASE);
}

/// The Ingress of each route of `routes`: `(route, Ingress)`, the `default` route's
/// under the release's name.
fn route_ingresses(m: &Manifests) -> Vec<(&'static str, Ingress)> {
    e2e::values::ROUTES
        .iter()
        .map(|&(route, _)| {
            let name = if route == "default" {
                RELEASE.to_string()
            } else {
                format!("{RELEASE}-{route}")
            };
            (route, m.one::<Ingress>("Ingress", &name))
        })
        .collect()
}

fn annotations_of(ingress: &Ingress) -> BTreeMap<String, String> {
    ingress.metadata.annotations.clone().unwrap_or_default()
}

#[test]
fn ingress_nginx_gets_each_routes_limits_and_never_websocket_services() {
    let m = render!("-f", &ci_values("seed"));
    let ingresses = route_ingresses(&m);
    assert_eq!(
        m.all::<Ingress>("Ingress").len(),
        ingresses.len(),
        "one Ingress per route"
    );
    // (route, read/send timeout, body size): 3600 s on /ws only, 10 MiB for
    // inventories, 512 MiB for binaries, 1 MiB for everything else.
    let limits = [
        ("websocket", "3600", "64k"),
        ("inventory", "60", "10m"),
        ("binaries", "600", "512m"),
        ("default", "60", "1m"),
    ];
    for ((route, ingress), (expected_route, timeout, body)) in ingresses.iter().zip(limits) {
        assert_eq!(*route, expected_route);
        let annotations = annotations_of(ingress);
        let expected = [
            ("nginx.ingress.kubernetes.io/proxy-read-timeout", timeout),
            ("nginx.ingress.kubernetes.io/proxy-send-timeout", timeout),
            ("nginx.ingress.kubernetes.io/proxy-body-size", body),
            ("nginx.ingress.kubernetes.io/proxy-connect-timeout", "30"),
            ("nginx.ingress.kubernetes.io/ssl-redirect", "true"),
            ("nginx.ingress.kubernetes.io/force-ssl-redirect", "true"),
            ("nginx.ingress.kubernetes.io/enable-cors", "true"),
            (
                "nginx.ingress.kubernetes.io/cors-allow-origin",
                "https://agent.myelintek.com",
            ),
        ];
        for (key, value) in expected {
            assert_eq!(
                annotations.get(key).map(String::as_str),
                Some(value),
                "{route}: {key}"
            );
        }
        assert!(
            !annotations
                .keys()
                .any(|k| k.ends_with("websocket-services")),
            "websocket-services is not an ingress-nginx annotation: {annotations:?}"
        );
        // Binary uploads stream to the server; the rest is buffered as ingress-nginx does.
        assert_eq!(
            annotations
                .get("nginx.ingress.kubernetes.io/proxy-request-buffering")
                .map(String::as_str),
            (*route == "binaries").then_some("off"),
            "{route}"
        );
        // One Certificate: only the main Ingress asks cert-manager for it.
        assert_eq!(
            annotations
                .get("cert-manager.io/cluster-issuer")
                .map(String::as_str),
            (*route == "default").then_some("letsencrypt-prod"),
            "{route}"
        );
    }
}

#[test]
fn ingress_limits_and_the_servers_bounds_come_from_the_same_values() {
    let m = render!("--set", "ingress.enabled=true");
    let data = m.one::<ConfigMap>("ConfigMap", RELEASE).data.unwrap();
    assert_eq!(data["MAX_INVENTORY_BYTES"], (10 * 1024 * 1024).to_string());
    assert_eq!(data["MAX_BINARY_BYTES"], (512 * 1024 * 1024).to_string());

    // Raising a route's size moves the ingress and the server together.
    let m = render!(
        "--set",
        "ingress.enabled=true",
        "--set",
        "routes.inventory.bodySize=32Mi",
        "--set",
        "routes.binaries.bodySize=2Gi",
        "--set",
        "routes.websocket.timeout=900",
    );
    let data = m.one::<ConfigMap>("ConfigMap", RELEASE).data.unwrap();
    assert_eq!(data["MAX_INVENTORY_BYTES"], (32 * 1024 * 1024).to_string());
    assert_eq!(data["MAX_BINARY_BYTES"], (2u64 << 30).to_string());
    let ingresses: BTreeMap<&str, BTreeMap<String, String>> = route_ingresses(&m)
        .iter()
        .map(|(route, ingress)| (*route, annotations_of(ingress)))
        .collect();
    let body = "nginx.ingress.kubernetes.io/proxy-body-size";
    let read = "nginx.ingress.kubernetes.io/proxy-read-timeout";
    assert_eq!(ingresses["inventory"][body], "32m");
    assert_eq!(ingresses["binaries"][body], "2g");
    assert_eq!(ingresses["websocket"][read], "900");
    assert_eq!(ingresses["default"][read], "60");
    assert_eq!(ingresses["default"][body], "1m");

    // The server's bounds cannot be set apart from the ingress's.
    let Some(error) = render_error(&["--set-string", "config.extra.MAX_BINARY_BYTES=1"]) else {
        return;
    };
    assert!(error.contains("routes.binaries.bodySize"), "{error}");
    let Some(error) = render_error(&["--set", "routes.inventory.bodySize=10m"]) else {
        return;
    };
    assert!(error.contains("bodySize"), "{error}");
    // The ingress must outlast the server's pings on idle WebSockets.
    let Some(error) = render_error(&["--set", "routes.websocket.timeout=10"]) else {
        return;
    };
    assert!(error.contains("routes.websocket.timeout"), "{error}");
}

#[test]
fn ingress_routes_websocket_api_and_ui_paths_over_tls_for_the_host() {
    let m = render!("-f", &ci_values("seed"));
    let mut prefixes = Vec::new();
    for (route, ingress) in route_ingresses(&m) {
        let spec = ingress.spec.expect("an Ingress spec");
        assert_eq!(spec.ingress_class_name.as_deref(), Some("nginx"));
        let tls = &spec.tls.expect("TLS")[0];
        assert_eq!(tls.hosts, Some(vec!["agent.myelintek.com".to_string()]));
        assert_eq!(tls.secret_name.as_deref(), Some("agent-tls-cert"));
        let rule = &spec.rules.expect("rules")[0];
        assert_eq!(rule.host.as_deref(), Some("agent.myelintek.com"));
        let paths = &rule.http.as_ref().expect("HTTP paths").paths;
        let own: Vec<&str> = paths.iter().filter_map(|p| p.path.as_deref()).collect();
        let wanted = e2e::values::ROUTES
            .iter()
            .find(|(name, _)| *name == route)
            .unwrap()
            .1;
        assert_eq!(own, wanted, "{route}");
        prefixes.extend(own.iter().map(|p| p.to_string()));
        for path in paths {
            assert_eq!(path.path_type, "Prefix");
            let backend = path.backend.service.as_ref().expect("a Service backend");
            assert_eq!(backend.name, RELEASE);
        }
    }
    assert_eq!(
        prefixes,
        ["/ws", "/api/v1/agents", "/api/v1/binaries", "/api", "/"]
    );
}

#[test]
fn ingress_serves_several_hosts_with_their_certificates_and_the_first_sets_the_url() {
    let m = render!("-f", &ci_values("multihost"));
    let ingress: Ingress = m.one("Ingress", RELEASE);
    let spec = ingress.spec.expect("an Ingress spec");
    let hosts: Vec<String> = spec
        .rules
        .unwrap()
        .into_iter()
        .map(|r| {
            assert_eq!(
                r.http.unwrap().paths.len(),
                2,
                "every host gets /api and / (and the other routes' paths on their Ingresses)"
            );
            r.host.unwrap()
        })
        .collect();
    assert_eq!(
        hosts,
        [
            "agent.example.com",
            "agents.example.com",
            "agent.example.eu"
        ]
    );
    let tls: Vec<(String, Vec<String>)> = spec
        .tls
        .unwrap()
        .into_iter()
        .map(|t| (t.secret_name.unwrap(), t.hosts.unwrap()))
        .collect();
    assert_eq!(
        tls,
        [
            (
                "agent-example-com-tls".to_string(),
                vec![
                    "agent.example.com".to_string(),
                    "agents.example.com".to_string()
                ]
            ),
            (
                "agent-example-eu-tls".to_string(),
                vec!["agent.example.eu".to_string()]
            ),
        ]
    );
    let config: ConfigMap = m.one("ConfigMap", RELEASE);
    assert_eq!(
        config.data.unwrap()["SERVER_URL"],
        "https://agent.example.com"
    );
    let annotations = ingress.metadata.annotations.unwrap();
    assert_eq!(
        annotations["nginx.ingress.kubernetes.io/cors-allow-origin"],
        "https://agent.example.com"
    );

    // The HTTPRoute takes the same names when it has none of its own.
    let m = render!(
        "-f",
        &ci_values("multihost"),
        "--set",
        "gatewayApi.enabled=true",
        "--set",
        "gatewayApi.parentRefs[0].name=eg",
    );
    let route = m.raw("HTTPRoute", RELEASE).unwrap();
    assert_eq!(
        route["spec"]["hostnames"],
        serde_json::json!([
            "agent.example.com",
            "agents.example.com",
            "agent.example.eu"
        ])
    );
}

#[test]
fn operator_annotations_replace_the_charts_and_an_empty_value_removes_one() {
    let m = render!("-f", &ci_values("multihost"));
    let ingress: Ingress = m.one("Ingress", RELEASE);
    let annotations = ingress.metadata.annotations.unwrap();
    assert_eq!(
        annotations
            .get("cert-manager.io/issuer")
            .map(String::as_str),
        Some("letsencrypt-namespaced")
    );
    assert!(
        !annotations.contains_key("cert-manager.io/cluster-issuer"),
        "cert-manager refuses an Issuer and a ClusterIssuer together: {annotations:?}"
    );
    assert!(
        !annotations.contains_key("nginx.ingress.kubernetes.io/force-ssl-redirect"),
        "\"\" removes a chart annotation: {annotations:?}"
    );
    assert_eq!(
        annotations["nginx.ingress.kubernetes.io/ssl-redirect"],
        "true"
    );

    // The other way round: the operator's ClusterIssuer replaces a chart-set Issuer.
    let m = render!(
        "--set",
        "ingress.enabled=true",
        "--set",
        "ingress.certManager.issuer=chart-issuer",
        "--set",
        "ingress.annotations.cert-manager\\.io/cluster-issuer=mine",
    );
    let annotations = m
        .one::<Ingress>("Ingress", RELEASE)
        .metadata
        .annotations
        .unwrap();
    assert_eq!(annotations["cert-manager.io/cluster-issuer"], "mine");
    assert!(!annotations.contains_key("cert-manager.io/issuer"));
    // The other routes' Ingresses share the main one's certificate and never ask
    // cert-manager for another.
    for (route, ingress) in route_ingresses(&m) {
        if route != "default" {
            let annotations = annotations_of(&ingress);
            assert!(
                !annotations
                    .keys()
                    .any(|k| k.starts_with("cert-manager.io/")),
                "{route}: {annotations:?}"
            );
        }
    }

    // An operator value replaces the preset's value for the same key.
    let m = render!(
        "--set",
        "ingress.enabled=true",
        "--set-string",
        "ingress.annotations.nginx\\.ingress\\.kubernetes\\.io/proxy-read-timeout=7200",
    );
    let annotations = m
        .one::<Ingress>("Ingress", RELEASE)
        .metadata
        .annotations
        .unwrap();
    assert_eq!(
        annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"],
        "7200"
    );
}

#[test]
fn traefik_preset_uses_traefik_annotations_and_a_body_limit_middleware_for_inventories() {
    let m = render!("-f", &ci_values("traefik"));
    let middleware = m
        .raw("Middleware", "agent-server-inventory-body")
        .expect("a Middleware");
    assert_eq!(middleware["apiVersion"], "traefik.io/v1alpha1");
    assert_eq!(
        middleware["spec"]["buffering"]["maxRequestBodyBytes"],
        10 * 1024 * 1024
    );
    assert_eq!(m.raw_all("Middleware").count(), 1);
    for (route, ingress) in route_ingresses(&m) {
        let annotations = annotations_of(&ingress);
        assert_eq!(
            annotations["traefik.ingress.kubernetes.io/router.entrypoints"],
            "websecure"
        );
        assert_eq!(
            annotations["traefik.ingress.kubernetes.io/router.tls"],
            "true"
        );
        assert!(
            !annotations.keys().any(|k| k.starts_with("nginx.")),
            "{annotations:?}"
        );
        // Buffering holds whole responses back: only the inventory route, whose
        // answers are small documents, gets it; /ws, the event stream and binary
        // downloads must flow.
        assert_eq!(
            annotations
                .get("traefik.ingress.kubernetes.io/router.middlewares")
                .map(String::as_str),
            (route == "inventory")
                .then_some("agent-system-agent-server-inventory-body@kubernetescrd"),
            "{route}"
        );
        assert_eq!(
            ingress.spec.unwrap().ingress_class_name.as_deref(),
            Some("traefik")
        );
    }

    let m = render!(
        "-f",
        &ci_values("traefik"),
        "--set",
        "ingress.traefik.bodyLimits=false"
    );
    assert_eq!(m.raw_all("Middleware").count(), 0);
    assert!(route_ingresses(&m).iter().all(|(_, i)| {
        !annotations_of(i).contains_key("traefik.ingress.kubernetes.io/router.middlewares")
    }));
}

#[test]
fn gateway_route_gives_each_route_its_own_rule_and_timeouts() {
    let m = render!("-f", &ci_values("gateway"));
    assert_eq!(
        m.raw_all("Ingress").count(),
        0,
        "the route replaces the Ingress"
    );
    let route = m.raw("HTTPRoute", RELEASE).expect("an HTTPRoute");
    assert_eq!(route["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(route["spec"]["parentRefs"][0]["name"], "eg");
    let rules = route["spec"]["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), e2e::values::ROUTES.len());
    for (rule, (name, paths)) in rules.iter().zip(e2e::values::ROUTES) {
        let values: Vec<&str> = rule["matches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                assert_eq!(m["path"]["type"], "PathPrefix");
                m["path"]["value"].as_str().unwrap()
            })
            .collect();
        assert_eq!(values, paths, "{name}");
        assert_eq!(rule["backendRefs"][0]["name"], RELEASE);
        assert_eq!(rule["backendRefs"][0]["port"], 80);
        let expected = match name {
            // Envoy ends upgraded connections at the request timeout.
            "websocket" => serde_json::json!({"request": "0s"}),
            "binaries" => serde_json::json!({"request": "1h"}),
            "default" => serde_json::json!({"request": "60s", "backendRequest": "30s"}),
            _ => Value::Null,
        };
        assert_eq!(rule["timeouts"], expected, "{name}");
    }
}

// ---------------------------------------------------------------------------
// NetworkPolicy
// ---------------------------------------------------------------------------

#[test]
fn network_policy_admits_the_ingress_controller_and_prometheus_by_namespace_name() {
    let m = render!();
    let policy = m.server_policy();
    let spec = policy.spec.expect("a policy spec");
    assert_eq!(
        spec.policy_types,
        Some(vec!["Ingress".to_string(), "Egress".to_string()])
    );
    let rules = spec.ingress.expect("ingress rules");
    let admitted: Vec<String> = rules
        .iter()
        .flat_map(|r| r.from.iter().flatten())
        .flat_map(namespace_names)
        .collect();
    assert!(
        admitted.contains(&"ingress-nginx".to_string()),
        "{admitted:?}"
    );
    assert!(
        admitted.contains(&"monitoring".to_string()),
        "Prometheus may scrape: {admitted:?}"
    );
    for rule in &rules {
        let names: Vec<String> = rule
            .from
            .iter()
            .flatten()
            .flat_map(namespace_names)
            .collect();
        let port = if names.contains(&"monitoring".to_string()) {
            9090
        } else {
            8080
        };
        assert_eq!(ports(&rule.ports), [("TCP".to_string(), port)]);
        for peer in rule.from.iter().flatten() {
            if let Some(selector) = &peer.namespace_selector {
                let labels = selector.match_labels.clone().unwrap_or_default();
                assert!(
                    !labels.contains_key("name"),
                    "the design's `name` label is not set by Kubernetes"
                );
            }
        }
    }
}

/// The peers of the server policy's ingress rules that admit `port`.
fn admitted_on(policy: &NetworkPolicy, port: i32) -> Vec<NetworkPolicyPeer> {
    policy
        .spec
        .as_ref()
        .and_then(|s| s.ingress.clone())
        .into_iter()
        .flatten()
        .filter(|r| ports(&r.ports).contains(&("TCP".to_string(), port)))
        .flat_map(|r| r.from.unwrap_or_default())
        .collect()
}

fn cidrs(peers: &[NetworkPolicyPeer]) -> Vec<String> {
    peers
        .iter()
        .filter_map(|p| p.ip_block.as_ref().map(|b| b.cidr.clone()))
        .collect()
}

#[test]
fn load_balancer_service_is_complete_and_the_network_policy_admits_its_clients() {
    let m = render!("-f", &ci_values("loadbalancer"));
    let service: Service = m.one("Service", RELEASE);
    let spec = service.spec.unwrap();
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
    let ranges = vec!["203.0.113.0/24".to_string(), "198.51.100.0/24".to_string()];
    assert_eq!(spec.load_balancer_source_ranges, Some(ranges.clone()));
    // Local keeps client addresses, so the policy admits exactly those ranges.
    assert_eq!(cidrs(&admitted_on(&m.server_policy(), 8080)), ranges);
    // The metrics Service stays internal.
    let metrics: Service = m.one("Service", "agent-server-metrics");
    assert_eq!(metrics.spec.unwrap().type_.as_deref(), Some("ClusterIP"));

    // Cluster translates the source to node addresses: everyone, on the server port only.
    for args in [
        vec!["--set", "service.type=LoadBalancer"],
        vec![
            "--set",
            "service.type=NodePort",
            "--set",
            "service.nodePort=30080",
        ],
    ] {
        let m = match render(&args) {
            Some(m) => m,
            None => return,
        };
        let policy = m.server_policy();
        let admitted = cidrs(&admitted_on(&policy, 8080));
        assert_eq!(admitted, ["0.0.0.0/0", "::/0"], "{args:?}");
        assert!(cidrs(&admitted_on(&policy, 9090)).is_empty(), "{args:?}");
    }
    let m = render!(
        "--set",
        "service.type=NodePort",
        "--set",
        "service.nodePort=30080"
    );
    let service: Service = m.one("Service", RELEASE);
    assert_eq!(
        service.spec.unwrap().ports.unwrap()[0].node_port,
        Some(30080)
    );

    // A ClusterIP Service admits no addresses, and settings it cannot carry are refused.
    assert!(cidrs(&admitted_on(&render!().server_policy(), 8080)).is_empty());
    for args in [
        vec!["--set", "service.loadBalancerSourceRanges={10.0.0.0/8}"],
        vec!["--set", "service.externalTrafficPolicy=Local"],
    ] {
        let Some(error) = render_error(&args) else {
            return;
        };
        assert!(error.contains("service.type"), "{args:?}: {error}");
    }
}

#[test]
fn network_policy_admits_the_gateways_an_http_route_attaches_to() {
    let m = render!(
        "--set",
        "gatewayApi.enabled=true",
        "--set-json",
        r#"gatewayApi.parentRefs=[{"name":"shared","namespace":"gateways"}]"#,
        "--set",
        "networkPolicy.ingressNamespaces=null",
    );
    let admitted: Vec<String> = admitted_on(&m.server_policy(), 8080)
        .iter()
        .flat_map(namespace_names)
        .collect();
    assert_eq!(admitted, ["gateways"]);

    // A parentRef without a namespace is a Gateway of the release's namespace.
    let m = render!(
        "-f",
        &ci_values("gateway"),
        "--set-json",
        r#"gatewayApi.parentRefs=[{"name":"eg","sectionName":"https"}]"#,
    );
    let admitted: Vec<String> = admitted_on(&m.server_policy(), 8080)
        .iter()
        .flat_map(namespace_names)
        .collect();
    assert_eq!(admitted, ["envoy-gateway-system", NAMESPACE]);
}

#[test]
fn network_policy_allows_dns_over_udp_and_tcp_to_the_cluster_dns() {
    let m = render!();
    let policy = m.server_policy();
    let udp = egress_rule_for_port(&policy, "UDP", 53);
    let tcp = egress_rule_for_port(&policy, "TCP", 53);
    assert_eq!(udp, tcp, "one rule for both protocols");
    let peer = &udp.to.expect("a DNS destination")[0];
    assert_eq!(namespace_names(peer), ["kube-system"]);
    let pods = peer
        .pod_selector
        .as_ref()
        .and_then(|s| s.match_labels.clone())
        .unwrap_or_default();
    assert_eq!(pods.get("k8s-app").map(String::as_str), Some("kube-dns"));
}

#[test]
fn network_policy_allows_redis_and_postgresql_only_towards_the_bundled_pods() {
    let m = render!();
    let policy = m.server_policy();
    for (port, name) in [(6379, "redis"), (5432, "postgresql")] {
        let rule = egress_rule_for_port(&policy, "TCP", port);
        let peers = rule.to.expect("a destination");
        assert_eq!(peers.len(), 1);
        let labels = peers[0]
            .pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone())
            .expect("pod labels");
        assert_eq!(labels["app.kubernetes.io/name"], name);
        assert_eq!(labels["app.kubernetes.io/instance"], RELEASE);
        assert!(peers[0].namespace_selector.is_none(), "this namespace only");
    }

    for (name, port) in [
        ("agent-server-redis", 6379),
        ("agent-server-postgresql", 5432),
    ] {
        let policy: NetworkPolicy = m.one("NetworkPolicy", name);
        let spec = policy.spec.expect("a spec");
        let rules = spec.ingress.expect("ingress rules");
        assert_eq!(rules.len(), 1, "{name} answers the server only");
        assert_eq!(ports(&rules[0].ports), [("TCP".to_string(), port)]);
        let from = rules[0].from.as_ref().unwrap()[0]
            .pod_selector
            .clone()
            .unwrap()
            .match_labels
            .unwrap();
        assert_eq!(from["app.kubernetes.io/name"], "agent-server");
        assert_eq!(spec.egress, Some(vec![]), "{name} opens no connections");
    }
}

#[test]
fn network_policy_allows_https_outside_the_cluster_only_when_enabled() {
    let m = render!();
    let egress = m.server_policy().spec.unwrap().egress.unwrap();
    assert!(
        !egress
            .iter()
            .any(|r| ports(&r.ports).contains(&("TCP".to_string(), 443))),
        "no HTTPS egress by default"
    );

    let m = render!("--set", "networkPolicy.externalHttps.enabled=true");
    let rule = egress_rule_for_port(&m.server_policy(), "TCP", 443);
    let peers = rule.to.expect("a destination");
    let block = peers[0]
        .ip_block
        .as_ref()
        .expect("an ipBlock: podSelector {} would mean this namespace");
    assert_eq!(block.cidr, "0.0.0.0/0");
    assert!(
        block
            .except
            .as_ref()
            .unwrap()
            .contains(&"10.0.0.0/8".to_string())
    );
}

#[test]
fn network_policy_opens_the_database_ports_of_the_url_the_server_uses() {
    // A managed database on a non-default port: externalDatabase.port (5432)
    // is not what the server dials, the URL is.
    let m = render!(
        "--set",
        "postgresql.enabled=false",
        "--set-string",
        "externalDatabase.url=postgresql://agent@db.example.com:25060/agentdb?sslmode=require",
    );
    let rule = egress_rule_for_port(&m.server_policy(), "TCP", 25060);
    assert_eq!(ports(&rule.ports), [("TCP".to_string(), 25060)]);

    // Every host of a multi-host URL, libpq's 5432 where a host names no port.
    let m = render!(
        "--set",
        "postgresql.enabled=false",
        "--set-string",
        "externalDatabase.url=postgresql://agent@pg-a:6000\\,pg-b/agentdb",
    );
    let rule = egress_rule_for_port(&m.server_policy(), "TCP", 6000);
    assert_eq!(
        ports(&rule.ports),
        [("TCP".to_string(), 6000), ("TCP".to_string(), 5432)]
    );

    // A `port=` parameter wins over the authority, as in libpq.
    let m = render!(
        "--set",
        "postgresql.enabled=false",
        "--set-string",
        "externalDatabase.url=postgresql:///agentdb?host=/run/pg&port=6432",
    );
    egress_rule_for_port(&m.server_policy(), "TCP", 6432);

    // SQLite opens no network connection at all.
    let m = render!(
        "--set",
        "replicaCount=1",
        "--set",
        "redis.enabled=false",
        "--set",
        "postgresql.enabled=false",
        "--set",
        "externalDatabase.url=sqlite:///storage/agent.db",
    );
    let egress = m.server_policy().spec.unwrap().egress.unwrap();
    assert!(
        egress
            .iter()
            .all(|r| ports(&r.ports).iter().all(|(_, p)| *p == 53)),
        "only DNS: {egress:?}"
    );
}

#[test]
fn network_policy_follows_external_services_to_their_ports() {
    let m = render!("-f", &ci_values("external"));
    let policy = m.server_policy();
    let redis = egress_rule_for_port(&policy, "TCP", 6380);
    assert_eq!(
        redis.to.unwrap()[0].ip_block.as_ref().unwrap().cidr,
        "10.21.0.0/16"
    );
    let database = egress_rule_for_port(&policy, "TCP", 5432);
    assert_eq!(
        database.to.unwrap()[0].ip_block.as_ref().unwrap().cidr,
        "10.20.0.0/16"
    );
    assert!(m.raw("NetworkPolicy", "agent-server-redis").is_none());
}

// ---------------------------------------------------------------------------
// Autoscaling and disruption
// ---------------------------------------------------------------------------

#[test]
fn hpa_scales_two_to_ten_pods_on_cpu_70_and_memory_80_with_the_design_behaviour() {
    let m = render!("-f", &ci_values("seed"));
    let hpa: HorizontalPodAutoscaler = m.one("HorizontalPodAutoscaler", RELEASE);
    let spec = hpa.spec;
    assert_eq!(spec.scale_target_ref.kind, "Deployment");
    assert_eq!(spec.scale_target_ref.name, RELEASE);
    assert_eq!(spec.min_replicas, Some(2));
    assert_eq!(spec.max_replicas, 10);
    let targets: BTreeMap<String, i32> = spec
        .metrics
        .unwrap()
        .into_iter()
        .map(|metric| {
            let resource = metric.resource.expect("resource metrics");
            (
                resource.name,
                resource
                    .target
                    .average_utilization
                    .expect("a utilisation target"),
            )
        })
        .collect();
    assert_eq!(
        targets,
        BTreeMap::from([("cpu".into(), 70), ("memory".into(), 80)])
    );

    let behavior = spec.behavior.expect("a scaling behaviour");
    let down = behavior.scale_down.expect("scale-down rules");
    assert_eq!(down.stabilization_window_seconds, Some(300));
    let policy = &down.policies.unwrap()[0];
    assert_eq!(
        (policy.type_.as_str(), policy.value, policy.period_seconds),
        ("Percent", 50, 60)
    );
    let up = behavior.scale_up.expect("scale-up rules");
    assert_eq!(up.stabilization_window_seconds, Some(60));
    let policy = &up.policies.unwrap()[0];
    assert_eq!(
        (policy.type_.as_str(), policy.value, policy.period_seconds),
        ("Percent", 100, 30)
    );

    assert_eq!(
        m.deployment().spec.replicas,
        None,
        "with an HPA the Deployment leaves replicas alone, or every upgrade would reset them"
    );
}

#[test]
fn disruption_budget_lets_one_server_pod_go_at_a_time() {
    let m = render!();
    let pdb: k8s_openapi::api::policy::v1::PodDisruptionBudget =
        m.one("PodDisruptionBudget", RELEASE);
    let spec = pdb.spec.expect("a PDB spec");
    assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
    let selector = spec
        .selector
        .and_then(|s| s.match_labels)
        .expect("a selector");
    assert_eq!(selector["app.kubernetes.io/name"], "agent-server");
}

#[test]
fn a_disruption_budget_that_could_never_allow_an_eviction_is_refused() {
    for args in [
        vec!["--set", "replicaCount=1", "--set", "pdb.minAvailable=1"],
        vec!["--set", "pdb.minAvailable=2"],
        vec!["--set", "pdb.minAvailable=100%"],
        vec!["--set", "replicaCount=1", "--set", "pdb.minAvailable=50%"],
        vec!["--set", "pdb.maxUnavailable=0"],
        vec!["--set-string", "pdb.maxUnavailable=0%"],
        vec![
            "--set",
            "autoscaling.enabled=true",
            "--set",
            "autoscaling.minReplicas=1",
            "--set",
            "pdb.minAvailable=1",
        ],
    ] {
        let Some(error) = render_error(&args) else {
            return;
        };
        assert!(
            error.contains("kubectl drain") && error.contains("pdb."),
            "{args:?}: {error}"
        );
    }

    // The safe combinations render: one pod may always go.
    for args in [
        vec!["--set", "replicaCount=1"],
        vec!["--set", "replicaCount=3", "--set", "pdb.minAvailable=2"],
        vec!["--set", "pdb.minAvailable=50%"],
        vec![
            "--set",
            "autoscaling.enabled=true",
            "--set",
            "autoscaling.minReplicas=3",
            "--set",
            "pdb.minAvailable=2",
        ],
    ] {
        let m = match render(&args) {
            Some(m) => m,
            None => return,
        };
        assert!(m.raw("PodDisruptionBudget", RELEASE).is_some(), "{args:?}");
    }
}

#[test]
fn replica_count_zero_parks_the_server_declaratively() {
    let m = render!("-f", &ci_values("parked"));
    assert_eq!(m.deployment().spec.replicas, Some(0));
    assert!(m.raw("HorizontalPodAutoscaler", RELEASE).is_none());
    // Services, routes and the databases stay, so agents find them again on unparking.
    assert!(m.raw("Service", RELEASE).is_some());
    assert!(m.raw("StatefulSet", "agent-server-postgresql").is_some());

    let Some(error) = render_error(&[
        "--set",
        "replicaCount=0",
        "--set",
        "autoscaling.enabled=true",
    ]) else {
        return;
    };
    assert!(error.contains("autoscaling.enabled=false"), "{error}");
}

#[test]
fn limits_alone_never_render_a_request_above_its_limit() {
    // Helm merges the default requests (500m, 512Mi) under these limits.
    let Some(error) = render_error(&[
        "--set",
        "resources.limits.cpu=250m",
        "--set",
        "resources.limits.memory=256Mi",
    ]) else {
        return;
    };
    assert!(
        error.contains("resources.requests.cpu (500m) exceeds resources.limits.cpu (250m)"),
        "{error}"
    );
    assert!(
        error.contains("resources.requests.memory (512Mi)"),
        "{error}"
    );
    for (args, needle) in [
        (
            vec!["--set", "redis.resources.limits.memory=128Mi"],
            "redis.resources.requests.memory",
        ),
        (
            vec!["--set", "postgresql.resources.limits.cpu=0.25"],
            "postgresql.resources.requests.cpu",
        ),
    ] {
        let Some(error) = render_error(&args) else {
            return;
        };
        assert!(error.contains(needle), "{args:?}: {error}");
    }

    // The supported way: `requests: null` lets Kubernetes set requests to the limits.
    let m = render!("-f", &ci_values("limits-only"));
    let resources = m.server().resources.expect("resources");
    assert!(resources.requests.is_none(), "{resources:?}");
    let limits = resources.limits.expect("limits");
    assert_eq!(limits["cpu"].0, "250m");
    assert_eq!(limits["memory"].0, "256Mi");

    // Equal request and limit, in different notations, are fine.
    render!(
        "--set",
        "resources.limits.memory=1Gi",
        "--set-string",
        "resources.requests.memory=1073741824",
        "--set",
        "resources.limits.cpu=1",
        "--set",
        "resources.requests.cpu=1000m",
    );
}

#[test]
fn several_replicas_without_redis_are_refused() {
    let Some(error) = render_error(&["--set", "redis.enabled=false", "--set", "replicaCount=2"])
    else {
        return;
    };
    assert!(error.contains("needs Redis"), "{error}");
}

// ---------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------

#[test]
fn generated_secret_key_is_random_long_and_never_from_values() {
    let values = std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap();
    assert!(
        values.contains("secretKey: \"\""),
        "values.yaml ships no secret key"
    );

    let first = render!();
    let second = render!();
    let a = &first.secret_data(RELEASE)["SECRET_KEY"];
    let b = &second.secret_data(RELEASE)["SECRET_KEY"];
    assert!(
        a.len() >= 32,
        "SECRET_KEY has {} bytes; the server needs 32",
        a.len()
    );
    assert_ne!(a, b, "each install generates its own key");
    assert_eq!(first.secret_data(RELEASE)["JWT_ALGORITHM"], "HS256");
}

#[test]
fn gitops_renders_are_identical_and_hold_no_generated_secret() {
    let Some(helm) = helm_or_skip() else {
        return;
    };
    let args = ["-f", &ci_values("gitops")];
    let first = helm_template(&helm, &args);
    let second = helm_template(&helm, &args);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(
        first.stdout, second.stdout,
        "two renders differ: a sync would change what the cluster holds"
    );
    let m = Manifests::parse(&String::from_utf8_lossy(&first.stdout));
    assert!(
        m.raw_all("Secret").next().is_none(),
        "no Secret with made-up values: {:?}",
        m.kinds()
    );
    let server = m.server();
    assert_eq!(
        secret_ref(&server, "PGPASSWORD"),
        Some(("agent-server-pg".into(), "password".into()))
    );
    assert_eq!(
        secret_ref(&server, "REDIS_PASSWORD"),
        Some(("agent-server-cache".into(), "password".into()))
    );
    let redis: StatefulSet = m.one("StatefulSet", "agent-server-redis");
    let redis_password = env_var(
        &redis.spec.template.spec.unwrap().containers[0],
        "REDIS_PASSWORD",
    )
    .and_then(|e| e.value_from.clone())
    .and_then(|v| v.secret_key_ref)
    .expect("Redis reads the same Secret");
    assert_eq!(redis_password.name, "agent-server-cache");
}

#[test]
fn secrets_reach_the_server_as_files_when_the_operator_chooses_files() {
    let m = render!("-f", &ci_values("files"));
    let server = m.server();
    // The operator's Vault file, as given; the chart neither generates nor stores it.
    assert_eq!(
        env_value(&server, "SECRET_KEY_FILE").as_deref(),
        Some("/vault/secrets/secret-key")
    );
    assert!(!m.secret_data(RELEASE).contains_key("SECRET_KEY"));
    // The chart's own secrets, mounted as files: nothing secret in the environment.
    for (variable, file) in [
        ("ADMIN_PASSWORD_FILE", "admin-password"),
        ("REDIS_PASSWORD_FILE", "redis-password"),
    ] {
        assert_eq!(
            env_value(&server, variable),
            Some(format!("/etc/agent-server/secrets/{file}"))
        );
    }
    for variable in [
        "SECRET_KEY",
        "ADMIN_PASSWORD",
        "REDIS_PASSWORD",
        "DATABASE_URL_FILE",
    ] {
        assert!(env_var(&server, variable).is_none(), "{variable} is set");
    }
    assert!(
        server
            .env_from
            .iter()
            .flatten()
            .all(|source| source.secret_ref.is_none()),
        "no Secret is read into the environment"
    );
    assert_eq!(
        mount_path(&server, "secrets").as_deref(),
        Some("/etc/agent-server/secrets")
    );
    let volume = m
        .pod_spec()
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "secrets")
        .unwrap();
    let projected = volume.projected.unwrap();
    assert_eq!(projected.default_mode, Some(0o440));
    let files: Vec<(String, String, String)> = projected
        .sources
        .unwrap()
        .into_iter()
        .map(|source| {
            let secret = source.secret.unwrap();
            let item = &secret.items.as_ref().unwrap()[0];
            (secret.name.clone(), item.key.clone(), item.path.clone())
        })
        .collect();
    assert_eq!(
        files,
        [
            (
                RELEASE.to_string(),
                "ADMIN_PASSWORD".to_string(),
                "admin-password".to_string()
            ),
            (
                RELEASE.to_string(),
                "REDIS_PASSWORD".to_string(),
                "redis-password".to_string()
            ),
        ]
    );
    // libpq reads no password file of that form: PGPASSWORD stays a reference.
    assert!(secret_ref(&server, "PGPASSWORD").is_some());

    // A complete URL from a file replaces every database setting.
    let m = render!(
        "--set",
        "postgresql.enabled=false",
        "--set",
        "secretFiles.databaseUrl=/vault/secrets/database-url",
        "--set",
        "externalDatabase.port=25060",
    );
    let server = m.server();
    assert_eq!(
        env_value(&server, "DATABASE_URL_FILE").as_deref(),
        Some("/vault/secrets/database-url")
    );
    assert!(env_var(&server, "DATABASE_URL").is_none());
    assert!(env_var(&server, "PGPASSWORD").is_none());
    egress_rule_for_port(&m.server_policy(), "TCP", 25060);
}

#[test]
fn bundled_redis_and_postgresql_take_their_own_pod_labels_annotations_and_egress() {
    let m = render!("-f", &ci_values("files"));
    let pod_meta = |name: &str| {
        let statefulset: StatefulSet = m.one("StatefulSet", name);
        statefulset.spec.template.metadata.unwrap()
    };
    let postgresql = pod_meta("agent-server-postgresql");
    assert_eq!(
        postgresql.labels.unwrap()["sidecar.istio.io/inject"],
        "false"
    );
    assert_eq!(
        postgresql.annotations.unwrap()["vault.hashicorp.com/agent-inject"],
        "false"
    );
    let redis = pod_meta("agent-server-redis");
    assert_eq!(
        redis.labels.clone().unwrap()["sidecar.istio.io/inject"],
        "true"
    );
    assert_eq!(
        redis.labels.unwrap()["app.kubernetes.io/name"],
        "redis",
        "extra labels never replace the selector's"
    );

    let policy: NetworkPolicy = m.one("NetworkPolicy", "agent-server-redis");
    let rule = egress_rule_for_port(&policy, "TCP", 15012);
    assert_eq!(namespace_names(&rule.to.unwrap()[0]), ["istio-system"]);
    let policy: NetworkPolicy = m.one("NetworkPolicy", "agent-server-postgresql");
    assert_eq!(
        policy.spec.unwrap().egress,
        Some(vec![]),
        "PostgreSQL still opens nothing"
    );
}

#[test]
fn a_render_without_a_cluster_refuses_to_make_up_secrets_and_names_what_to_give() {
    // `helm template` and Argo CD: `lookup` finds nothing, so `auto` refuses.
    let Some(error) = render_error(&["--set", "secrets.generate=auto"]) else {
        return;
    };
    assert!(error.contains("rendered without a cluster"), "{error}");
    for named in [
        "auth.existingSecret",
        "postgresql.auth.existingSecret",
        "redis.auth.existingSecret",
        "secrets.generate=true",
    ] {
        assert!(error.contains(named), "{named}: {error}");
    }

    // Nothing to make up: `auto` renders without a cluster too.
    render!("--set", "secrets.generate=auto", "-f", &ci_values("gitops"),);

    // `false` names exactly what is missing, and leaves sign-in off without a password.
    let Some(error) = render_error(&[
        "--set",
        "secrets.generate=false",
        "--set",
        "postgresql.auth.existingSecret=pg",
        "--set",
        "redis.auth.existingSecret=cache",
    ]) else {
        return;
    };
    assert!(error.contains("SECRET_KEY"), "{error}");
    assert!(!error.contains("PostgreSQL password"), "{error}");
    let m = render!(
        "--set",
        "secrets.generate=false",
        "--set",
        "auth.secretKey=0123456789abcdef0123456789abcdef-given",
        "--set",
        "postgresql.auth.existingSecret=pg",
        "--set",
        "redis.auth.existingSecret=cache",
    );
    let secret = m.secret_data(RELEASE);
    assert_eq!(
        secret["SECRET_KEY"],
        "0123456789abcdef0123456789abcdef-given"
    );
    assert!(!secret.contains_key("ADMIN_PASSWORD"), "{secret:?}");
}

#[test]
fn bundled_postgresql_password_reaches_libpq_as_pgpassword_never_in_the_url() {
    let m = render!();
    let password = m.secret_data("agent-server-postgresql")["password"].clone();
    assert!(password.len() >= 32 && password.chars().all(|c| c.is_ascii_alphanumeric()));
    let server = m.server();
    assert_eq!(
        env_value(&server, "DATABASE_URL").as_deref(),
        Some("postgresql://postgres@agent-server-postgresql:5432/agentdb")
    );
    assert_eq!(
        secret_ref(&server, "PGPASSWORD"),
        Some(("agent-server-postgresql".into(), "password".into())),
        "libpq reads the password from PGPASSWORD"
    );

    let statefulset: StatefulSet = m.one("StatefulSet", "agent-server-postgresql");
    let container = &statefulset.spec.template.spec.as_ref().unwrap().containers[0];
    let reference = env_var(container, "POSTGRES_PASSWORD")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.secret_key_ref.as_ref())
        .expect("the password comes from the Secret");
    assert_eq!(
        (reference.name.as_str(), reference.key.as_str()),
        ("agent-server-postgresql", "password")
    );

    let secret: Secret = m.one("Secret", "agent-server-postgresql");
    let annotations = secret.metadata.annotations.unwrap_or_default();
    assert_eq!(
        annotations
            .get("helm.sh/resource-policy")
            .map(String::as_str),
        Some("keep"),
        "the password outlives an uninstall, like the data volume does"
    );
    let claims = statefulset
        .spec
        .volume_claim_templates
        .expect("a volumeClaimTemplate");
    assert_eq!(claims[0].metadata.name.as_deref(), Some("data"));
}

#[test]
fn existing_secret_replaces_the_chart_secret_for_the_server_and_the_test_pod() {
    let m = render!("--set", "auth.existingSecret=my-agent-secret");
    assert!(
        m.raw("Secret", RELEASE).is_none(),
        "no chart Secret: {:?}",
        m.kinds()
    );
    let server = m.server();
    let source = server
        .env_from
        .iter()
        .flatten()
        .find_map(|s| s.secret_ref.as_ref())
        .expect("a Secret source");
    assert_eq!(source.name, "my-agent-secret");

    // The bundled PostgreSQL's generated password still reaches the server,
    // from its own Secret, outside the URL.
    assert_eq!(
        secret_ref(&server, "PGPASSWORD"),
        Some(("agent-server-postgresql".into(), "password".into()))
    );
    assert_eq!(
        env_value(&server, "DATABASE_URL").as_deref(),
        Some("postgresql://postgres@agent-server-postgresql:5432/agentdb")
    );

    let test_pod: k8s_openapi::api::core::v1::Pod = m.one("Pod", "agent-server-test");
    let test_secret = test_pod.spec.unwrap().containers[0]
        .env_from
        .iter()
        .flatten()
        .find_map(|s| s.secret_ref.clone())
        .expect("the test pod reads the same Secret");
    assert_eq!(test_secret.name, "my-agent-secret");
}

#[test]
fn external_services_take_their_passwords_from_existing_secrets() {
    let m = render!("-f", &ci_values("external"));
    assert!(m.raw("StatefulSet", "agent-server-redis").is_none());
    assert!(m.raw("StatefulSet", "agent-server-postgresql").is_none());
    let secret = m.secret_data(RELEASE);
    assert!(
        !secret.contains_key("DATABASE_URL"),
        "the URL is composed in the pod"
    );
    assert!(
        !secret.contains_key("REDIS_PASSWORD"),
        "the password comes from its own Secret"
    );

    let server = m.server();
    let reference = |name: &str| {
        let r = env_var(&server, name)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.secret_key_ref.as_ref())
            .unwrap_or_else(|| panic!("{name} from a Secret"));
        (r.name.clone(), r.key.clone())
    };
    assert_eq!(
        reference("REDIS_PASSWORD"),
        ("agent-server-redis".into(), "redis-password".into())
    );
    assert_eq!(
        reference("PGPASSWORD"),
        ("agent-server-db".into(), "db-password".into())
    );
    assert_eq!(
        env_value(&server, "DATABASE_URL").as_deref(),
        Some("postgresql://agent@pg.example.internal:5432/agentdb?sslmode=verify-full")
    );
    let config: ConfigMap = m.one("ConfigMap", RELEASE);
    let data = config.data.unwrap();
    assert_eq!(data["REDIS_HOST"], "redis.example.internal");
    assert_eq!(data["REDIS_PORT"], "6380");
}

/// The files a projected volume of the server pod holds: path -> (source kind, name, key).
fn projected_files(pod: &PodSpec, volume: &str) -> BTreeMap<String, (String, String, String)> {
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == volume)
        .unwrap_or_else(|| panic!("a volume {volume}"));
    let projected = volume.projected.as_ref().expect("a projected volume");
    assert_eq!(
        projected.default_mode,
        Some(0o440),
        "libpq refuses keys readable by others"
    );
    let mut files = BTreeMap::new();
    for source in projected.sources.iter().flatten() {
        if let Some(secret) = &source.secret {
            for item in secret.items.iter().flatten() {
                files.insert(
                    item.path.clone(),
                    ("Secret".into(), secret.name.clone(), item.key.clone()),
                );
            }
        }
        if let Some(config_map) = &source.config_map {
            for item in config_map.items.iter().flatten() {
                files.insert(
                    item.path.clone(),
                    (
                        "ConfigMap".into(),
                        config_map.name.clone(),
                        item.key.clone(),
                    ),
                );
            }
        }
    }
    files
}

fn mount_path(container: &Container, volume: &str) -> Option<String> {
    container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume)
        .map(|m| m.mount_path.clone())
}

#[test]
fn external_postgresql_verifies_the_server_with_a_ca_and_presents_a_client_certificate() {
    let m = render!("-f", &ci_values("external"));
    let server = m.server();
    let dir = mount_path(&server, "postgresql-tls").expect("the TLS files are mounted");
    assert_eq!(dir, "/etc/agent-server/postgresql-tls");
    for (variable, file) in [
        ("PGSSLROOTCERT", "ca.crt"),
        ("PGSSLCERT", "client.crt"),
        ("PGSSLKEY", "client.key"),
    ] {
        assert_eq!(
            env_value(&server, variable),
            Some(format!("{dir}/{file}")),
            "libpq reads {variable}"
        );
    }
    let file = |kind: &str, name: &str, key: &str| -> (String, String, String) {
        (kind.into(), name.into(), key.into())
    };
    assert_eq!(
        projected_files(&m.pod_spec(), "postgresql-tls"),
        BTreeMap::from([
            ("ca.crt".to_string(), file("ConfigMap", "pg-ca", "ca.pem")),
            (
                "client.crt".to_string(),
                file("Secret", "agent-server-db-client", "tls.crt")
            ),
            (
                "client.key".to_string(),
                file("Secret", "agent-server-db-client", "tls.key")
            ),
        ])
    );
    assert!(
        env_value(&server, "DATABASE_URL")
            .unwrap()
            .ends_with("?sslmode=verify-full")
    );

    // A CA from a Secret instead; nothing is mounted for the bundled database.
    let m = render!(
        "--set",
        "postgresql.enabled=false",
        "--set",
        "externalDatabase.host=db",
        "--set",
        "externalDatabase.tls.ca.secretName=db-ca",
    );
    assert_eq!(
        projected_files(&m.pod_spec(), "postgresql-tls"),
        BTreeMap::from([("ca.crt".to_string(), file("Secret", "db-ca", "ca.crt"))])
    );
    assert!(env_var(&m.server(), "PGSSLCERT").is_none());
    assert!(mount_path(&render!().server(), "postgresql-tls").is_none());

    let Some(error) = render_error(&[
        "--set",
        "postgresql.enabled=false",
        "--set",
        "externalDatabase.host=db",
        "--set",
        "externalDatabase.tls.ca.secretName=a",
        "--set",
        "externalDatabase.tls.ca.configMapName=b",
    ]) else {
        return;
    };
    assert!(error.contains("not both"), "{error}");
}

#[test]
fn external_redis_speaks_tls_with_a_private_ca_as_an_acl_user() {
    let m = render!("-f", &ci_values("external"));
    let config: ConfigMap = m.one("ConfigMap", RELEASE);
    let data = config.data.unwrap();
    assert_eq!(data["REDIS_TLS"], "true");
    assert_eq!(data["REDIS_USERNAME"], "agent-server");
    assert_eq!(data["REDIS_PORT"], "6380");
    let server = m.server();
    assert_eq!(
        env_value(&server, "REDIS_TLS_CA_FILE").as_deref(),
        Some("/etc/agent-server/redis-tls/ca.crt")
    );
    assert_eq!(
        projected_files(&m.pod_spec(), "redis-tls")["ca.crt"],
        ("Secret".into(), "redis-ca".into(), "ca.crt".into())
    );
    assert_eq!(
        secret_ref(&server, "REDIS_PASSWORD"),
        Some(("agent-server-redis".into(), "redis-password".into()))
    );

    // TLS with the image's system CAs: no file, no variable.
    let m = render!(
        "--set",
        "redis.enabled=false",
        "--set",
        "externalRedis.host=cache.example.com",
        "--set",
        "externalRedis.tls.enabled=true",
    );
    let config: ConfigMap = m.one("ConfigMap", RELEASE);
    assert_eq!(config.data.unwrap()["REDIS_TLS"], "true");
    assert!(env_var(&m.server(), "REDIS_TLS_CA_FILE").is_none());

    // The bundled Redis is plain TCP inside the namespace.
    let config: ConfigMap = render!().one("ConfigMap", RELEASE);
    assert!(!config.data.unwrap().contains_key("REDIS_TLS"));
}

#[test]
fn external_database_url_in_a_secret_is_used_as_is() {
    let m = render!(
        "--set",
        "postgresql.enabled=false",
        "--set",
        "externalDatabase.existingSecret=db",
        "--set",
        "externalDatabase.existingSecretUrlKey=url",
    );
    let server = m.server();
    let reference = env_var(&server, "DATABASE_URL")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.secret_key_ref.as_ref())
        .expect("DATABASE_URL from the Secret");
    assert_eq!(
        (reference.name.as_str(), reference.key.as_str()),
        ("db", "url")
    );
    assert!(env_var(&server, "PGPASSWORD").is_none());
}

#[test]
fn a_password_with_url_reserved_characters_never_enters_the_url() {
    // A provider-generated password: `#`, `?`, `%` and `:` all mean something in a URL.
    const PASSWORD: &str = "Vx7#kQ9?mz%2Lr:8";
    let m = render!(
        "--set",
        "postgresql.enabled=false",
        "--set",
        "externalDatabase.host=pg.example.internal",
        "--set-string",
        &format!("externalDatabase.password={PASSWORD}"),
    );
    let server = m.server();
    let url = env_value(&server, "DATABASE_URL").expect("DATABASE_URL");
    assert_eq!(url, "postgresql://agent@pg.example.internal:5432/agentdb");
    assert_eq!(
        secret_ref(&server, "PGPASSWORD"),
        Some((RELEASE.into(), "PGPASSWORD".into()))
    );
    assert_eq!(
        m.secret_data(RELEASE)["PGPASSWORD"],
        PASSWORD,
        "stored as given"
    );
    for doc in &m.docs {
        if doc["kind"] != "Secret" {
            assert!(
                !doc.to_string().contains(PASSWORD),
                "the password appears outside its Secret, in {}",
                doc["kind"]
            );
        }
    }

    // The bundled PostgreSQL takes any password too: it is no longer placed in a URL.
    let m = render!(
        "--set-string",
        &format!("postgresql.auth.password={PASSWORD}")
    );
    assert_eq!(
        m.secret_data("agent-server-postgresql")["password"],
        PASSWORD
    );
    assert!(
        !env_value(&m.server(), "DATABASE_URL")
            .unwrap()
            .contains('#')
    );
}

// ---------------------------------------------------------------------------
// Bundled Redis and PostgreSQL
// ---------------------------------------------------------------------------

#[test]
fn bundled_redis_never_evicts_session_keys() {
    let m = render!();
    let config: ConfigMap = m.one("ConfigMap", "agent-server-redis");
    let conf = &config.data.expect("data")["redis.conf"];
    assert!(
        conf.lines().any(|l| l == "maxmemory-policy noeviction"),
        "{conf}"
    );
    assert!(!conf.contains("allkeys"), "{conf}");
    assert!(
        !conf.contains("requirepass"),
        "the password is never in the ConfigMap"
    );

    let Some(error) = render_error(&["--set", "redis.maxmemoryPolicy=allkeys-lru"]) else {
        return;
    };
    assert!(error.contains("maxmemoryPolicy"), "{error}");
}

#[test]
fn bundled_redis_and_postgresql_run_hardened_as_uid_999_from_official_images() {
    let m = render!();
    for (name, image) in [
        ("agent-server-redis", "docker.io/library/redis:"),
        ("agent-server-postgresql", "docker.io/library/postgres:"),
    ] {
        let statefulset: StatefulSet = m.one("StatefulSet", name);
        let pod = statefulset.spec.template.spec.unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false), "{name}");
        let pod_context = pod.security_context.expect("a pod security context");
        assert_eq!(pod_context.run_as_user, Some(999), "{name}");
        assert_eq!(pod_context.fs_group, Some(999), "{name}");
        let container = &pod.containers[0];
        assert!(
            container.image.as_deref().unwrap().starts_with(image),
            "{name}: {:?}",
            container.image
        );
        let context = container
            .security_context
            .clone()
            .expect("a container security context");
        assert_hardened(&context, name);
        assert!(
            container.liveness_probe.is_some() && container.readiness_probe.is_some(),
            "{name} is probed"
        );
    }
}

// ---------------------------------------------------------------------------
// helm test, namespace, and the design as a whole
// ---------------------------------------------------------------------------

#[test]
fn helm_test_pod_runs_the_server_check_through_the_service() {
    let m = render!();
    let pod: k8s_openapi::api::core::v1::Pod = m.one("Pod", "agent-server-test");
    let annotations = pod.metadata.annotations.clone().unwrap();
    assert_eq!(annotations["helm.sh/hook"], "test");
    let labels = pod.metadata.labels.clone().unwrap();
    assert_ne!(
        labels["app.kubernetes.io/name"], "agent-server",
        "the Service must not select the test pod"
    );
    let spec = pod.spec.unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let container = &spec.containers[0];
    assert_eq!(
        container.image,
        m.server().image,
        "the server image, so nothing else is pulled"
    );
    assert_eq!(
        container.args.clone().unwrap(),
        ["check", "--url", "http://agent-server.agent-system.svc:80"]
    );
    assert!(
        container.command.is_none(),
        "the image's entrypoint is the server binary"
    );
    assert_hardened(container.security_context.as_ref().unwrap(), "test pod");
}

#[test]
fn namespace_is_created_only_on_request_and_survives_uninstall() {
    let m = render!();
    assert!(m.raw_all("Namespace").next().is_none());
    let m = render!("--set", "namespace.create=true");
    let namespace = m
        .raw("Namespace", NAMESPACE)
        .expect("the release namespace");
    assert_eq!(
        namespace["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
}

#[test]
fn the_design_values_render_every_resource_of_the_design() {
    let m = render!("-f", &ci_values("seed"));
    for (kind, name) in [
        ("Namespace", NAMESPACE),
        ("ConfigMap", RELEASE),
        ("Secret", RELEASE),
        ("PersistentVolumeClaim", "agent-server-binaries"),
        ("Deployment", RELEASE),
        ("Service", RELEASE),
        ("Ingress", RELEASE),
        ("StatefulSet", "agent-server-redis"),
        ("Service", "agent-server-redis"),
        ("StatefulSet", "agent-server-postgresql"),
        ("Service", "agent-server-postgresql"),
        ("Secret", "agent-server-postgresql"),
        ("HorizontalPodAutoscaler", RELEASE),
        ("NetworkPolicy", RELEASE),
        ("ServiceMonitor", RELEASE),
    ] {
        assert!(
            m.raw(kind, name).is_some(),
            "{kind}/{name} missing; rendered: {:?}",
            m.kinds()
        );
    }
    let monitor = m.raw("ServiceMonitor", RELEASE).unwrap();
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "30s");
    let image = m.server().image.unwrap();
    assert_eq!(image, "your-registry/agent-server:v1.0.0");

    // Every object parses as its Kubernetes type.
    let _: Vec<Deployment> = m.all("Deployment");
    let _: Vec<StatefulSet> = m.all("StatefulSet");
    let _: Vec<Service> = m.all("Service");
    let _: Vec<NetworkPolicy> = m.all("NetworkPolicy");
    let _: Vec<Secret> = m.all("Secret");
}

#[test]
fn values_schema_refuses_unknown_keys_and_impossible_replica_counts() {
    for (args, needle) in [
        (vec!["--set", "replicas=3"], "replicas"),
        (vec!["--set", "replicaCount=-1"], "replicaCount"),
        (vec!["--set", "ingress.className=Not_Valid"], "className"),
        (vec!["--set-string", "service.port=eighty"], "port"),
    ] {
        let Some(error) = render_error(&args) else {
            return;
        };
        assert!(error.contains(needle), "{args:?}: {error}");
    }
}
