//! shared-binaries: an agent binary uploaded through one pod downloads intact (same
//! length, same sha256) from every other pod. Any replica must serve any binary: the
//! files live on one volume every pod mounts (the chart's ReadWriteMany claim; on kind a
//! static volume on a directory every node mounts; locally one BINARY_STORAGE_PATH),
//! the metadata in the database. Each pod is reached directly, not through the ingress,
//! so that which pod answers is known rather than left to load balancing.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::*;
use crate::target::Profile;

/// Size of the uploaded file: several 64 KiB download chunks and a ragged end.
const SIZE: usize = 3 * 1024 * 1024 + 4321;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn run<C: Target>(
    target: &mut C,
    opts: &Options,
    report: &mut ScenarioReport,
) -> Result<()> {
    target.apply(&Profile::standard(opts.replicas)).await?;
    let admin = target
        .minter()
        .mint("e2e-admin", Role::Admin, Duration::from_secs(3600));
    let pods: Vec<String> = target
        .pods()
        .await?
        .into_iter()
        .filter(|p| p.ready)
        .map(|p| p.name)
        .collect();
    if pods.len() < 2 {
        bail!("sharing needs at least two ready pods, found {pods:?}");
    }

    let mut body = vec![0u8; SIZE];
    rand::rng().fill_bytes(&mut body);
    let sha256 = hex(&Sha256::digest(&body));

    let (first, others) = pods.split_first().expect("two pods");
    section(&format!("uploading {} bytes through {first}", body.len()));
    let way = target.pod_endpoint(first).await?;
    let http = way.endpoint.http_client(REQUEST_TIMEOUT);
    let name = format!("{}-shared", opts.run_id);
    let reply = http
        .post(way.endpoint.http_url(&format!(
            "/api/v1/binaries?name={name}&version=1.0.0&os=linux&arch=x86_64&notes=e2e"
        )))
        .bearer_auth(&admin)
        .header("X-Checksum-Sha256", &sha256)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(body.clone())
        .send()
        .await
        .with_context(|| format!("uploading through {first}"))?;
    let status = reply.status().as_u16();
    let text = reply.text().await.unwrap_or_default();
    if status != 201 {
        bail!("upload through {first}: status {status} (expected 201): {text}");
    }
    let meta: serde_json::Value = serde_json::from_str(&text).context("upload reply")?;
    let id = meta["id"]
        .as_str()
        .context("upload reply without an id")?
        .to_string();
    report.check(
        meta["sha256"].as_str() == Some(sha256.as_str()),
        format!(
            "the server recorded sha256 {} for a file whose sha256 is {sha256}",
            meta["sha256"]
        ),
    );
    drop(way);

    section(&format!(
        "downloading it from every other pod ({})",
        others.len()
    ));
    let mut intact = 0;
    for pod in others {
        let way = target.pod_endpoint(pod).await?;
        let http = way.endpoint.http_client(REQUEST_TIMEOUT);
        let url = way
            .endpoint
            .http_url(&format!("/api/v1/binaries/{id}/download"));
        let outcome = async {
            let reply = http.get(&url).bearer_auth(&admin).send().await?;
            let status = reply.status().as_u16();
            let header = reply
                .headers()
                .get("x-checksum-sha256")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let bytes = reply.bytes().await?;
            anyhow::Ok((status, header, bytes))
        }
        .await;
        match outcome {
            Err(e) => report.failures.push(format!("download from {pod}: {e:#}")),
            Ok((status, header, bytes)) => {
                let got = hex(&Sha256::digest(&bytes));
                let ok = status == 200 && bytes.len() == SIZE && got == sha256 && header == sha256;
                report.check(
                    ok,
                    format!(
                        "download from {pod}: status {status}, {} bytes, sha256 {got}, X-Checksum-Sha256 {header:?} (uploaded {SIZE} bytes, sha256 {sha256})",
                        bytes.len()
                    ),
                );
                if ok {
                    intact += 1;
                    println!("  {pod}: {} bytes, sha256 matches", bytes.len());
                }
            }
        }
    }
    report.figure(
        "intact downloads",
        format!("{intact}/{} pods (uploaded through {first})", others.len()),
    );

    // Leave nothing behind for later scenarios or a reused cluster.
    let way = target.pod_endpoint(&others[0]).await?;
    let http = way.endpoint.http_client(REQUEST_TIMEOUT);
    let deleted = http
        .delete(way.endpoint.http_url(&format!("/api/v1/binaries/{id}")))
        .bearer_auth(&admin)
        .send()
        .await
        .map(|r| r.status().as_u16());
    report.check(
        matches!(deleted, Ok(200 | 204)),
        format!("deleting the binary through {}: {deleted:?}", others[0]),
    );
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
