//! The OpenAPI contract is served by the server itself, to anyone.

use serde_json::Value;

use crate::helpers::{Backend, spawn_app_with};

#[tokio::test]
async fn the_openapi_document_is_served_without_a_token() {
    let app = spawn_app_with(Backend::Sqlite, &[]).await.unwrap();
    let resp = app
        .http
        .get(app.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let doc: Value = resp.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    let list = &doc["paths"]["/api/v1/agents"]["get"];
    assert_eq!(
        list["security"],
        Value::Null,
        "the global bearer scheme applies"
    );
    assert!(list["responses"]["401"].is_object());
    assert_eq!(
        doc["paths"]["/api/v1/openapi.json"]["get"]["security"],
        serde_json::json!([{}]),
        "the document itself needs no credential"
    );
}
