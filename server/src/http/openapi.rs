//! The OpenAPI 3.1 contract of the REST API, generated from the handlers'
//! `#[utoipa::path]` attributes and the `ToSchema` types, served at
//! `GET /api/v1/openapi.json` without credentials. The tests below keep it complete: every
//! `/api/v1` route of the route table in `mod.rs` must appear with its methods.
//!
//! Response bodies that handlers build with `serde_json::json!` are described here by
//! schema-only types (`*Doc`); their field names must follow the handlers'.

use std::borrow::Cow;

use axum::Json;
use axum::response::IntoResponse;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{RefOr, Server};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use super::error::ErrorCode;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "agent-server",
        description = "REST API of agent-server: agents, commands, inventories, tokens, binaries, rollouts. Errors are `{\"error\": {\"code\", \"message\"}}` with `code` from `ErrorCode`.",
    ),
    paths(
        document,
        super::agents::list,
        super::agents::get,
        super::agents::delete,
        super::commands::list,
        super::commands::create,
        super::commands::get,
        super::inventory::get,
        super::inventory::put,
        super::tokens::create,
        super::session::get,
        super::session::sign_in,
        super::session::sign_out,
        super::events::stream,
        super::binaries::list,
        super::binaries::upload,
        super::binaries::get,
        super::binaries::delete,
        super::binaries::download,
        super::rollouts::list,
        super::rollouts::create,
        super::rollouts::get,
        super::rollouts::cancel,
        super::pods::list,
    ),
    components(schemas(ErrorBody, ErrorDetail, ErrorCode)),
    modifiers(&BearerScheme),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

/// Adds the `bearer` security scheme (a JWT in `Authorization: Bearer`, RFC 6750).
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.bearer_format = Some("JWT".into());
        components.add_security_scheme("bearer", SecurityScheme::Http(http));
        openapi.info.version = env!("CARGO_PKG_VERSION").into();
        openapi.servers = Some(vec![Server::new("/")]);
    }
}

/// The document, as JSON.
pub fn document_json() -> serde_json::Value {
    serde_json::to_value(ApiDoc::openapi()).unwrap_or_default()
}

/// `GET /api/v1/openapi.json`: this document. A contract, so no credentials are needed.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    operation_id = "get_openapi",
    tag = "meta",
    security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)),
)]
pub(super) async fn document() -> impl IntoResponse {
    Json(document_json())
}

/// Every error response's body.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct ErrorDetail {
    /// Machine-readable; one of [`ErrorCode`].
    code: ErrorCode,
    /// What to change, for a person.
    message: String,
    /// With `invalid_json`: the 1-based line of the error.
    #[schema(required = false)]
    line: Option<u64>,
    /// With `invalid_json`: the 1-based column of the error.
    #[schema(required = false)]
    column: Option<u64>,
}

impl PartialSchema for ErrorCode {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "The machine-readable `error.code` of every error response.",
            ))
            .enum_values(Some(ErrorCode::ALL.iter().map(|c| c.as_str())))
            .build()
            .into()
    }
}

impl ToSchema for ErrorCode {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ErrorCode")
    }
}

/// A role a token carries.
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub(super) enum RoleDoc {
    Agent,
    Admin,
}

/// An uploaded or downloaded file, as raw bytes.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub(super) struct BinaryFile(Vec<u8>);

/// A page of agents, with fleet counts.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct AgentListDoc {
    #[schema(value_type = Vec<super::agents::AgentView>)]
    agents: Vec<()>,
    total: i64,
    online: i64,
    offline: i64,
    /// The `after` of the next page; null on the last page.
    next: Option<String>,
}

/// A deleted resource.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct DeletedDoc {
    id: String,
    deleted: bool,
}

/// A stored command, as `GET /api/v1/commands/{id}` shows it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct CommandDoc {
    id: String,
    agent_id: String,
    name: String,
    /// The arguments, a JSON object.
    #[schema(value_type = Object)]
    args: (),
    /// `pending`, `delivered`, `completed`, `failed` or `expired`.
    status: String,
    /// The agent's result, any JSON; null until it answers.
    #[schema(value_type = Value)]
    output: (),
    created_at: String,
    delivered_at: Option<String>,
    completed_at: Option<String>,
    expires_at: Option<String>,
    attempts: i32,
}

/// A queued command.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct CommandCreatedDoc {
    id: String,
    agent_id: String,
    status: String,
    created_at: String,
}

