//! `/api/v1/binaries`: uploads to the storage volume, downloads with ranges, deletes.

use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::helpers::*;

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn storage(app: &TestApp) -> PathBuf {
    app.config.binary_storage_path.clone()
}

/// Names in the storage directory, sorted.
fn stored_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A deterministic 300 KiB body, so downloads span several chunks.
fn build(seed: u8) -> Vec<u8> {
    (0..300 * 1024u32)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const QUERY: &str = "name=agent&version=2.5.0&os=linux&arch=x86_64&notes=fixes%20the%20leak";

async fn upload_is_stored_under_its_sha256_with_metadata_in_the_database(app: TestApp) {
    let body = build(1);
    let sha = sha256_hex(&body);
    let resp = app
        .http
        .post(app.url(&format!("/api/v1/binaries?{QUERY}")))
        .bearer_auth(&app.admin)
        .header("x-checksum-sha256", &sha)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let (status, created) = status_json(resp).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        (
            created["name"].as_str(),
            created["version"].as_str(),
            created["os"].as_str(),
            created["arch"].as_str(),
            created["notes"].as_str(),
        ),
        (
            Some("agent"),
            Some("2.5.0"),
            Some("linux"),
            Some("x86_64"),
            Some("fixes the leak")
        )
    );
    assert_eq!(created["size_bytes"], body.len());
    assert_eq!(created["sha256"], sha.as_str());
    assert_eq!(
        stored_files(&storage(&app)),
        vec![sha.clone()],
        "one file, named by its checksum, no temporary left"
    );
    assert_eq!(std::fs::read(storage(&app).join(&sha)).unwrap(), body);

    let (status, fetched) = app.get(&location).await;
    assert_eq!((status, &fetched["sha256"]), (200, &json!(sha)));
    let (_, listed) = app.get("/api/v1/binaries?os=linux&arch=x86_64").await;
    assert_eq!(listed["binaries"][0]["id"], created["id"]);
    let (_, none) = app.get("/api/v1/binaries?os=windows").await;
    assert_eq!(none["binaries"], json!([]));
}

async fn download_streams_the_file_with_length_etag_checksum_and_ranges(app: TestApp) {
    let body = build(2);
    let sha = sha256_hex(&body);
    let (_, created) = app.upload(QUERY, body.clone()).await;
    let url = app.url(created["download_url"].as_str().unwrap());
    // Agents download with their own token.
    let token = app.agent_token("web-1");

    let resp = app.http.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["content-length"], body.len().to_string().as_str());
    assert_eq!(h["etag"], format!("\"{sha}\"").as_str());
    assert_eq!(h["x-checksum-sha256"], sha.as_str());
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(h["content-type"], "application/octet-stream");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), body.as_slice());

    let range = |spec: &'static str| {
        app.http
            .get(&url)
            .bearer_auth(&token)
            .header("range", spec)
            .send()
    };
    let resp = range("bytes=100000-100099").await.unwrap();
    assert_eq!(resp.status().as_u16(), 206);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 100000-100099/{}", body.len()).as_str()
    );
    assert_eq!(resp.headers()["content-length"], "100");
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        &body[100_000..100_100]
    );

    // Resuming a cut download: everything from an offset.
    let resp = range("bytes=200000-").await.unwrap();
    assert_eq!(resp.status().as_u16(), 206);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &body[200_000..]);
    let resp = range("bytes=-10").await.unwrap();
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        &body[body.len() - 10..]
    );

    let resp = range("bytes=999999999-").await.unwrap();
    assert_eq!(resp.status().as_u16(), 416);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes */{}", body.len()).as_str()
    );

    // A range for another version of the file is ignored: the whole new file comes back.
    let resp = app
        .http
        .get(&url)
        .bearer_auth(&token)
        .header("range", "bytes=0-9")
        .header("if-range", "\"something-else\"")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);

    let resp = app
        .http
        .get(&url)
        .bearer_auth(&token)
        .header("if-none-match", format!("\"{sha}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 304);

    let resp = app
        .http
        .head(&url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["content-length"],
        body.len().to_string().as_str()
    );

    let resp = app.http.get(&url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401, "a token is required");
}

async fn another_replica_serves_a_binary_right_after_the_upload(app: TestApp) {
    let other = app.spawn_replica("pod-other").await;
    let body = build(3);
    let (status, created) = app.upload(QUERY, body.clone()).await;
    assert_eq!(status, 201);
    let resp = other
        .http
        .get(other.url(created["download_url"].as_str().unwrap()))
        .bearer_auth(&other.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), body.as_slice());
}

async fn checksum_mismatch_is_refused_and_nothing_is_kept(app: TestApp) {
    let resp = app
        .http
        .post(app.url(&format!("/api/v1/binaries?{QUERY}")))
        .bearer_auth(&app.admin)
        .header("x-checksum-sha256", "0".repeat(64))
        .body(build(4))
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(resp).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("checksum_mismatch"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&sha256_hex(&build(4))),
        "the message names the checksum received: {body}"
    );
    assert!(stored_files(&storage(&app)).is_empty());
    let (_, listed) = app.get("/api/v1/binaries").await;
    assert_eq!(listed["binaries"], json!([]));
}

