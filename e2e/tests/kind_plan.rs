//! The kind target's setup sequence, reviewed like code: `e2e kind --plan` (which runs
//! nothing) must print exactly `tests/snapshots/kind-plan.txt`. A change to the setup
//! shows up here as a diff to review; `UPDATE_SNAPSHOTS=1 cargo test -p e2e --test
//! kind_plan` rewrites the snapshot after such a change.

use std::path::{Path, PathBuf};

use e2e::kind::{KindOptions, plan};

/// The options `just e2e --http-port 38080` runs with (the port is fixed so the plan is
/// the same on every machine; unset, a free one is picked).
fn options(repo: &Path) -> KindOptions {
    KindOptions {
        repo: repo.to_path_buf(),
        cluster_name: "agent-server-e2e".into(),
        artifacts: repo.join("target/e2e-artifacts/kind"),
        shared_dir: repo.join("target/e2e-kind-shared"),
        skip_build: false,
        replicas: 3,
        http_port: Some(38080),
        keep: false,
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e lives in the workspace")
        .to_path_buf()
}

#[tokio::test]
async fn the_kind_plan_is_the_reviewed_one() {
    let repo = repo();
    let plan = plan(options(&repo))
        .await
        .expect("the plan needs no Docker");
    let snapshot = repo.join("e2e/tests/snapshots/kind-plan.txt");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&snapshot, &plan).unwrap();
        return;
    }
    let reviewed = std::fs::read_to_string(&snapshot).unwrap_or_default();
    if plan != reviewed {
        let first = plan
            .lines()
            .zip(reviewed.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| plan.lines().count().min(reviewed.lines().count()));
        panic!(
            "the kind plan differs from {} from line {}:\n  now:      {:?}\n  reviewed: {:?}\nreview the change and regenerate with UPDATE_SNAPSHOTS=1 cargo test -p e2e --test kind_plan",
            snapshot.display(),
            first + 1,
            plan.lines().nth(first).unwrap_or("(end)"),
            reviewed.lines().nth(first).unwrap_or("(end)"),
        );
    }
}

#[tokio::test]
async fn the_plan_holds_every_fix_of_the_first_real_run() {
    let plan = plan(options(&repo())).await.unwrap();
    let position = |needle: &str| {
        plan.find(needle)
            .unwrap_or_else(|| panic!("the plan lacks {needle:?}:\n{plan}"))
    };
    // The image reaches the local store whatever the builder.
    position("docker build --load -t agent-server:e2e .");
    // Every kind command uses the run's own kubeconfig.
    position(
        "kind create cluster --name agent-server-e2e --config target/e2e-artifacts/kind/kind-config.yaml --kubeconfig target/e2e-artifacts/kind/kubeconfig",
    );
    position(
        "kind delete cluster --name agent-server-e2e --kubeconfig target/e2e-artifacts/kind/kubeconfig",
    );
    // One host port, the one asked for; nothing on 443.
    position("hostPort: 38080");
    assert!(!plan.contains("443"), "no unused port 443");
    // The node image by digest; the last ingress-nginx release.
    position("image: kindest/node:v1.35.0@sha256:");
    position("ingress-nginx/controller-v1.15.1/deploy/static/provider/kind/deploy.yaml");
    // The controller is pinned to the mapped node before anything waits on HTTP.
    let pin =
        position(r#"{"spec":{"template":{"spec":{"nodeSelector":{"ingress-ready":"true"}}}}}"#);
    let placed = position("the controller's pods all on the node labelled ingress-ready=true");
    let health = position("GET http://127.0.0.1:38080/health");
    assert!(pin < placed && placed < health);
    // metrics-server is patched, never replaced.
    position(
        r#""op":"add","path":"/spec/template/spec/containers/0/args/-","value":"--kubelet-insecure-tls""#,
    );
    // The chart gets the shared ReadWriteMany claim.
    position("accessModes: [ReadWriteMany]");
    position("existingClaim: agent-server-binaries");
    // The generated secret never appears; a placeholder does.
    position("secretKey: <64 hex characters, generated per run>");
}
