//! Cluster mode against the Redis that managed services and highly available setups
//! offer: a TLS-only redis-server with an ACL user (certificates from a CA the test makes),
//! and a Sentinel set (a master, a replica, three sentinels) failing over under a
//! connected fleet. Every server is a real process on a free port, owned by the test.

use std::path::Path;
use std::time::{Duration, Instant};

use agent_server::auth::{Role, Tokens};
use agent_server::config::Secret;
use serde_json::json;
use tokio::process::{Child, Command};

use crate::certs::TestCa;
use crate::helpers::*;
use crate::procs::*;

const REDIS_USER: &str = "agent-server";
const INSPECTOR: &str = "inspector";
const REDIS_PASSWORD: &str = "data-pass-Vx7#kQ9";
const SENTINEL_PASSWORD: &str = "sentinel-pass-3Lr";

fn redis_process(args: &[String]) -> Child {
    spawn_redis(Command::new("redis-server"), args)
}

/// Runs one command on a Redis node or sentinel, over TLS when `ca` is given.
async fn query(
    port: u16,
    ca: Option<&Path>,
    user: Option<&str>,
    password: Option<&str>,
    args: &[&str],
) -> redis::RedisResult<redis::Value> {
    let addr = match ca {
        Some(_) => redis::ConnectionAddr::TcpTls {
            host: "127.0.0.1".into(),
            port,
            insecure: false,
            tls_params: None,
        },
        None => redis::ConnectionAddr::Tcp("127.0.0.1".into(), port),
    };
    let info = redis::IntoConnectionInfo::into_connection_info(addr)?;
    let mut settings = info.redis_settings().clone();
    if let Some(user) = user {
        settings = settings.set_username(user);
    }
    if let Some(password) = password {
        settings = settings.set_password(password);
    }
    let info = info.set_redis_settings(settings);
    let client = match ca {
        Some(ca) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(ca).unwrap()),
                },
            )?
        }
        None => redis::Client::open(info)?,
    };
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await
}

/// Replicas of the server sharing one PostgreSQL database, configured for a given Redis.
struct Replicas {
    dir: tempfile::TempDir,
    db_url: String,
    redis_env: Vec<(String, String)>,
    pods: Vec<ServerProcess>,
    tokens: Tokens,
    admin: String,
    http: reqwest::Client,
    _db: TestDb,
}

impl Replicas {
    async fn start(n: usize, redis_env: &[(&str, &str)]) -> Option<Replicas> {
        let (db_url, db) = postgres_db()?;
        let tokens = Tokens::new(&Secret::new(SECRET), jsonwebtoken::Algorithm::HS256);
        let mut r = Replicas {
            dir: tempfile::tempdir().unwrap(),
            db_url,
            redis_env: redis_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            pods: Vec::new(),
            admin: tokens.mint("admin", Role::Admin, Duration::from_secs(3600)),
            tokens,
            http: reqwest::Client::new(),
            _db: db,
        };
        for _ in 0..n {
            r.add_pod().await;
        }
        Some(r)
    }

