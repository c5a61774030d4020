//! Cluster mode: several `agent-server` processes sharing one PostgreSQL database and a
//! redis-server owned by the test. Every scenario asserts that no command is lost and
//! prints its timings (`cargo test -- --nocapture` shows them).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use agent_server::auth::{Role, Tokens};
use agent_server::config::Secret;
use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::procs::*;

const HEARTBEAT: Duration = Duration::from_millis(500);

struct TestCluster {
    dir: tempfile::TempDir,
    db_url: String,
    redis: RedisServer,
    pods: Vec<ServerProcess>,
    extra: Vec<(String, String)>,
    http: reqwest::Client,
    admin: String,
    tokens: Tokens,
    _db: TestDb,
}

/// `n` replicas, or `None` (a loud skip outside CI) without PostgreSQL or redis-server.
async fn cluster(n: usize, extra: &[(&str, &str)]) -> Option<TestCluster> {
    let (db_url, db) = postgres_db()?;
    let redis = RedisServer::start().await?;
    let tokens = Tokens::new(&Secret::new(SECRET), jsonwebtoken::Algorithm::HS256);
    let mut c = TestCluster {
        dir: tempfile::tempdir().unwrap(),
        db_url,
        redis,
        pods: Vec::new(),
        extra: extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        http: reqwest::Client::new(),
        admin: tokens.mint("admin", Role::Admin, Duration::from_secs(3600)),
        tokens,
        _db: db,
    };
    for _ in 0..n {
        c.add_pod().await;
    }
    Some(c)
}

