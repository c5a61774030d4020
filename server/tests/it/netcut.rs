//! Network cuts, not stops: a redis-server and a PostgreSQL of the test's own, each on a
//! host of its own behind a veth pair ([`NetHost`]), cut off while agents are connected
//! and then restored. Packets vanish (no RST, no ICMP), so established connections hang
//! rather than fail, which is what a partitioned network does and what a stopped server
//! does not show. docs/operations.md ("Network cuts") records what these tests observe.
//!
//! They need root and iproute2 (network namespaces), and skip loudly elsewhere. Each
//! takes about 20 s.

use std::time::{Duration, Instant};

use agent_server::auth::{Role, Tokens};
use agent_server::config::Secret;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::netns::NetHost;
use crate::procs::*;

/// Connects as `id` to the server on `port` and reads the welcome.
async fn connect(port: u16, id: &str, tokens: &Tokens) -> Agent {
    let token = tokens.mint(id, Role::Agent, Duration::from_secs(3600));
    connect_to(port, id, &token).await
}

/// An HTTP client of one replica, as an admin.
struct Api {
    base: String,
    admin: String,
    http: reqwest::Client,
}

impl Api {
    fn new(server: &ServerProcess, tokens: &Tokens) -> Api {
        Api {
            base: server.base(),
            admin: tokens.mint("admin", Role::Admin, Duration::from_secs(3600)),
            http: reqwest::Client::new(),
        }
    }

    /// Status, body and how long the answer took.
    async fn get(&self, path: &str) -> (u16, Value, Duration) {
        let started = Instant::now();
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap();
        let (status, body) = status_json(resp).await;
        (status, body, started.elapsed())
    }

    /// Queues a command; status, body and how long the answer took.
    async fn command(&self, agent: &str) -> (u16, Value, Duration) {
        let started = Instant::now();
        let resp = self
            .http
            .post(format!("{}/api/v1/agents/{agent}/commands", self.base))
            .bearer_auth(&self.admin)
            .json(&json!({"name": "uptime"}))
            .send()
            .await
            .unwrap();
        let (status, body) = status_json(resp).await;
        (status, body, started.elapsed())
    }
}

/// Waits for command `id` on `agent`, answering it; returns how long it took.
async fn receives(agent: &mut Agent, id: &str) -> Duration {
    let started = Instant::now();
    loop {
        let msg = agent.recv_type("command").await;
        if msg["id"] == id {
            agent.result(id, "ok", json!({"stdout": "up"})).await;
            return started.elapsed();
        }
    }
}

/// A heartbeat answered: the session is alive on both ends.
async fn answers_heartbeat(agent: &mut Agent) {
    agent.until_heartbeat_ack().await;
}

