//! The OpenAPI contract is served by the server itself, to anyone, and what it says of a
//! route is what the route does.

use serde_json::Value;

use crate::helpers::{Backend, spawn_app_with};

#[tokio::test]
async fn the_openapi_document_is_served_without_a_token() {
    let app = spawn_app_with(Backend::Sqlite, &[])
        .await
        .expect("SQLite needs no service");
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
    assert_eq!(
        doc["paths"]["/api/v1/openapi.json"]["get"]["security"],
        serde_json::json!([{}]),
        "the document itself needs no credential"
    );
    // What the document promises for a refused request is what the server sends.
    let documented = &doc["paths"]["/api/v1/jobs"]["get"]["responses"]["401"]["$ref"];
    assert_eq!(documented, "#/components/responses/Unauthorized");
    let refused = app.http.get(app.url("/api/v1/jobs")).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    assert_eq!(refused.headers()["www-authenticate"], "Bearer");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
}