/// A page of commands, newest first.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct CommandListDoc {
    commands: Vec<CommandDoc>,
    /// The `before` of the next page; null on the last page.
    next: Option<String>,
}

/// A stored inventory's receipt.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct InventoryStoredDoc {
    agent_id: String,
    size_bytes: i64,
    received_at: String,
}

/// An inventory as the agent sent it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct InventoryDoc {
    agent_id: String,
    size_bytes: i64,
    received_at: String,
    /// The document, any JSON.
    #[schema(value_type = Value)]
    data: (),
}

/// A minted token.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct TokenDoc {
    token: String,
    client_id: String,
    role: RoleDoc,
    expires_at: String,
}

/// The web UI's session.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct SessionDoc {
    signed_in: bool,
    #[schema(required = false)]
    expires_at: Option<String>,
    #[schema(required = false)]
    sign_in_enabled: Option<bool>,
    #[schema(required = false)]
    pod: Option<String>,
    #[schema(required = false)]
    server_version: Option<String>,
}

/// A page of binaries, newest first.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct BinaryListDoc {
    #[schema(value_type = Vec<super::binaries::BinaryView>)]
    binaries: Vec<()>,
    /// The `before` of the next page; null on the last page.
    next: Option<String>,
}

/// Rollouts, newest first.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct RolloutListDoc {
    #[schema(value_type = Vec<super::rollouts::RolloutView>)]
    rollouts: Vec<()>,
}

/// One replica's share of the fleet.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct PodDoc {
    pod: String,
    online_agents: i64,
    this_replica: bool,
}

/// Agents per replica.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct PodListDoc {
    pods: Vec<PodDoc>,
    agents: i64,
    online: i64,
    offline: i64,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The (method, path) pairs of the `/api/v1` routes in `mod.rs`'s route table, read
    /// from its source: `.route("/path", get(..).post(..))`.
    fn route_table() -> BTreeSet<(String, String)> {
        let source = include_str!("mod.rs");
        let mut routes = BTreeSet::new();
        for chunk in source.split(".route(").skip(1) {
            let Some(path) = chunk.trim_start().strip_prefix('"') else {
                continue;
            };
            let Some((path, rest)) = path.split_once('"') else {
                continue;
            };
            if !path.starts_with("/api/v1") {
                continue;
            }
            // The handler expression ends at the parenthesis that closes `.route(`.
            let mut depth = 1;
            let end = rest
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(rest.len(), |(i, _)| i);
            let handlers = &rest[..end];
            for method in ["get", "post", "put", "patch", "delete"] {
                let called = handlers
                    .match_indices(&format!("{method}("))
                    .any(|(i, _)| i == 0 || !handlers.as_bytes()[i - 1].is_ascii_alphanumeric());
                if called {
                    routes.insert((method.to_string(), path.to_string()));
                }
            }
        }
        routes
    }

    fn documented() -> BTreeSet<(String, String)> {
        let doc = document_json();
        let mut ops = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                ops.insert((method.clone(), path.clone()));
            }
        }
        ops
    }

    #[test]
    fn every_api_route_is_in_the_document_and_nothing_else() {
        let routes = route_table();
        assert!(routes.len() > 20, "the route table parser found {routes:?}");
        let documented = documented();
        let missing: Vec<_> = routes.difference(&documented).collect();
        assert!(
            missing.is_empty(),
            "routes without an OpenAPI operation: {missing:?}"
        );
        let extra: Vec<_> = documented.difference(&routes).collect();
        assert!(
            extra.is_empty(),
            "OpenAPI operations without a route: {extra:?}"
        );
    }

    #[test]
    fn every_operation_documents_its_errors_with_the_error_body() {
        let doc = document_json();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object().unwrap();
                assert!(
                    responses.keys().any(|s| s.starts_with('2')),
                    "{method} {path} documents no success"
                );
                for (status, resp) in responses {
                    if status.starts_with('4') || status.starts_with('5') {
                        let schema = &resp["content"]["application/json"]["schema"]["$ref"];
                        assert_eq!(
                            schema, "#/components/schemas/ErrorBody",
                            "{method} {path} {status}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_error_codes_are_an_enum_of_every_code() {
        let doc = document_json();
        let values = &doc["components"]["schemas"]["ErrorCode"]["enum"];
        let listed: Vec<&str> = values
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let all: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(listed, all);
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
    }
}