async fn upload_over_the_size_limit_is_a_413_before_or_while_it_streams(app: TestApp) {
    let (status, body) = app.upload(QUERY, vec![7; 2048]).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("payload_too_large"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MAX_BINARY_BYTES"),
        "{body}"
    );
    // Chunked, so the size is only known once the limit is crossed.
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /api/v1/binaries?{QUERY} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ntransfer-encoding: chunked\r\n\r\n",
        app.admin
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("400\r\n{}\r\n", "x".repeat(1024));
    let mut response = String::new();
    for _ in 0..3 {
        if tcp.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = tcp.write_all(b"0\r\n\r\n").await;
    use tokio::io::AsyncReadExt;
    let _ = tcp.read_to_string(&mut response).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(stored_files(&storage(&app)).is_empty());
}

async fn upload_cut_off_midway_leaves_no_file_and_no_metadata(app: TestApp) {
    let dir = storage(&app);
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /api/v1/binaries?{QUERY} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-length: 100000\r\n\r\n",
        app.admin
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&[1u8; 40_000]).await.unwrap();
    // The temporary file exists while the upload is in progress...
    eventually(WAIT, "storage directory", async || {
        stored_files(&dir).iter().any(|f| f.starts_with(".upload-"))
    })
    .await;
    drop(tcp);
    // ...and is gone once the client went away.
    eventually(WAIT, "storage directory", async || {
        stored_files(&dir).is_empty()
    })
    .await;
    let (_, listed) = app.get("/api/v1/binaries").await;
    assert_eq!(listed["binaries"], json!([]));
}

async fn same_name_version_os_and_arch_is_a_409_and_the_first_upload_stays(app: TestApp) {
    let (_, first) = app.upload(QUERY, build(5)).await;
    let (status, body) = app.upload(QUERY, build(6)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("binary_exists"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(first["id"].as_str().unwrap())
    );
    let (_, still) = app
        .get(&format!(
            "/api/v1/binaries/{}",
            first["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(still["sha256"], sha256_hex(&build(5)).as_str());
}

async fn invalid_upload_requests_get_clear_errors(app: TestApp) {
    for (query, needle) in [
        ("name=agent&version=1.0", "missing os, arch"),
        (
            "name=../../etc&version=1&os=linux&arch=x86_64",
            "name may contain only",
        ),
        (
            "name=a&version=1&os=linux&arch=x86_64&verison=2",
            "unknown query parameter `verison`",
        ),
        (
            "name=a&version=1&os=linux&arch=x86_64&sha256=abc",
            "64 hex digits",
        ),
        // Empty is not absent: the upload is not taken unchecked.
        (
            "name=a&version=1&os=linux&arch=x86_64&sha256=",
            "64 hex digits",
        ),
    ] {
        let (status, body) = app.upload(query, b"x".to_vec()).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(needle),
            "{query}: {body}"
        );
    }
    let (status, body) = app.upload(QUERY, Vec::new()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("empty_body"))
    );
    let resp = app
        .http
        .post(app.url(&format!("/api/v1/binaries?{QUERY}")))
        .bearer_auth(&app.admin)
        .header("content-type", "multipart/form-data; boundary=x")
        .body("--x--")
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(resp).await;
    assert_eq!(status, 415, "{body}");
    let resp = app
        .http
        .post(app.url(&format!("/api/v1/binaries?{QUERY}")))
        .bearer_auth(app.agent_token("a"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403, "agents may not upload");
    assert!(stored_files(&storage(&app)).is_empty());
}

async fn deleting_a_binary_removes_its_file_unless_another_binary_shares_it(app: TestApp) {
    let same = build(8);
    let (_, a) = app
        .upload(
            "name=agent&version=1.0.0&os=linux&arch=x86_64",
            same.clone(),
        )
        .await;
    let (_, b) = app
        .upload(
            "name=agent-copy&version=1.0.0&os=linux&arch=x86_64",
            same.clone(),
        )
        .await;
    let sha = sha256_hex(&same);
    let (status, _) = app
        .delete(&format!("/api/v1/binaries/{}", a["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        stored_files(&storage(&app)),
        vec![sha.clone()],
        "still used by b"
    );
    let (status, _) = app
        .delete(&format!("/api/v1/binaries/{}", b["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, 200);
    assert!(stored_files(&storage(&app)).is_empty());
    let (status, _) = app
        .delete(&format!("/api/v1/binaries/{}", b["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, 404);
}

on_both_backends! {
    upload_is_stored_under_its_sha256_with_metadata_in_the_database;
    download_streams_the_file_with_length_etag_checksum_and_ranges;
    another_replica_serves_a_binary_right_after_the_upload;
    same_name_version_os_and_arch_is_a_409_and_the_first_upload_stays;
    deleting_a_binary_removes_its_file_unless_another_binary_shares_it;
}

on_sqlite! {
    checksum_mismatch_is_refused_and_nothing_is_kept;
    upload_over_the_size_limit_is_a_413_before_or_while_it_streams with ["MAX_BINARY_BYTES" = "1024"];
    upload_cut_off_midway_leaves_no_file_and_no_metadata;
    invalid_upload_requests_get_clear_errors;
}
