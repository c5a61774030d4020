//! Credentials below the HTTP layer, on SQLite and on PostgreSQL: standard JWTs checked
//! against tokens minted by another implementation, revocation (also across two
//! replicas' caches over a real Redis), enrollment with enroll secrets, the audit log.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_server::audit::{Actor, AuditAction, AuditPruner, AuditQuery, RequestContext};
use agent_server::auth::{AuthError, ClaimProblem, MintOptions, Revoked, Role, Tokens};
use agent_server::config::{DatabaseUrl, RedisConfig, Secret};
use agent_server::credentials::{
    CredentialError, Credentials, EnrollError, EnrollRequest, MintRequest, NewEnrollSecret,
    RateLimiter, RevocationBus, TokenListQuery,
};
use agent_server::hub::Hub;
use agent_server::metrics::Metrics;
use agent_server::store::{EnrollSecretRow, PoolSettings, Store, now_ms};
use agent_server::ws::protocol;
use jsonwebtoken::Algorithm;
use serde_json::Value;

use crate::helpers::{SECRET, TestDb, WAIT, postgres_db};

/// A store on a fresh database and the credentials of one replica using it.
struct Env {
    store: Store,
    hub: Hub,
    creds: Credentials,
    _db: Db,
}

#[allow(dead_code)]
enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(TestDb),
}

fn tokens() -> Tokens {
    Tokens::new(&Secret::new(SECRET), Algorithm::HS256)
}

impl Env {
    async fn new(backend: &str) -> Option<Env> {
        let (store, db) = match backend {
            "sqlite" => {
                let dir = tempfile::tempdir().unwrap();
                let url = DatabaseUrl::Sqlite(dir.path().join("creds.db"));
                (
                    Store::open(&url, PoolSettings::sized(4)).unwrap(),
                    Db::Sqlite(dir),
                )
            }
            _ => {
                let (url, db) = postgres_db()?;
                let url = DatabaseUrl::Postgres(Secret::new(url));
                (
                    Store::open(&url, PoolSettings::sized(4)).unwrap(),
                    Db::Postgres(db),
                )
            }
        };
        let hub = Hub::new(Arc::new(Metrics::new()), None);
        let creds = Credentials::new(store.clone(), tokens(), hub.clone(), None);
        Some(Env {
            store,
            hub,
            creds,
            _db: db,
        })
    }

    /// Another replica on the same database, with its own cache and hub.
    fn replica(&self, bus: Option<Arc<RevocationBus>>) -> (Hub, Credentials) {
        let hub = Hub::new(Arc::new(Metrics::new()), None);
        let creds = Credentials::new(self.store.clone(), tokens(), hub.clone(), bus);
        (hub, creds)
    }
}

macro_rules! on_both_stores {
    ($($scenario:ident;)*) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                if let Some(env) = super::Env::new("sqlite").await {
                    super::$scenario(env).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(env) = super::Env::new("postgres").await {
                    super::$scenario(env).await;
                }
            }
        }
    )*};
}

on_both_stores! {
    deleting_an_agent_invalidates_its_old_token_and_enrollment_issues_a_working_one;
    revoking_an_agent_refuses_its_tokens_and_closes_its_session_with_4002;
    revoked_api_token_is_refused_listed_as_inactive_and_its_last_use_is_batched;
    enrollment_creates_the_agent_with_the_secret_labels_and_a_recorded_token;
    enrollment_refusals_each_say_why_and_write_nothing;
    concurrent_enrollments_never_exceed_max_uses;
    audit_log_records_each_action_pages_newest_first_and_prunes_by_age;
}

fn admin() -> RequestContext {
    RequestContext {
        actor: Actor::Token {
            subject: "ops".into(),
            jti: Some("jti-ops".into()),
        },
        source: Some("192.0.2.10".parse().unwrap()),
    }
}

fn source() -> IpAddr {
    "198.51.100.20".parse().unwrap()
}

fn enroll_request(secret: &str, client_id: &str) -> EnrollRequest {
    EnrollRequest {
        secret: secret.into(),
        client_id: client_id.into(),
        hostname: Some(format!("{client_id}.example.com")),
    }
}