impl TestCluster {
    async fn add_pod(&mut self) -> usize {
        let name = format!("pod-{}", (b'a' + self.pods.len() as u8) as char);
        let data = self.dir.path().join(&name);
        let redis_port = self.redis.port.to_string();
        let heartbeat = format!("{}ms", HEARTBEAT.as_millis());
        let mut env: Vec<(String, String)> = [
            ("SERVER_HOST", "127.0.0.1"),
            ("SERVER_PORT", "0"),
            ("POD_ID", name.as_str()),
            ("DATABASE_URL", self.db_url.as_str()),
            ("SECRET_KEY", SECRET),
            ("REDIS_HOST", "127.0.0.1"),
            ("REDIS_PORT", redis_port.as_str()),
            ("REDIS_KEY_PREFIX", "it:"),
            ("WS_HEARTBEAT_INTERVAL", heartbeat.as_str()),
            ("WS_OFFLINE_TIMEOUT", "3s"),
            // Long, so that only the pub/sub path can deliver across replicas quickly.
            ("COMMAND_SWEEP_INTERVAL", "60s"),
            ("DRAIN_WINDOW", "1s"),
            ("SHUTDOWN_TIMEOUT", "5s"),
            ("REBALANCE", "false"),
            ("DATABASE_POOL_SIZE", "4"),
            ("DATA_DIR", data.to_str().unwrap()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in &self.extra {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let pod = ServerProcess::start(self.dir.path(), &env).await;
        // As the kubelet's readiness probe would: a replica takes part in rebalancing
        // once it is routable.
        let ready = reqwest::get(format!("{}/readiness", pod.base()))
            .await
            .unwrap();
        assert_eq!(ready.status().as_u16(), 200);
        self.pods.push(pod);
        self.pods.len() - 1
    }

    fn ports(&self) -> Vec<u16> {
        self.pods.iter().map(|p| p.port).collect()
    }

    fn agent_token(&self, id: &str) -> String {
        self.tokens.mint(id, Role::Agent, Duration::from_secs(3600))
    }

    /// Queues a command through replica `pod`; returns its id.
    async fn command(&self, pod: usize, agent: &str) -> String {
        let url = format!("{}/api/v1/agents/{agent}/commands", self.pods[pod].base());
        let resp = self
            .http
            .post(url)
            .bearer_auth(&self.admin)
            .json(&json!({"name": "run"}))
            .send()
            .await
            .unwrap();
        let (status, body) = status_json(resp).await;
        assert_eq!(status, 202, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    async fn get(&self, pod: usize, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(format!("{}{path}", self.pods[pod].base()))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap();
        status_json(resp).await
    }

    async fn status(&self, pod: usize, command: &str) -> String {
        self.get(pod, &format!("/api/v1/commands/{command}"))
            .await
            .1["status"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Waits until every command has succeeded; panics naming the ones still open.
    async fn all_succeeded(&self, pod: usize, commands: &[String], bound: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let mut open = Vec::new();
            for c in commands {
                if self.status(pod, c).await != "succeeded" {
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
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Connects directly to one replica (bypassing the balancer).
    async fn connect(&self, pod: usize, id: &str) -> Agent {
        connect_to(self.pods[pod].port, id, &self.agent_token(id)).await
    }

    fn fleet(&self, ids: &[String], balancer: &Balancer) -> Vec<FleetAgent> {
        ids.iter()
            .map(|id| FleetAgent::spawn(id, self.agent_token(id), balancer.clone()))
            .collect()
    }
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

async fn all_connected(fleet: &[FleetAgent], bound: Duration, what: &str) -> Duration {
    eventually(bound, what, async || {
        fleet.iter().all(|a| a.connected_to().is_some())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_created_on_one_replica_reaches_an_agent_on_another_at_once() {
    let Some(c) = cluster(2, &[]).await else {
        return;
    };
    let mut agent = c.connect(0, "web-1").await;
    let (_, seen_from_b) = c.get(1, "/api/v1/agents/web-1").await;
    assert_eq!(
        (seen_from_b["online"].as_bool(), seen_from_b["pod"].as_str()),
        (Some(true), Some("pod-a"))
    );

    let started = Instant::now();
    let id = c.command(1, "web-1").await;
    let cmd = agent.recv_type("command").await;
    let latency = started.elapsed();
    assert_eq!(cmd["id"], id.as_str());
    assert!(
        latency < Duration::from_secs(1),
        "woken over pub/sub, not by the 60 s sweep: {latency:?}"
    );
    agent.result(&id, "ok", json!("done")).await;
    agent.recv_type("ack").await;
    assert_eq!(c.status(1, &id).await, "succeeded");
    assert!(c.pods[1].metric("agent_server_wakeups_sent_total").await >= 1.0);
    assert!(
        c.pods[0]
            .metric("agent_server_wakeups_received_total")
            .await
            >= 1.0
    );
    eprintln!("cross-replica command: API accepted -> agent received in {latency:?}; 0 lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_connection_on_another_replica_closes_the_older_within_two_seconds() {
    let Some(c) = cluster(2, &[]).await else {
        return;
    };
    let mut old = c.connect(0, "twin").await;
    let id = c.command(1, "twin").await;
    old.recv_type("command").await;

    let started = Instant::now();
    let mut new = c.connect(1, "twin").await;
    assert_eq!(
        old.closed().await.0,
        4001,
        "the older connection is told it was replaced"
    );
    let kicked = started.elapsed();
    assert!(kicked < Duration::from_secs(2), "{kicked:?}");
    assert!(new.welcome["epoch"].as_i64() > old.welcome["epoch"].as_i64());

    let again = new.recv_type("command").await;
    assert_eq!(
        again["id"],
        id.as_str(),
        "the unanswered command is delivered to the new connection"
    );
    new.result(&id, "ok", json!(1)).await;
    new.recv_type("ack").await;
    let (_, agent) = c.get(0, "/api/v1/agents/twin").await;
    assert_eq!(agent["pod"], "pod-b");
    eprintln!("duplicate across replicas: older closed in {kicked:?}; 0 lost");
}

/// Agents admitted together share registry round trips (one script call claims many
/// entries, one pipeline carries the `replaced` notices), yet each entry is still
/// compare-and-set on its own epoch: when a whole fleet moves to another replica at once,
/// every entry names the agent's newest connection and every older one is told it was
/// replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_moving_at_once_is_registered_with_its_newest_connections() {
    let Some(c) = cluster(2, &[]).await else {
        return;
    };
    let ids = ids("herd", 100);
    let olds = join_all(ids.iter().map(|id| c.connect(0, id))).await;
    let news = join_all(ids.iter().map(|id| c.connect(1, id))).await;
    let client = redis::Client::open(format!("redis://127.0.0.1:{}/", c.redis.port)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for ((id, mut old), new) in ids.iter().zip(olds).zip(&news) {
        assert_eq!(
            old.closed().await.0,
            4001,
            "{id}'s older connection is replaced"
        );
        let (pod, epoch): (String, i64) = redis::cmd("HMGET")
            .arg(format!("it:agent:{id}"))
            .arg("pod")
            .arg("epoch")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(pod, "pod-b", "{id}");
        assert_eq!(Some(epoch), new.welcome["epoch"].as_i64(), "{id}");
        assert!(new.welcome["epoch"].as_i64() > old.welcome["epoch"].as_i64());
    }
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let scripts = stats
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .collect::<Vec<_>>();
    eprintln!("200 connects and 100 replacements on 2 replicas; script calls: {scripts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flush_and_restart_lose_nothing_and_need_no_replica_restart() {
    let Some(mut c) = cluster(2, &[]).await else {
        return;
    };
    let on_a: Vec<String> = ids("a", 3);
    let on_b: Vec<String> = ids("b", 3);
    let (lb_a, lb_b) = (Balancer::default(), Balancer::default());
    lb_a.set(vec![c.pods[0].port]);
    lb_b.set(vec![c.pods[1].port]);
    let mut fleet = c.fleet(&on_a, &lb_a);
    fleet.extend(c.fleet(&on_b, &lb_b));
    all_connected(&fleet, WAIT, "agents connect").await;
    eventually(WAIT, "registry holds every agent", async || {
        c.redis.keys("it:agent:*").await.len() == 6
    })
    .await;

    // FLUSHALL: every replica re-registers its agents within one heartbeat interval.
    c.redis.query(&["FLUSHALL"]).await.unwrap();
    let back = eventually(HEARTBEAT * 3, "registry repopulated", async || {
        c.redis.keys("it:agent:*").await.len() == 6
    })
    .await;
    let mut commands = Vec::new();
    for a in &on_a {
        commands.push(c.command(1, a).await);
    }
    let delivered = c.all_succeeded(1, &commands, Duration::from_secs(2)).await;

    // Redis down: agents stay connected, commands are accepted and stored.
    c.redis.stop().await;
    let mut during_outage = Vec::new();
    let accept_started = Instant::now();
    for a in &on_a {
        during_outage.push(c.command(1, a).await);
    }
    let accept_time = accept_started.elapsed();
    let (ready, _) = c.get(1, "/readiness").await;
    assert_eq!(
        ready, 200,
        "a Redis outage does not take replicas out of the load balancer"
    );

    // Redis back: delivery resumes without restarting any replica.
    c.redis.restart().await;
    let recovered = c
        .all_succeeded(1, &during_outage, Duration::from_secs(10))
        .await;
    for a in &fleet {
        assert_eq!(
            a.seen.lock().unwrap().connects,
            1,
            "{} never reconnected",
            a.id
        );
    }
    for pod in &c.pods {
        let outages = pod.log().matches("Redis unavailable").count();
        assert_eq!(
            outages,
            1,
            "the outage is logged once per replica:\n{}",
            pod.log()
        );
        assert!(pod.metric("agent_server_redis_errors_total").await >= 1.0);
    }
    eprintln!(
        "redis faults: FLUSHALL re-registered in {back:?}, delivered in {delivered:?}; \
         {} commands accepted during the outage in {accept_time:?}, delivered {recovered:?} after restart; 0 lost",
        during_outage.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replica_agents_move_with_their_pending_commands_and_its_entries_expire() {
    let Some(mut c) = cluster(2, &[]).await else {
        return;
    };
    let ids = ids("k", 5);
    let balancer = Balancer::default();
    balancer.set(vec![c.pods[0].port]);
    let fleet = c.fleet(&ids, &balancer);
    all_connected(&fleet, WAIT, "agents connect to pod-a").await;
    // An agent that will not come back: its registry entry must expire on its own.
    let _lonely = c.connect(0, "lonely").await;

    // Delivered but unanswered when the replica dies.
    let mut commands = Vec::new();
    for (agent, id) in fleet.iter().zip(&ids) {
        agent.hold.store(true, Ordering::Relaxed);
        commands.push(c.command(1, id).await);
    }
    eventually(WAIT, "commands reach the agents on pod-a", async || {
        fleet
            .iter()
            .all(|a| !a.seen.lock().unwrap().received.is_empty())
    })
    .await;

    let killed_at = Instant::now();
    balancer.set(vec![c.pods[1].port]);
    let a = c.pods.remove(0);
    a.sigkill().await;
    for agent in &fleet {
        agent.hold.store(false, Ordering::Relaxed);
    }
    for id in &ids {
        commands.push(c.command(0, id).await);
    }
    all_connected(&fleet, WAIT, "agents reconnect to pod-b").await;
    let reconnected = killed_at.elapsed();
    c.all_succeeded(0, &commands, WAIT).await;
    let delivered = killed_at.elapsed();
    for id in &ids {
        let (_, agent) = c.get(0, &format!("/api/v1/agents/{id}")).await;
        assert_eq!(agent["pod"], "pod-b", "presence moved with {id}");
    }
    let expired = eventually(
        Duration::from_secs(8),
        "dead replica's entry expires",
        async || c.redis.keys("it:agent:lonely").await.is_empty(),
    )
    .await;
    let offline = eventually(
        Duration::from_secs(15),
        "dead replica's agent marked offline",
        async || c.get(0, "/api/v1/agents/lonely").await.1["online"] == false,
    )
    .await;
    eprintln!(
        "SIGKILL: {} agents back {reconnected:?} and {} commands done {delivered:?} after the kill; \
         registry entry expired after {expired:?} more, marked offline after {offline:?} more; 0 lost",
        ids.len(),
        commands.len(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_scale_out_agents_spread_evenly_with_no_command_lost() {
    let Some(mut c) = cluster(2, &[("REBALANCE", "true"), ("REBALANCE_RATE", "20")]).await else {
        return;
    };
    let ids = ids("r", 40);
    let balancer = Balancer::default();
    balancer.set(c.ports());
    let fleet = c.fleet(&ids, &balancer);
    all_connected(&fleet, WAIT, "agents connect").await;

    c.add_pod().await;
    c.add_pod().await;
    balancer.set(c.ports());
    let started = Instant::now();
    let mut commands = Vec::new();
    let spread = loop {
        // Commands keep flowing while agents move.
        let target = &ids[commands.len() % ids.len()];
        commands.push(c.command(commands.len() % c.pods.len(), target).await);
        let mut per_pod = vec![0usize; c.pods.len()];
        for a in &fleet {
            if let Some(port) = a.connected_to() {
                per_pod[c.ports().iter().position(|p| *p == port).unwrap()] += 1;
            }
        }
        if per_pod.iter().all(|n| (8..=12).contains(n)) {
            break per_pod;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "agents did not spread: {per_pod:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = started.elapsed();
    let delivered = c.all_succeeded(0, &commands, WAIT).await;
    let shed: f64 = {
        let mut total = 0.0;
        for pod in &c.pods {
            total += pod.metric("agent_server_rebalance_closes_total").await;
        }
        total
    };
    assert!(shed >= 1.0);
    eprintln!(
        "rebalance 2 -> 4 replicas: {spread:?} (within ±20 % of 10) after {took:?}, {shed} agents moved; \
         {} commands sent meanwhile, all done {delivered:?} later; 0 lost",
        commands.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_views_on_one_replica_see_changes_made_on_another() {
    let Some(c) = cluster(2, &[]).await else {
        return;
    };
    let mut events = c
        .http
        .get(format!("{}/api/v1/events", c.pods[1].base()))
        .bearer_auth(&c.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status().as_u16(), 200);
    let started = Instant::now();
    let _agent = c.connect(0, "seen-elsewhere").await;
    let mut text = String::new();
    while !(text.contains("event: agent") && text.contains("seen-elsewhere")) {
        let chunk = tokio::time::timeout(WAIT, events.chunk())
            .await
            .expect("an event within the wait bound")
            .unwrap()
            .expect("the stream stays open");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    eprintln!(
        "live view on pod-b saw an agent connect on pod-a after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_created_on_one_replica_reaches_agents_on_both_and_is_seen_live_on_the_other() {
    let Some(c) = cluster(2, &[]).await else {
        return;
    };
    let mut events = c
        .http
        .get(format!("{}/api/v1/events", c.pods[1].base()))
        .bearer_auth(&c.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status().as_u16(), 200);
    let mut agents = Vec::new();
    for (pod, id) in [(0, "job-a1"), (0, "job-a2"), (1, "job-b1"), (1, "job-b2")] {
        let mut agent = c.connect(pod, id).await;
        agent
            .send(json!({"type": "hello", "version": "2.0.0", "os": "linux", "arch": "x86_64", "labels": ["fleet"]}))
            .await;
        agent.until_heartbeat_ack().await;
        agents.push(agent);
    }
    let started = Instant::now();
    let resp = c
        .http
        .post(format!("{}/api/v1/jobs", c.pods[0].base()))
        .bearer_auth(&c.admin)
        .json(&json!({"name": "check-disk", "target": {"labels": ["fleet"]}, "max_in_flight": 3}))
        .send()
        .await
        .unwrap();
    let (status, job) = status_json(resp).await;
    assert_eq!(status, 201, "{job}");
    assert_eq!(job["targeted"], 4);
    let id = job["id"].as_str().unwrap().to_string();
    for agent in &mut agents {
        let command = agent.recv_type("command").await;
        assert_eq!(command["name"], "check-disk");
        agent
            .result(
                command["id"].as_str().unwrap(),
                "ok",
                json!({"stdout": "ok"}),
            )
            .await;
        agent.recv_type("ack").await;
    }
    let mut done = Value::Null;
    eventually(WAIT, "the job completes", async || {
        done = c.get(1, &format!("/api/v1/jobs/{id}")).await.1;
        done["status"] == "completed"
    })
    .await;
    assert_eq!(done["counts"]["succeeded"], 4, "{done}");
    let took = started.elapsed();
    // The stream on pod-b hears of the job created on pod-a, over Redis.
    let mut text = String::new();
    while !text.contains(&format!("event: job\ndata: {{\"id\":\"{id}\"}}")) {
        let chunk = tokio::time::timeout(WAIT, events.chunk())
            .await
            .expect("a job event within the wait bound")
            .unwrap()
            .expect("the stream stays open");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    eprintln!("job on 2 replicas: 4 agents, all results stored {took:?} after the POST; 0 lost");
}
