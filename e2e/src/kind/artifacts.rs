//! Logs and state saved when setup or a scenario fails, under
//! `target/e2e-artifacts/kind/<label>-<unix time>/`: what a person needs to understand a
//! failure on a CI runner whose cluster is gone afterwards.

use std::path::{Path, PathBuf};

use ::kube::Api;
use ::kube::api::LogParams;
use anyhow::Result;
use k8s_openapi::api::core::v1::Pod;

use super::command::output;
use super::{KindTarget, MINUTE, NAMESPACE, RELEASE};

/// Namespaces whose workloads are described and whose containers' logs are saved.
const NAMESPACES: &[&str] = &[
    NAMESPACE,
    "ingress-nginx",
    "kube-system",
    "local-path-storage",
];
/// Every kind of workload (and what they run on) that `describe` covers.
const WORKLOADS: &str = "deployments,statefulsets,daemonsets,replicasets,jobs,pods,hpa,pdb,ingress,services,endpointslices,pvc,networkpolicies";

impl KindTarget {
    pub(super) async fn save_artifacts(&self, label: &str) -> Result<PathBuf> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let dir = self.opts.artifacts.join(format!("{label}-{stamp}"));
        std::fs::create_dir_all(dir.join("logs"))?;
        let save = |file: &str, result: Result<String>| {
            let text = result.unwrap_or_else(|e| format!("(failed: {e:#})\n"));
            let _ = std::fs::write(dir.join(file), text);
        };
        let kubectl = |args: &[&str]| {
            let kubeconfig = self.kubeconfig.display().to_string();
            let mut all = vec!["--kubeconfig".to_string(), kubeconfig];
            all.extend(args.iter().map(|a| a.to_string()));
            async move {
                let all: Vec<&str> = all.iter().map(String::as_str).collect();
                output("kubectl", &all, 2 * MINUTE).await
            }
        };
        save(
            "resources.txt",
            kubectl(&["get", &format!("nodes,pv,{WORKLOADS}"), "-A", "-o", "wide"]).await,
        );
        save(
            "events.txt",
            kubectl(&[
                "get",
                "events",
                "-A",
                "--sort-by=.lastTimestamp",
                "-o",
                "wide",
            ])
            .await,
        );
        save("describe-nodes.txt", kubectl(&["describe", "nodes"]).await);
        save("describe-pv.txt", kubectl(&["describe", "pv"]).await);
        for ns in NAMESPACES {
            save(
                &format!("describe-{ns}.txt"),
                kubectl(&["describe", WORKLOADS, "-n", ns]).await,
            );
        }
        save("helm.txt", self.helm_state().await);
        save(
            "ingress-nginx.conf",
            kubectl(&[
                "-n",
                "ingress-nginx",
                "exec",
                "deploy/ingress-nginx-controller",
                "--",
                "cat",
                "/etc/nginx/nginx.conf",
            ])
            .await,
        );
        self.save_logs(&dir.join("logs")).await;
        // The nodes' own logs (kubelet, containerd, the API server's static pods).
        let nodes = dir.join("nodes").display().to_string();
        save(
            "kind-export-logs.txt",
            output(
                "kind",
                &["export", "logs", &nodes, "--name", &self.opts.cluster_name],
                5 * MINUTE,
            )
            .await,
        );
        Ok(dir)
    }

    /// `helm status`, `helm history` and the values in use. Helm 4 removed
    /// `status --show-resources` (its status always lists resources); Helm 3 needs it.
    async fn helm_state(&self) -> Result<String> {
        let kubeconfig = self.kubeconfig.display().to_string();
        let base = ["-n", NAMESPACE, "--kubeconfig", kubeconfig.as_str()];
        let run = |sub: &[&str]| {
            let args: Vec<String> = sub
                .iter()
                .chain(base.iter())
                .map(|a| a.to_string())
                .collect();
            async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                output("helm", &args, 2 * MINUTE).await
            }
        };
        let status = match run(&["status", RELEASE]).await {
            Ok(status) if status.contains("RESOURCES") => Ok(status),
            // Helm 3 lists resources only when asked.
            Ok(status) => Ok(run(&["status", RELEASE, "--show-resources"])
                .await
                .unwrap_or(status)),
            Err(e) => Err(e),
        };
        let mut text = String::new();
        for (title, result) in [
            ("helm status", status),
            ("helm history", run(&["history", RELEASE]).await),
            (
                "helm get values --all",
                run(&["get", "values", RELEASE, "--all"]).await,
            ),
        ] {
            let body = result.unwrap_or_else(|e| format!("(failed: {e:#})\n"));
            // The values hold the run's secret key, which dies with the cluster; still,
            // keep it out of files CI uploads.
            let body = body.replace(&self.secret, "<secret key>");
            text.push_str(&format!("=== {title}\n{body}\n"));
        }
        Ok(text)
    }

    /// Every container's log (init containers included) in [`NAMESPACES`], and the
    /// previous container's after a restart.
    async fn save_logs(&self, dir: &Path) {
        for ns in NAMESPACES {
            let api = Api::<Pod>::namespaced(self.client(), ns);
            let Ok(pods) = api.list(&Default::default()).await else {
                continue;
            };
            for pod in pods {
                let name = pod.metadata.name.clone().unwrap_or_default();
                let status = pod.status.unwrap_or_default();
                let containers = status
                    .init_container_statuses
                    .unwrap_or_default()
                    .into_iter()
                    .chain(status.container_statuses.unwrap_or_default());
                for container in containers {
                    let mut params = LogParams {
                        container: Some(container.name.clone()),
                        ..Default::default()
                    };
                    let log = api
                        .logs(&name, &params)
                        .await
                        .unwrap_or_else(|e| format!("(failed: {e})\n"));
                    let _ = std::fs::write(
                        dir.join(format!("{ns}_{name}_{}.log", container.name)),
                        log,
                    );
                    if container.restart_count > 0 {
                        params.previous = true;
                        let log = api
                            .logs(&name, &params)
                            .await
                            .unwrap_or_else(|e| format!("(failed: {e})\n"));
                        let _ = std::fs::write(
                            dir.join(format!("{ns}_{name}_{}.previous.log", container.name)),
                            log,
                        );
                    }
                }
            }
        }
    }
}