fn revoked(e: CredentialError) -> Revoked {
    match e {
        CredentialError::Auth(AuthError::Revoked(r)) => r,
        other => panic!("expected a revocation, got {other:?}"),
    }
}

async fn deleting_an_agent_invalidates_its_old_token_and_enrollment_issues_a_working_one(env: Env) {
    let issued = env
        .creds
        .mint_token(
            &admin(),
            MintRequest {
                client_id: "web-7".into(),
                role: None,
                ttl_seconds: None,
                name: Some("web-7 bootstrap".into()),
            },
        )
        .await
        .unwrap();
    // A bootstrap token from the CLI: no jti, no generation.
    let offline = tokens().mint("web-7", Role::Agent, Duration::from_secs(600));
    env.creds.authenticate(&issued.token).await.unwrap();
    env.creds.authenticate(&offline).await.unwrap();

    env.creds.delete_agent(&admin(), "web-7").await.unwrap();
    assert!(!env.store.agent_exists("web-7".into()).await.unwrap());
    for old in [&issued.token, &offline] {
        let r = revoked(env.creds.authenticate(old).await.unwrap_err());
        assert_eq!(
            r,
            Revoked::AgentGeneration {
                client_id: "web-7".into()
            }
        );
        assert!(r.to_string().contains("enroll again"), "{r}");
    }
    // Another replica, with a cold cache, reads the same from the database.
    let (_, other) = env.replica(None);
    assert!(other.authenticate(&offline).await.is_err());

    let secret = env
        .creds
        .create_enroll_secret(
            &admin(),
            NewEnrollSecret {
                name: "web".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let enrolled = env
        .creds
        .enroll(source(), enroll_request(&secret.secret, "web-7"))
        .await
        .unwrap();
    let claims = env.creds.authenticate(&enrolled.token).await.unwrap();
    assert_eq!((claims.sub.as_str(), claims.generation()), ("web-7", 1));
    assert!(
        env.creds.authenticate(&offline).await.is_err(),
        "still refused"
    );
    assert!(matches!(
        env.creds
            .delete_agent(&admin(), "nobody")
            .await
            .unwrap_err(),
        CredentialError::NotFound { .. }
    ));
}

async fn revoking_an_agent_refuses_its_tokens_and_closes_its_session_with_4002(env: Env) {
    let token = env
        .creds
        .mint_token(
            &admin(),
            MintRequest {
                client_id: "db-1".into(),
                role: None,
                ttl_seconds: Some(600),
                name: None,
            },
        )
        .await
        .unwrap()
        .token;
    let claims = env.creds.authenticate(&token).await.unwrap();
    let session = env.hub.register("db-1", 1, now_ms()).unwrap();
    assert_eq!(env.creds.must_close(&claims), None);

    let generation = env.creds.revoke_agent(&admin(), "db-1").await.unwrap();
    assert_eq!(generation, 1);
    let close = tokio::time::timeout(WAIT, session.closing()).await.unwrap();
    assert_eq!(close, protocol::REVOKED);
    assert_eq!(close.code, 4002);
    assert!(
        env.creds.must_close(&claims).is_some(),
        "the session's own check agrees"
    );
    revoked(env.creds.authenticate(&token).await.unwrap_err());
    assert!(
        env.store.agent_exists("db-1".into()).await.unwrap(),
        "revoking keeps the agent"
    );
    // A token minted now carries the new generation and works.
    let fresh = env
        .creds
        .mint_token(
            &admin(),
            MintRequest {
                client_id: "db-1".into(),
                role: None,
                ttl_seconds: None,
                name: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        env.creds
            .authenticate(&fresh.token)
            .await
            .unwrap()
            .generation(),
        1
    );
}

async fn revoked_api_token_is_refused_listed_as_inactive_and_its_last_use_is_batched(env: Env) {
    let issued = env
        .creds
        .mint_token(
            &admin(),
            MintRequest {
                client_id: "ci".into(),
                role: Some(Role::Admin),
                ttl_seconds: Some(3600),
                name: Some("CI pipeline".into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(issued.record.role, "admin");
    assert!(issued.record.expires_at > now_ms() + 3_500_000);
    for _ in 0..5 {
        env.creds.authenticate(&issued.token).await.unwrap();
    }
    let listed = env
        .creds
        .list_tokens(TokenListQuery::default())
        .await
        .unwrap();
    assert_eq!(listed.tokens.len(), 1);
    assert_eq!(listed.tokens[0].name.as_deref(), Some("CI pipeline"));
    assert_eq!(listed.tokens[0].last_used_at, None, "no write per request");
    let flushed = env
        .creds
        .last_used_flusher(Duration::from_secs(30))
        .flush()
        .await
        .unwrap();
    assert_eq!(flushed, 1, "five uses, one write");
    let record = env
        .store
        .get_api_token(issued.record.jti.clone())
        .await
        .unwrap()
        .unwrap();
    assert!(record.last_used_at.is_some());

    env.creds
        .revoke_token(&admin(), &issued.record.jti)
        .await
        .unwrap();
    let r = revoked(env.creds.authenticate(&issued.token).await.unwrap_err());
    assert_eq!(
        r,
        Revoked::TokenRevoked {
            jti: issued.record.jti.clone()
        }
    );
    let (_, other) = env.replica(None);
    revoked(other.authenticate(&issued.token).await.unwrap_err());
    assert!(
        env.creds
            .list_tokens(TokenListQuery::default())
            .await
            .unwrap()
            .tokens
            .is_empty()
    );
    let all = env
        .creds
        .list_tokens(TokenListQuery {
            include_inactive: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(all.tokens[0].revoked_at.is_some());
    assert!(matches!(
        env.creds
            .revoke_token(&admin(), "no-such-jti")
            .await
            .unwrap_err(),
        CredentialError::NotFound { what: "token", .. }
    ));
    let e = env
        .creds
        .mint_token(
            &admin(),
            MintRequest {
                client_id: "x".into(),
                role: None,
                ttl_seconds: Some(u64::MAX),
                name: None,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            CredentialError::Invalid {
                field: "ttl_seconds",
                ..
            }
        ),
        "{e:?}"
    );
}

async fn enrollment_creates_the_agent_with_the_secret_labels_and_a_recorded_token(env: Env) {
    let created = env
        .creds
        .create_enroll_secret(
            &admin(),
            NewEnrollSecret {
                name: "eu canaries".into(),
                labels: vec!["region:eu".into(), "canary".into()],
                expires_in_seconds: Some(3600),
                max_uses: Some(2),
                allow_reenroll: false,
            },
        )
        .await
        .unwrap();
    assert!(created.secret.len() >= 64);
    assert!(!created.record.secret_sha256.contains(&created.secret));

    let enrolled = env
        .creds
        .enroll(source(), enroll_request(&created.secret, "host-eu-1"))
        .await
        .unwrap();
    assert_eq!(enrolled.client_id, "host-eu-1");
    assert_eq!(enrolled.labels, ["canary", "region:eu"]);
    assert!(enrolled.expires_at_ms > now_ms() + 29 * 86_400_000);
    let claims = env.creds.authenticate(&enrolled.token).await.unwrap();
    assert_eq!(
        (claims.role, claims.sub.as_str()),
        (Role::Agent, "host-eu-1")
    );
    let jti = claims.jti.clone().expect("enrolled tokens carry a jti");

    let (agent, _) = env
        .store
        .get_agent("host-eu-1".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(agent.hostname.as_deref(), Some("host-eu-1.example.com"));
    assert_eq!(
        env.store.agent_labels("host-eu-1".into()).await.unwrap(),
        ["canary", "region:eu"]
    );
    let record = env.store.get_api_token(jti).await.unwrap().unwrap();
    assert_eq!(record.subject, "host-eu-1");
    assert_eq!(record.name.as_deref(), Some("enrolled with eu canaries"));
    let secrets = env.creds.list_enroll_secrets(None, None).await.unwrap();
    assert_eq!(secrets[0].use_count, 1);
}

async fn enrollment_refusals_each_say_why_and_write_nothing(env: Env) {
    let secret = |name: &str, max_uses, allow_reenroll| NewEnrollSecret {
        name: name.into(),
        labels: vec![],
        expires_in_seconds: None,
        max_uses,
        allow_reenroll,
    };
    let once = env
        .creds
        .create_enroll_secret(&admin(), secret("once", Some(1), false))
        .await
        .unwrap();
    env.creds
        .enroll(source(), enroll_request(&once.secret, "a-1"))
        .await
        .unwrap();
    let e = env
        .creds
        .enroll(source(), enroll_request(&once.secret, "a-2"))
        .await
        .unwrap_err();
    assert!(matches!(e, EnrollError::UsedUp), "{e:?}");
    assert!(e.to_string().contains("max_uses"));

    let reusable = env
        .creds
        .create_enroll_secret(&admin(), secret("fleet", None, false))
        .await
        .unwrap();
    let e = env
        .creds
        .enroll(source(), enroll_request(&reusable.secret, "a-1"))
        .await
        .unwrap_err();
    assert!(matches!(e, EnrollError::AlreadyEnrolled { .. }), "{e:?}");
    let uses = |secrets: Vec<EnrollSecretRow>, id: &str| {
        secrets.into_iter().find(|s| s.id == id).unwrap().use_count
    };
    assert_eq!(
        uses(
            env.creds.list_enroll_secrets(None, None).await.unwrap(),
            &reusable.record.id
        ),
        0,
        "a refusal uses nothing"
    );

    // A secret that allows re-enrollment replaces the client id's credentials.
    let again = env
        .creds
        .create_enroll_secret(&admin(), secret("re", None, true))
        .await
        .unwrap();
    let first = env
        .creds
        .enroll(source(), enroll_request(&again.secret, "b-1"))
        .await
        .unwrap();
    let second = env
        .creds
        .enroll(source(), enroll_request(&again.secret, "b-1"))
        .await
        .unwrap();
    revoked(env.creds.authenticate(&first.token).await.unwrap_err());
    env.creds.authenticate(&second.token).await.unwrap();

    env.creds
        .revoke_enroll_secret(&admin(), &reusable.record.id)
        .await
        .unwrap();
    let e = env
        .creds
        .enroll(source(), enroll_request(&reusable.secret, "c-1"))
        .await
        .unwrap_err();
    assert!(matches!(e, EnrollError::Revoked), "{e:?}");

    let expired = "agent-enroll-expired-secret";
    env.store
        .insert_enroll_secret(EnrollSecretRow {
            id: "expired".into(),
            name: "old".into(),
            secret_sha256: sha256_hex(expired),
            labels: "[]".into(),
            allow_reenroll: false,
            created_at: now_ms() - 7_200_000,
            expires_at: Some(now_ms() - 3_600_000),
            max_uses: None,
            use_count: 0,
            last_used_at: None,
            revoked_at: None,
        })
        .await
        .unwrap();
    let e = env
        .creds
        .enroll(source(), enroll_request(expired, "c-1"))
        .await
        .unwrap_err();
    assert!(matches!(e, EnrollError::Expired), "{e:?}");
    let e = env
        .creds
        .enroll(source(), enroll_request("agent-enroll-guessed", "c-1"))
        .await
        .unwrap_err();
    assert!(matches!(e, EnrollError::UnknownSecret), "{e:?}");
    let e = env
        .creds
        .enroll(source(), enroll_request(&again.secret, "bad/id"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            EnrollError::Invalid {
                field: "client_id",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(!env.store.agent_exists("c-1".into()).await.unwrap());

    // Guessing is slowed down per source address.
    let limited = env
        .creds
        .clone()
        .with_enroll_limiter(RateLimiter::new(2, 0.01, 100));
    for _ in 0..2 {
        let _ = limited
            .enroll(source(), enroll_request("guess", "d-1"))
            .await;
    }
    let e = limited
        .enroll(source(), enroll_request("guess", "d-1"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, EnrollError::RateLimited { retry_after_secs } if retry_after_secs >= 1),
        "{e:?}"
    );
    let elsewhere: IpAddr = "203.0.113.5".parse().unwrap();
    assert!(matches!(
        limited
            .enroll(elsewhere, enroll_request("guess", "d-1"))
            .await
            .unwrap_err(),
        EnrollError::UnknownSecret
    ));
}

async fn concurrent_enrollments_never_exceed_max_uses(env: Env) {
    let created = env
        .creds
        .create_enroll_secret(
            &admin(),
            NewEnrollSecret {
                name: "three".into(),
                max_uses: Some(3),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // Two replicas (two caches, one database), ten agents at once.
    let (_, other) = env.replica(None);
    let attempts = (0..10).map(|i| {
        let creds = if i % 2 == 0 {
            env.creds.clone()
        } else {
            other.clone()
        };
        let secret = created.secret.clone();
        tokio::spawn(async move {
            creds
                .enroll(source(), enroll_request(&secret, &format!("race-{i}")))
                .await
        })
    });
    let mut ok = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok(_) => ok += 1,
            Err(EnrollError::UsedUp) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(ok, 3);
    assert_eq!(
        env.creds.list_enroll_secrets(None, None).await.unwrap()[0].use_count,
        3
    );
}

async fn audit_log_records_each_action_pages_newest_first_and_prunes_by_age(env: Env) {
    let issued = env
        .creds
        .mint_token(
            &admin(),
            MintRequest {
                client_id: "h-1".into(),
                role: None,
                ttl_seconds: None,
                name: None,
            },
        )
        .await
        .unwrap();
    env.creds
        .revoke_token(&admin(), &issued.record.jti)
        .await
        .unwrap();
    let secret = env
        .creds
        .create_enroll_secret(
            &admin(),
            NewEnrollSecret {
                name: "s".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    env.creds
        .enroll(source(), enroll_request(&secret.secret, "h-2"))
        .await
        .unwrap();
    env.creds.revoke_agent(&admin(), "h-2").await.unwrap();
    env.creds.delete_agent(&admin(), "h-1").await.unwrap();
    env.creds
        .revoke_enroll_secret(&admin(), &secret.record.id)
        .await
        .unwrap();

    let audit = env.creds.audit();
    let page = audit.query(AuditQuery::default()).await.unwrap();
    let actions: Vec<&str> = page.entries.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "enroll_secret_revoked",
            "agent_deleted",
            "agent_revoked",
            "enroll_secret_used",
            "enroll_secret_created",
            "token_revoked",
            "token_minted",
        ]
    );
    let minted = page.entries.last().unwrap();
    assert_eq!(
        (minted.actor_kind.as_str(), minted.actor.as_str()),
        ("token", "ops")
    );
    assert_eq!(minted.actor_jti.as_deref(), Some("jti-ops"));
    assert_eq!(minted.source.as_deref(), Some("192.0.2.10"));
    assert_eq!(minted.target.as_deref(), Some(issued.record.jti.as_str()));
    let detail: Value = serde_json::from_str(minted.detail.as_deref().unwrap()).unwrap();
    assert_eq!(detail["subject"], "h-1");
    assert!(
        !minted.detail.as_deref().unwrap().contains(&issued.token),
        "never the token"
    );
    let used = &page.entries[3];
    assert_eq!(
        (used.actor_kind.as_str(), used.actor.as_str()),
        ("enroll_secret", secret.record.id.as_str())
    );
    assert_eq!(used.source.as_deref(), Some("198.51.100.20"));
    assert!(
        !used.detail.as_deref().unwrap().contains(&secret.secret),
        "never the secret"
    );

    // Filters and keyset pages.
    let by_action = audit
        .query(AuditQuery {
            action: Some(AuditAction::AgentRevoked),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_action.entries.len(), 1);
    let by_actor = audit
        .query(AuditQuery {
            actor: Some("ops".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_actor.entries.len(), 6);
    let first = audit
        .query(AuditQuery {
            limit: Some(4),
            ..Default::default()
        })
        .await
        .unwrap();
    let second = audit
        .query(AuditQuery {
            limit: Some(4),
            after: first.next,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(first.entries.len() + second.entries.len(), 7);
    assert!(second.next.is_none());
    assert!(first.entries.last().unwrap().id > second.entries[0].id);
    assert!(
        audit
            .query(AuditQuery {
                limit: Some(0),
                ..Default::default()
            })
            .await
            .is_err()
    );

    // Pruning removes entries past the retention only.
    let pruner = AuditPruner::new(env.store.clone(), Duration::from_secs(86_400));
    assert_eq!(pruner.prune(now_ms()).await.unwrap(), 0);
    assert_eq!(pruner.prune(now_ms() + 2 * 86_400_000).await.unwrap(), 7);
    assert!(
        audit
            .query(AuditQuery::default())
            .await
            .unwrap()
            .entries
            .is_empty()
    );
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Tokens minted by PyJWT (tests/fixtures/jwt/mint.py), each with the check it must
/// pass or fail.
#[test]
fn tokens_minted_by_another_implementation_are_accepted_or_refused_for_the_right_reason() {
    let fixtures: Value =
        serde_json::from_str(include_str!("../fixtures/jwt/pyjwt_tokens.json")).unwrap();
    let key = Secret::new(fixtures["key"].as_str().unwrap());
    let previous = Secret::new(fixtures["previous_key"].as_str().unwrap());
    let plain = Tokens::new(&key, Algorithm::HS256);
    let rotating = Tokens::with_rotation(
        &key,
        Some(&previous),
        Algorithm::HS256,
        Duration::from_secs(5),
    );
    let cases = fixtures["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for case in cases {
        let (name, token, expect) = (
            case["name"].as_str().unwrap(),
            case["token"].as_str().unwrap(),
            case["expect"].as_str().unwrap(),
        );
        let outcome = plain.verify(token);
        if let Err(e) = &outcome {
            assert!(
                !e.to_string().contains(token),
                "{name}: the message echoes the token"
            );
        }
        match expect {
            "ok" => {
                let c = outcome.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(c.sub, "web-7", "{name}");
                assert!(rotating.verify(token).is_ok(), "{name} during a rotation");
            }
            "ok_during_rotation" => {
                assert_eq!(outcome.unwrap_err(), AuthError::BadSignature, "{name}");
                assert!(rotating.verify(token).is_ok(), "{name}");
            }
            "expired" => assert!(
                matches!(outcome, Err(AuthError::Expired { exp: 1000000000 })),
                "{name}: {outcome:?}"
            ),
            "not_yet_valid" => assert!(
                matches!(outcome, Err(AuthError::NotYetValid { nbf: 4000000000 })),
                "{name}: {outcome:?}"
            ),
            "algorithm" => assert_eq!(
                outcome.unwrap_err(),
                AuthError::WrongAlgorithm(Algorithm::HS256),
                "{name}"
            ),
            "signature" => {
                assert_eq!(outcome.unwrap_err(), AuthError::BadSignature, "{name}");
                assert_eq!(
                    rotating.verify(token).unwrap_err(),
                    AuthError::BadSignature,
                    "{name}"
                );
            }
            claim => {
                let claim = claim.strip_prefix("claim:").unwrap();
                match outcome {
                    Err(AuthError::Claim { claim: c, problem }) => {
                        assert_eq!(c, claim, "{name}");
                        assert_ne!(problem, ClaimProblem::Empty, "{name}");
                    }
                    other => panic!("{name}: expected a `{claim}` claim error, got {other:?}"),
                }
            }
        }
    }
    let with_jti = cases
        .iter()
        .find(|c| c["name"] == "jti_and_generation")
        .unwrap();
    let c = plain.verify(with_jti["token"].as_str().unwrap()).unwrap();
    assert_eq!(
        (c.jti.as_deref(), c.generation()),
        (Some("0193c2a0-0000-7000-8000-000000000001"), 2)
    );
}

#[test]
fn rotation_window_accepts_old_tokens_signs_new_ones_with_the_new_key_and_ends_cleanly() {
    let old = Secret::new("rotation-old-key-0123456789abcdef0123");
    let new = Secret::new("rotation-new-key-0123456789abcdef0123");
    let before =
        Tokens::new(&old, Algorithm::HS256).mint("h", Role::Agent, Duration::from_secs(600));
    // Step 2: every replica runs with SECRET_KEY=new, SECRET_KEY_PREVIOUS=old.
    let during = Tokens::with_rotation(&new, Some(&old), Algorithm::HS256, Duration::from_secs(5));
    assert!(during.verify(&before).is_ok());
    let minted = during.mint_with(
        "h",
        Role::Agent,
        Duration::from_secs(600),
        MintOptions::default(),
    );
    // A replica not yet restarted (old key only) cannot read new tokens: restart all first.
    assert_eq!(
        Tokens::new(&old, Algorithm::HS256)
            .verify(&minted.token)
            .unwrap_err(),
        AuthError::BadSignature
    );
    // Step 4: SECRET_KEY_PREVIOUS removed; old tokens are refused, new ones still work.
    let after = Tokens::new(&new, Algorithm::HS256);
    assert!(after.verify(&minted.token).is_ok());
    assert_eq!(after.verify(&before).unwrap_err(), AuthError::BadSignature);
}

/// Redis at REDIS_URL's host:port (default 127.0.0.1:6379), or `None` (a loud skip
/// outside CI).
async fn redis_config(prefix: &str) -> Option<RedisConfig> {
    let addr = std::env::var("TEST_REDIS_ADDR").unwrap_or_else(|_| "127.0.0.1:6379".into());
    match tokio::net::TcpStream::connect(&addr).await {
        Ok(_) => {}
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: Redis not reachable at {addr} ({e}); set TEST_REDIS_ADDR");
            return None;
        }
        Err(e) => panic!("Redis at {addr}: {e}"),
    }
    let (host, port) = addr.rsplit_once(':').unwrap();
    Some(RedisConfig {
        target: agent_server::config::RedisTarget::Direct {
            host: host.into(),
            port: port.parse().unwrap(),
        },
        db: 0,
        username: None,
        password: None,
        tls: false,
        tls_ca: None,
        key_prefix: prefix.into(),
    })
}

/// Two replicas on one database, each with its own cache and hub, joined by a real
/// Redis pub/sub: what one revokes, the other refuses within a second although its
/// cache had just said yes, and its live session is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_the_other_replicas_cache_and_session_within_a_second() {
    let prefix = format!("creds-it-{}:", uuid::Uuid::new_v4().simple());
    let Some(redis) = redis_config(&prefix).await else {
        return;
    };
    let env = Env::new("sqlite").await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut replicas = Vec::new();
    for pod in ["pod-a", "pod-b"] {
        let bus = Arc::new(RevocationBus::new(&redis, pod.into()).unwrap());
        let (hub, creds) = env.replica(Some(bus.clone()));
        let subscribed = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(bus.subscribe_until(creds.clone(), stop.clone(), Some(subscribed.clone())));
        tokio::time::timeout(WAIT, subscribed.notified())
            .await
            .expect("subscribed to Redis");
        replicas.push((hub, creds));
    }
    let [(_, a), (hub_b, b)] = &replicas[..] else {
        unreachable!()
    };

    let agent = a
        .mint_token(
            &admin(),
            MintRequest {
                client_id: "edge-1".into(),
                role: None,
                ttl_seconds: None,
                name: None,
            },
        )
        .await
        .unwrap();
    let ci = a
        .mint_token(
            &admin(),
            MintRequest {
                client_id: "ci".into(),
                role: Some(Role::Admin),
                ttl_seconds: None,
                name: None,
            },
        )
        .await
        .unwrap();
    // Replica B has both in its cache now.
    b.authenticate(&agent.token).await.unwrap();
    b.authenticate(&ci.token).await.unwrap();
    let session = hub_b.register("edge-1", 1, now_ms()).unwrap();

    let started = Instant::now();
    a.revoke_token(&admin(), &ci.record.jti).await.unwrap();
    a.revoke_agent(&admin(), "edge-1").await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(1), session.closing())
        .await
        .expect("closed within a second");
    assert_eq!(closed, protocol::REVOKED);
    let deadline = started + Duration::from_secs(1);
    loop {
        let agent_refused = b.authenticate(&agent.token).await.is_err();
        let ci_refused = b.authenticate(&ci.token).await.is_err();
        if agent_refused && ci_refused {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica B still accepts a revoked token after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
}

#[test]
fn cli_refuses_a_token_lifetime_that_would_overflow_with_a_message() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agent-server"))
        .args([
            "token",
            "--sub",
            "a",
            "--role",
            "agent",
            "--ttl",
            "18446744073709551615",
        ])
        .env("DATA_DIR", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--ttl") && stderr.contains("10 years"),
        "{stderr}"
    );
}