/// A redis-server inside `net`, on its address.
async fn redis_on(net: &NetHost) -> tokio::process::Child {
    let mut command = net.command("redis-server");
    // Reached from outside the namespace, without a password.
    command.args(["--protected-mode", "no"]);
    let child = spawn_redis(command, &ephemeral_redis(&net.addr.to_string(), 6379));
    let url = format!("redis://{}:6379/", net.addr);
    eventually(WAIT, "redis-server answers across the link", async || {
        let Ok(client) = redis::Client::open(url.as_str()) else {
            return false;
        };
        match client.get_multiplexed_async_connection().await {
            Ok(mut c) => redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .is_ok(),
            Err(_) => false,
        }
    })
    .await;
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_cut_off_from_redis_keep_their_agents_and_still_deliver_across_replicas() {
    if !have_redis_server() {
        return;
    }
    let Some(net) = NetHost::create() else {
        return;
    };
    let Some((db_url, _db)) = postgres_db() else {
        return;
    };
    let _redis = redis_on(&net).await;
    let dir = tempfile::tempdir().unwrap();
    let redis_host = net.addr.to_string();
    let mut pods = Vec::new();
    for pod in ["pod-a", "pod-b"] {
        let data = dir.path().join(pod);
        let env = [
            ("SERVER_HOST", "127.0.0.1"),
            ("SERVER_PORT", "0"),
            ("POD_ID", pod),
            ("DATABASE_URL", db_url.as_str()),
            ("SECRET_KEY", SECRET),
            ("REDIS_HOST", redis_host.as_str()),
            ("REDIS_PORT", "6379"),
            ("WS_HEARTBEAT_INTERVAL", "500ms"),
            ("WS_OFFLINE_TIMEOUT", "10s"),
            // Long: quick delivery across replicas comes from pub/sub, or from the
            // outage poll while Redis is away, never from the sweep.
            ("COMMAND_SWEEP_INTERVAL", "60s"),
            ("REBALANCE", "false"),
            ("DRAIN_WINDOW", "1s"),
            ("SHUTDOWN_TIMEOUT", "5s"),
            ("DATABASE_POOL_SIZE", "4"),
            ("DATA_DIR", data.to_str().unwrap()),
        ];
        pods.push(ServerProcess::start(dir.path(), &env).await);
    }
    let tokens = Tokens::new(&Secret::new(SECRET), jsonwebtoken::Algorithm::HS256);
    let (a, b) = (Api::new(&pods[0], &tokens), Api::new(&pods[1], &tokens));
    let mut on_a = connect(pods[0].port, "cut-a", &tokens).await;
    let mut on_b = connect(pods[1].port, "cut-b", &tokens).await;

    // Before the cut, a command queued through A reaches B's agent over pub/sub.
    let (status, body, _) = a.command("cut-b").await;
    assert_eq!(status, 202, "{body}");
    let before = receives(&mut on_b, body["id"].as_str().unwrap()).await;

    net.cut();
    let cut = Instant::now();

    // Readiness stays 200 and answers quickly, reporting Redis as down.
    let mut slowest_probe = Duration::ZERO;
    let noticed = eventually(
        Duration::from_secs(10),
        "readiness reports Redis down",
        async || {
            let (status, body, took) = a.get("/readiness").await;
            slowest_probe = slowest_probe.max(took);
            assert_eq!(status, 200, "readiness during a Redis cut: {body}");
            body["checks"]["redis"]["ok"] == false
        },
    )
    .await;
    assert!(
        slowest_probe < Duration::from_secs(1),
        "a readiness probe took {slowest_probe:?} during the cut"
    );

    // A command for an agent on the same replica is delivered at once.
    let (status, body, same_answer) = a.command("cut-a").await;
    assert_eq!(status, 202, "{body}");
    let same = receives(&mut on_a, body["id"].as_str().unwrap()).await;

    // One for an agent on the other replica is stored, and delivered by the outage poll.
    let (status, body, cross_answer) = a.command("cut-b").await;
    assert_eq!(status, 202, "{body}");
    let cross = receives(&mut on_b, body["id"].as_str().unwrap()).await;

    // Sessions stay up, new ones open, and the rest of the API answers (no 500).
    answers_heartbeat(&mut on_a).await;
    answers_heartbeat(&mut on_b).await;
    let mut fresh = connect(pods[1].port, "cut-c", &tokens).await;
    for path in ["/api/v1/agents", "/api/v1/agents/cut-b", "/api/v1/pods"] {
        let (status, body, _) = a.get(path).await;
        assert!(
            status < 500,
            "GET {path} during the Redis cut: {status} {body}"
        );
    }
    assert_eq!(pods[0].metric("agent_server_redis_up").await, 0.0);
    let held = cut.elapsed();

    net.restore();
    let restored = Instant::now();
    let recovered = eventually(
        Duration::from_secs(15),
        "both replicas see Redis again",
        async || {
            let (_, ra, _) = a.get("/readiness").await;
            let (_, rb, _) = b.get("/readiness").await;
            ra["checks"]["redis"]["ok"] == true && rb["checks"]["redis"]["ok"] == true
        },
    )
    .await;
    // Back to pub/sub, without a restart: the agent that connected during the cut was
    // registered again, and the wake-up crosses replicas.
    let woken = pods[1].metric("agent_server_wakeups_received_total").await;
    let mut after = Duration::ZERO;
    eventually(
        Duration::from_secs(10),
        "a wake-up crosses replicas over Redis again",
        async || {
            let (status, body, _) = a.command("cut-c").await;
            assert_eq!(status, 202, "{body}");
            after = receives(&mut fresh, body["id"].as_str().unwrap()).await;
            pods[1].metric("agent_server_wakeups_received_total").await > woken
        },
    )
    .await;
    answers_heartbeat(&mut on_a).await;
    answers_heartbeat(&mut on_b).await;
    eprintln!(
        "Redis cut: readiness noticed after {noticed:?} (slowest probe {slowest_probe:?}); \
         same-replica command answered in {same_answer:?}, delivered in {same:?}; \
         cross-replica answered in {cross_answer:?}, delivered in {cross:?} \
         (before the cut {before:?}); cut held {held:?}; after restoring, Redis seen again \
         in {recovered:?} and a cross-replica command delivered in {after:?} \
         ({:?} after the restore)",
        restored.elapsed()
    );
    assert!(
        cross < Duration::from_secs(5),
        "cross-replica delivery during the cut took {cross:?}"
    );
    assert!(
        after < Duration::from_secs(2),
        "cross-replica delivery after the cut took {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_postgresql_answers_503_within_the_bound_and_loses_no_result() {
    let Some(net) = NetHost::create() else {
        return;
    };
    let Some(pg) = PrivatePostgres::start_on(&net) else {
        return;
    };
    let app = spawn_app_on(
        &pg.url(),
        &[
            ("WS_HEARTBEAT_INTERVAL", "300ms"),
            ("WS_OFFLINE_TIMEOUT", "30s"),
        ],
    )
    .await;
    // DATABASE_OUTAGE_TIMEOUT (2 s, its default) plus scheduling slack; the statement
    // timeout keeps its default (10 s), far above it.
    let bound = Duration::from_millis(3000);
    let mut agent = app.connect("pgcut-1").await;
    let id = app.command("pgcut-1", "uptime", json!({})).await;
    agent.recv_type("command").await;
    // The session handles one message at a time: let it finish recording the delivery
    // first, or the result would wait behind that call's own bound.
    agent.until_heartbeat_ack().await;

    net.cut();
    let cut = Instant::now();

    // A result sent during the cut is answered `store_unavailable` within the bound,
    // and the session's pings go on meanwhile.
    let (reply, result_answer, pings) = agent.result_during_outage(&id).await;
    assert_eq!(
        (reply["code"].as_str(), reply["id"].as_str()),
        (Some("store_unavailable"), Some(id.as_str())),
        "{reply}"
    );
    assert!(
        result_answer < bound,
        "store_unavailable after {result_answer:?}"
    );
    assert!(pings >= 2, "{pings} pings in {result_answer:?}");

    // Requests, more at once than the pool has connections: each is a 503 that names
    // the cause, within the bound; none is a 500.
    let answers = app.requests_at_once("pgcut-1", 6).await;
    let slowest = all_store_unavailable(&answers, bound);
    let ready = reqwest::get(app.url("/readiness")).await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    // The cut outlasts libpq's `tcp_user_timeout` (10 s): the kernel ends the hung
    // connections, and the pool must rebuild itself once the network is back. This is the
    // scenario's length, not a wait for an event.
    tokio::time::sleep_until((cut + Duration::from_secs(12)).into()).await;
    let held = cut.elapsed();

    net.restore();
    let restored = Instant::now();
    // The agent sends the result again, as told, and it is kept.
    let recovered = agent
        .resend_result_until_acked(&id, Duration::from_secs(30))
        .await;
    assert_eq!(app.command_status(&id).await["status"], "succeeded");
    let api_back = restored.elapsed();
    let (status, body) = app
        .post(
            "/api/v1/agents/pgcut-1/commands",
            &json!({"name": "uptime"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let ready = reqwest::get(app.url("/readiness")).await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    eprintln!(
        "PostgreSQL cut: result answered store_unavailable in {result_answer:?} \
         ({pings} pings meanwhile); {} requests at once answered 503 within {slowest:?}; \
         cut held {held:?}; after restoring, the resent result stored in {recovered:?}, \
         the API answering again {api_back:?} after the restore",
        answers.len(),
    );
}