    async fn add_pod(&mut self) {
        let name = format!("pod-{}", (b'a' + self.pods.len() as u8) as char);
        let data = self.dir.path().join(&name);
        let mut env: Vec<(&str, &str)> = vec![
            ("SERVER_HOST", "127.0.0.1"),
            ("SERVER_PORT", "0"),
            ("POD_ID", &name),
            ("DATABASE_URL", &self.db_url),
            ("SECRET_KEY", SECRET),
            ("REDIS_KEY_PREFIX", "it:"),
            ("WS_HEARTBEAT_INTERVAL", "500ms"),
            ("WS_OFFLINE_TIMEOUT", "3s"),
            // Long, so that only the pub/sub path can deliver across replicas quickly.
            ("COMMAND_SWEEP_INTERVAL", "60s"),
            ("DRAIN_WINDOW", "1s"),
            ("SHUTDOWN_TIMEOUT", "5s"),
            ("REBALANCE", "false"),
            ("DATABASE_POOL_SIZE", "4"),
            ("DATA_DIR", data.to_str().unwrap()),
        ];
        env.extend(self.redis_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let pod = ServerProcess::start(self.dir.path(), &env).await;
        let ready = reqwest::get(format!("{}/readiness", pod.base()))
            .await
            .unwrap();
        assert_eq!(ready.status().as_u16(), 200, "{}", pod.log());
        self.pods.push(pod);
    }

    fn agent_token(&self, id: &str) -> String {
        self.tokens.mint(id, Role::Agent, Duration::from_secs(3600))
    }

    /// Queues a command through replica `pod`; returns its id.
    async fn command(&self, pod: usize, agent: &str) -> String {
        let resp = self
            .http
            .post(format!(
                "{}/api/v1/agents/{agent}/commands",
                self.pods[pod].base()
            ))
            .bearer_auth(&self.admin)
            .json(&json!({"name": "run"}))
            .send()
            .await
            .unwrap();
        let (status, body) = status_json(resp).await;
        assert_eq!(status, 202, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    async fn status(&self, command: &str) -> String {
        let resp = self
            .http
            .get(format!("{}/api/v1/commands/{command}", self.pods[0].base()))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap();
        status_json(resp).await.1["status"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Waits until every command has succeeded; panics naming the ones still open.
    async fn all_succeeded(&self, commands: &[String], bound: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let mut open = Vec::new();
            for c in commands {
                if self.status(c).await != "succeeded" {
                    open.push(c.clone());
                }
            }
            if open.is_empty() {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < bound,
                "commands lost or stuck after {bound:?}: {open:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every agent of `fleet` is connected and recorded online.
    async fn all_online(&self, fleet: &[FleetAgent]) {
        eventually(WAIT, "every agent connects", async || {
            fleet.iter().all(|a| a.connected_to().is_some())
        })
        .await;
        for agent in fleet {
            eventually(WAIT, "every agent is recorded online", async || {
                let resp = self
                    .http
                    .get(format!(
                        "{}/api/v1/agents/{}",
                        self.pods[0].base(),
                        agent.id
                    ))
                    .bearer_auth(&self.admin)
                    .send()
                    .await
                    .unwrap();
                status_json(resp).await.1["online"] == true
            })
            .await;
        }
    }

    /// A fleet pinned to replica `pod`, each agent reconnecting to it if cut off.
    fn fleet_on(&self, pod: usize, prefix: &str, n: usize) -> Vec<FleetAgent> {
        let balancer = Balancer::default();
        balancer.set(vec![self.pods[pod].port]);
        (0..n)
            .map(|i| {
                let id = format!("{prefix}-{i}");
                FleetAgent::spawn(&id, self.agent_token(&id), balancer.clone())
            })
            .collect()
    }

    /// Sends a command through the replica the agent is *not* on, and measures how long it
    /// takes to be executed: quick only if the wake-up crossed replicas over pub/sub.
    async fn cross_replica_latency(&self, agent: &FleetAgent, via: usize) -> Duration {
        let started = Instant::now();
        let id = self.command(via, &agent.id).await;
        eventually(WAIT, "the command crosses replicas", async || {
            agent.seen.lock().unwrap().executed.contains(&id)
        })
        .await;
        started.elapsed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_a_tls_only_redis_as_an_acl_user() {
    if !have_redis_server() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(ca) = TestCa::new(dir.path()) else {
        return;
    };
    let server = ca.issue("redis");
    let tls_port = free_port();
    // No plain-text port, no `default` user: only TLS and the ACL user get in.
    let args: Vec<String> = [
        "--port",
        "0",
        "--tls-port",
        &tls_port.to_string(),
        "--bind",
        "127.0.0.1",
        "--tls-cert-file",
        server.cert.to_str().unwrap(),
        "--tls-key-file",
        server.key.to_str().unwrap(),
        "--tls-ca-cert-file",
        ca.cert.to_str().unwrap(),
        "--tls-auth-clients",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--user",
        "default",
        "off",
        // The least the server needs, as docs/operations.md documents it.
        "--user",
        REDIS_USER,
        "on",
        &format!(">{REDIS_PASSWORD}"),
        "~it:*",
        "&it:*",
        "+@read",
        "+@write",
        "+@pubsub",
        "+@scripting",
        "+ping",
        // The test's own look inside.
        "--user",
        INSPECTOR,
        "on",
        &format!(">{REDIS_PASSWORD}"),
        "~*",
        "&*",
        "+@all",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let _redis = redis_process(&args);
    let ca_path = ca.cert.clone();
    eventually(WAIT, "redis-server answers over TLS", async || {
        query(
            tls_port,
            Some(&ca_path),
            Some(REDIS_USER),
            Some(REDIS_PASSWORD),
            &["PING"],
        )
        .await
        .is_ok()
    })
    .await;

    let port = tls_port.to_string();
    let Some(r) = Replicas::start(
        2,
        &[
            ("REDIS_HOST", "127.0.0.1"),
            ("REDIS_PORT", &port),
            ("REDIS_TLS", "true"),
            ("REDIS_TLS_CA_FILE", ca.cert.to_str().unwrap()),
            ("REDIS_USERNAME", REDIS_USER),
            ("REDIS_PASSWORD", REDIS_PASSWORD),
        ],
    )
    .await
    else {
        return;
    };
    let on_a = r.fleet_on(0, "tls-a", 2);
    let on_b = r.fleet_on(1, "tls-b", 2);
    r.all_online(&on_a).await;
    r.all_online(&on_b).await;

    let a_to_b = r.cross_replica_latency(&on_b[0], 0).await;
    let b_to_a = r.cross_replica_latency(&on_a[0], 1).await;
    assert!(
        a_to_b < Duration::from_secs(1) && b_to_a < Duration::from_secs(1),
        "woken over pub/sub on the TLS connection, not by the 60 s sweep: {a_to_b:?}, {b_to_a:?}"
    );

    // The registry and the subscriptions are the ACL user's, over TLS.
    let clients = query(
        tls_port,
        Some(&ca.cert),
        Some(INSPECTOR),
        Some(REDIS_PASSWORD),
        &["CLIENT", "LIST"],
    )
    .await
    .unwrap();
    let clients: String = redis::FromRedisValue::from_redis_value(clients).unwrap();
    let ours = clients
        .lines()
        .filter(|l| l.contains(&format!("user={REDIS_USER}")))
        .count();
    assert!(ours >= 4, "two connections per replica:\n{clients}");
    let keys = query(
        tls_port,
        Some(&ca.cert),
        Some(INSPECTOR),
        Some(REDIS_PASSWORD),
        &["KEYS", "it:agent:*"],
    )
    .await
    .unwrap();
    let keys: Vec<String> = redis::FromRedisValue::from_redis_value(keys).unwrap();
    assert_eq!(keys.len(), 4, "{keys:?}");
    for pod in &r.pods {
        let log = pod.log();
        assert!(
            !log.contains("Redis unavailable"),
            "every command the server sends is within the documented ACL:\n{log}"
        );
    }
    eprintln!("TLS + ACL user: cross-replica commands in {a_to_b:?} and {b_to_a:?}; 0 lost");
}

/// A master, a replica and three sentinels on free ports, passwords on both.
struct SentinelSet {
    master_port: u16,
    replica_port: u16,
    sentinel_ports: Vec<u16>,
    /// The master's process first.
    children: Vec<Child>,
    /// With TLS: the CA that signed every node's certificate.
    ca: Option<std::path::PathBuf>,
    _dir: tempfile::TempDir,
}

impl SentinelSet {
    /// Plain TCP, or TLS only (every node, replication and the sentinels' own links).
    async fn start(tls: bool) -> Option<SentinelSet> {
        let dir = tempfile::tempdir().unwrap();
        let (master_port, replica_port) = (free_port(), free_port());
        let ca = if tls {
            Some(TestCa::new(dir.path())?)
        } else {
            None
        };
        let node_cert = ca.as_ref().map(|ca| ca.issue("redis"));
        // The same settings serve redis-server's command line and a sentinel's file.
        let tls_settings = |port: u16| -> Vec<(String, String)> {
            match (&ca, &node_cert) {
                (Some(ca), Some(cert)) => vec![
                    ("port".into(), "0".into()),
                    ("tls-port".into(), port.to_string()),
                    ("tls-cert-file".into(), cert.cert.display().to_string()),
                    ("tls-key-file".into(), cert.key.display().to_string()),
                    ("tls-ca-cert-file".into(), ca.cert.display().to_string()),
                    ("tls-auth-clients".into(), "no".into()),
                    ("tls-replication".into(), "yes".into()),
                ],
                _ => vec![("port".into(), port.to_string())],
            }
        };
        let data_node = |port: u16, replica_of: Option<u16>| {
            let node_dir = dir.path().join(format!("node-{port}"));
            std::fs::create_dir(&node_dir).unwrap();
            let mut args: Vec<String> = tls_settings(port)
                .into_iter()
                .flat_map(|(k, v)| [format!("--{k}"), v])
                .collect();
            args.extend(
                [
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--requirepass",
                    REDIS_PASSWORD,
                    "--masterauth",
                    REDIS_PASSWORD,
                    // A replica's full sync goes through an RDB file: keep it in the test's dir.
                    "--dir",
                    node_dir.to_str().unwrap(),
                ]
                .into_iter()
                .map(String::from),
            );
            if let Some(master) = replica_of {
                args.extend(["--replicaof".into(), "127.0.0.1".into(), master.to_string()]);
            }
            redis_process(&args)
        };
        let mut children = vec![
            data_node(master_port, None),
            data_node(replica_port, Some(master_port)),
        ];
        let sentinel_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        for port in &sentinel_ports {
            // Sentinels rewrite their file, so each has its own.
            let conf = dir.path().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "{}\nbind 127.0.0.1\n\
                     requirepass \"{SENTINEL_PASSWORD}\"\n\
                     sentinel sentinel-pass \"{SENTINEL_PASSWORD}\"\n\
                     sentinel monitor mymaster 127.0.0.1 {master_port} 2\n\
                     sentinel auth-pass mymaster \"{REDIS_PASSWORD}\"\n\
                     sentinel down-after-milliseconds mymaster 1000\n\
                     sentinel failover-timeout mymaster 10000\n\
                     sentinel parallel-syncs mymaster 1\n",
                    tls_settings(*port)
                        .iter()
                        .map(|(k, v)| format!("{k} \"{v}\""))
                        .collect::<Vec<_>>()
                        .join("\n"),
                ),
            )
            .unwrap();
            children.push(redis_process(&[
                conf.to_str().unwrap().to_string(),
                "--sentinel".into(),
            ]));
        }
        let set = SentinelSet {
            master_port,
            replica_port,
            sentinel_ports,
            children,
            ca: ca.map(|ca| ca.cert.clone()),
            _dir: dir,
        };
        // Ready when every sentinel sees the replica and the two other sentinels.
        eventually(
            Duration::from_secs(30),
            "the sentinels discover each other",
            async || {
                for port in &set.sentinel_ports {
                    let ok = set
                        .sentinel(*port, &["SENTINEL", "CKQUORUM", "mymaster"])
                        .await
                        .is_ok_and(|v| format!("{v:?}").contains("3 usable"));
                    let replicas = set
                        .sentinel(*port, &["SENTINEL", "REPLICAS", "mymaster"])
                        .await;
                    if !ok
                        || !replicas
                            .is_ok_and(|v| matches!(v, redis::Value::Array(ref a) if a.len() == 1))
                    {
                        return false;
                    }
                }
                true
            },
        )
        .await;
        Some(set)
    }

    async fn sentinel(&self, port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
        query(
            port,
            self.ca.as_deref(),
            None,
            Some(SENTINEL_PASSWORD),
            args,
        )
        .await
    }

    /// Runs a command on a data node.
    async fn node(&self, port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
        query(port, self.ca.as_deref(), None, Some(REDIS_PASSWORD), args).await
    }

    async fn master_port(&self) -> Option<u16> {
        let v = self
            .sentinel(
                self.sentinel_ports[0],
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"],
            )
            .await
            .ok()?;
        let addr: Vec<String> = redis::FromRedisValue::from_redis_value(v).ok()?;
        addr.get(1)?.parse().ok()
    }

    fn sentinels_env(&self) -> String {
        self.sentinel_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// How the master goes away.
#[derive(Clone, Copy, Debug)]
enum Failover {
    /// `SENTINEL FAILOVER`: the old master stays up, writable until it is reconfigured.
    Manual,
    /// The master's process is killed; the sentinels notice after `down-after-milliseconds`.
    MasterKilled,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_under_a_connected_fleet_loses_no_command() {
    failover_under_a_connected_fleet(Failover::Manual, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_after_the_master_is_killed_loses_no_command() {
    failover_under_a_connected_fleet(Failover::MasterKilled, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_over_tls_loses_no_command() {
    failover_under_a_connected_fleet(Failover::Manual, true).await;
}

async fn failover_under_a_connected_fleet(how: Failover, tls: bool) {
    if !have_redis_server() {
        return;
    }
    let Some(mut set) = SentinelSet::start(tls).await else {
        return;
    };
    let sentinels = set.sentinels_env();
    let mut env = vec![
        ("REDIS_SENTINELS", sentinels.as_str()),
        ("REDIS_SENTINEL_MASTER", "mymaster"),
        ("REDIS_SENTINEL_PASSWORD", SENTINEL_PASSWORD),
        ("REDIS_PASSWORD", REDIS_PASSWORD),
    ];
    let ca = set.ca.as_ref().map(|p| p.to_str().unwrap().to_string());
    if let Some(ca) = &ca {
        env.extend([("REDIS_TLS", "true"), ("REDIS_TLS_CA_FILE", ca.as_str())]);
    }
    let Some(r) = Replicas::start(2, &env).await else {
        return;
    };
    let per_replica = 10;
    let on_a = r.fleet_on(0, "fo-a", per_replica);
    let on_b = r.fleet_on(1, "fo-b", per_replica);
    r.all_online(&on_a).await;
    r.all_online(&on_b).await;
    let before = r.cross_replica_latency(&on_b[0], 0).await;
    assert!(before < Duration::from_secs(1), "{before:?}");

    // Commands keep arriving through both replicas, each for an agent on the other one,
    // before, during and after the failover.
    let mut commands = Vec::new();
    let mut round = 0;
    let mut send_round = async |commands: &mut Vec<String>| {
        round += 1;
        let i = round % per_replica;
        commands.push(r.command(0, &on_b[i].id).await);
        commands.push(r.command(1, &on_a[i].id).await);
    };
    for _ in 0..5 {
        send_round(&mut commands).await;
    }
    assert_eq!(set.master_port().await, Some(set.master_port));
    match how {
        Failover::Manual => {
            set.sentinel(set.sentinel_ports[0], &["SENTINEL", "FAILOVER", "mymaster"])
                .await
                .expect("the sentinels accept a failover");
        }
        Failover::MasterKilled => set.children[0].kill().await.unwrap(),
    }
    let started = Instant::now();
    while set.master_port().await != Some(set.replica_port) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the sentinels promote the replica"
        );
        send_round(&mut commands).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let promoted_in = started.elapsed();
    let during = commands.len();
    for _ in 0..10 {
        send_round(&mut commands).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let delivered_in = r.all_succeeded(&commands, Duration::from_secs(30)).await;
    // After the failover, wake-ups cross replicas over the new master's pub/sub at once.
    let after_a = r.cross_replica_latency(&on_b[1], 0).await;
    let after_b = r.cross_replica_latency(&on_a[1], 1).await;
    assert!(
        after_a < Duration::from_secs(1) && after_b < Duration::from_secs(1),
        "pub/sub follows the new master: {after_a:?}, {after_b:?}"
    );
    // Agents talk to the replicas, not to Redis: nobody was disconnected.
    for agent in on_a.iter().chain(&on_b) {
        let seen = agent.seen.lock().unwrap();
        assert_eq!(
            seen.connects, 1,
            "{} reconnected: {:?}",
            agent.id, seen.closes
        );
    }
    // Both replicas write to and subscribe on the new master, the old one's data is gone
    // with its reconfiguration as a replica, and the registry is whole there.
    eventually(WAIT, "both replicas follow the new master", async || {
        let Ok(clients) = set.node(set.replica_port, &["CLIENT", "LIST"]).await else {
            return false;
        };
        let clients: String = redis::FromRedisValue::from_redis_value(clients).unwrap();
        let keys = set
            .node(set.replica_port, &["KEYS", "it:agent:*"])
            .await
            .map(|v| redis::FromRedisValue::from_redis_value(v).unwrap_or(Vec::<String>::new()));
        clients.lines().filter(|l| l.contains(" sub=2 ")).count() == 2
            && keys.is_ok_and(|k| k.len() == 2 * per_replica)
    })
    .await;
    eprintln!(
        "sentinel failover ({how:?}, TLS {tls}): promoted in {promoted_in:?}; {} commands ({during} before the \
         promotion was visible) all succeeded {delivered_in:?} later; cross-replica after: \
         {after_a:?}, {after_b:?}; 0 lost, 0 agents reconnected",
        commands.len()
    );
}
