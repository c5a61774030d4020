//! The OpenAPI 3.1 contract of the main listener, generated from the handlers'
//! `#[utoipa::path]` attributes and the `ToSchema` types they return, served at
//! `GET /api/v1/openapi.json` without credentials. The tests below keep it complete:
//! every route of the route table in `mod.rs` must appear with its methods, and nothing
//! else may.
//!
//! Each success body is the `Serialize` type the handler returns, so its schema cannot
//! drift from what is sent. Error statuses refer to the reusable responses defined here
//! (`#/components/responses/…`), all with the one error body of `error.rs`.

use std::borrow::Cow;

use axum::Json;
use axum::response::IntoResponse;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{Ref, RefOr, Server};
use utoipa::{Modify, OpenApi, PartialSchema, ToResponse, ToSchema};

use super::error::ErrorCode;
use crate::auth::ui_session::COOKIE;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "agent-server",
        description = "The HTTP API of agent-server: agents, commands, inventories, credentials (tokens, enroll secrets, enrollment), the audit log, binaries, rollouts, fleet jobs, the web UI's session and events, probes, and the agents' WebSocket upgrade (the protocol spoken after it is in docs/protocol.md). Every error is `{\"error\": {\"code\", \"message\"}}` with `code` from `ErrorCode`. Prometheus metrics are on METRICS_PORT, not here.",
    ),
    paths(
        document,
        super::agents::list,
        super::agents::get,
        super::agents::delete,
        super::agents::revoke,
        super::commands::list,
        super::commands::create,
        super::commands::get,
        super::inventory::get,
        super::inventory::put,
        super::tokens::list,
        super::tokens::create,
        super::tokens::revoke,
        super::enroll::list,
        super::enroll::create,
        super::enroll::revoke,
        super::enroll::enroll,
        super::audit::list,
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
        super::rollouts::pause,
        super::rollouts::resume,
        super::jobs::list,
        super::jobs::create,
        super::jobs::get,
        super::jobs::results,
        super::jobs::pause,
        super::jobs::resume,
        super::jobs::cancel,
        super::pods::list,
        super::health::health,
        super::health::healthz,
        super::health::readiness,
        super::health::readyz,
        super::ws::upgrade,
        super::assets::index,
        super::assets::file,
    ),
    components(
        schemas(ErrorBody, ErrorDetail, ErrorCode),
        responses(
            BadRequest,
            Unauthorized,
            Forbidden,
            NotFound,
            Conflict,
            PayloadTooLarge,
            UnsupportedMediaType,
            RangeNotSatisfiable,
            Unprocessable,
            TooManyRequests,
            Unavailable,
            InsufficientStorage,
        ),
    ),
    modifiers(&Security, &RefusedNul),
    security(("bearer" = []), ("session" = [])),
)]
pub(crate) struct ApiDoc;

/// The two credentials (RFC 6750 bearer tokens, and the web UI's session cookie), the
/// version and the server URL.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.bearer_format = Some("JWT".into());
        http.description = Some(
            "A token from `agent-server token`, `POST /api/v1/tokens` or `POST /api/v1/enroll`. Admin tokens may call every route; agent tokens only their own agent's."
                .into(),
        );
        components.add_security_scheme("bearer", SecurityScheme::Http(http));
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                COOKIE,
                "The web UI's session (`POST /api/v1/session`); an admin. Requests that change state must come from this server's own origin.",
            ))),
        );
        openapi.info.version = env!("CARGO_PKG_VERSION").into();
        openapi.servers = Some(vec![Server::new("/")]);
    }
}

/// The `client_id` rule (`agent_protocol::check_client_id`) as a JSON Schema pattern:
/// 1 to 128 of `[A-Za-z0-9._-]`, but not `.` or `..`. Every `client_id` in the document
/// carries it (the attributes need the literal; a test compares them with this).
#[cfg(test)]
const CLIENT_ID_PATTERN: &str = r"^([A-Za-z0-9_-][A-Za-z0-9._-]{0,127}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,126}|\.\.[A-Za-z0-9._-]{1,126})$";

/// `limit` of the lists that take 1 to 1000 (`extract::Page::limit`): decimal digits,
/// or empty for the default.
#[cfg(test)]
const LIMIT_1000_PATTERN: &str = r"^(0*([1-9][0-9]{0,2}|1000))?$";
/// `limit` of the lists that take 1 to 500.
#[cfg(test)]
const LIMIT_500_PATTERN: &str = r"^(0*([1-9][0-9]?|[1-4][0-9]{2}|500))?$";

/// `middleware::refuse_nul` answers 400 `nul_character` on every route, before its
/// handler, when the path or the query string holds `%00` (even in a parameter the route
/// does not take): each operation lists that 400, whether or not its handler refuses
/// anything itself.
struct RefusedNul;

impl Modify for RefusedNul {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                operation
                    .responses
                    .responses
                    .entry("400".to_string())
                    .or_insert_with(|| RefOr::Ref(Ref::from_response_name("BadRequest")));
            }
        }
    }
}

/// The document, as JSON.
pub(crate) fn document_json() -> serde_json::Value {
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
    /// Machine-readable; one of `ErrorCode`.
    code: ErrorCode,
    /// What to change, for a person.
    message: String,
    /// With `invalid_json`: the 1-based line of the error.
    line: Option<u64>,
    /// With `invalid_json`: the 1-based column of the error.
    column: Option<u64>,
}

impl PartialSchema for ErrorCode {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "The machine-readable `error.code` of every error response (README lists what each means).",
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

/// Invalid input: a parameter, the body, or U+0000 anywhere in the path or query;
/// `error.code` says which rule was broken.
#[derive(ToResponse)]
#[allow(dead_code)]
pub(super) struct BadRequest(ErrorBody);

/// No valid credential (`WWW-Authenticate: Bearer`).
#[derive(ToResponse)]
#[response(headers(("WWW-Authenticate" = String, description = "`Bearer`")))]
#[allow(dead_code)]
pub(super) struct Unauthorized(ErrorBody);

/// The credential does not grant this (an agent token on an admin route or for another
/// agent, or a session cookie from another origin).
#[derive(ToResponse)]
#[allow(dead_code)]
pub(super) struct Forbidden(ErrorBody);

/// No such resource.
#[derive(ToResponse)]
#[allow(dead_code)]
pub(super) struct NotFound(ErrorBody);

/// Conflicts with the current state; `error.code` says how.
#[derive(ToResponse)]
#[allow(dead_code)]
pub(super) struct Conflict(ErrorBody);

/// The body is larger than the route accepts.
#[derive(ToResponse)]
#[allow(dead_code)]
pub(super) struct PayloadTooLarge(ErrorBody);

/// The body's Content-Type is not accepted (JSON routes take `application/json`, `*+json`
/// or, for `curl -d`, `application/x-www-form-urlencoded` holding JSON).
#[derive(ToResponse)]
#[allow(dead_code)]
pub(super) struct UnsupportedMediaType(ErrorBody);

/// The requested range is outside the file (`Content-Range: bytes */SIZE`).
#[derive(ToResponse)]
#[response(headers(("Content-Range" = String, description = "`bytes */SIZE`")))]
#[allow(dead_code)]
pub(super) struct RangeNotSatisfiable(ErrorBody);

/// Well-formed, but there is nothing to act on; nothing was stored.
#[derive(ToResponse)]
#[allow(dead_code)]
pub(super) struct Unprocessable(ErrorBody);

/// Rate limited; retry after `Retry-After` seconds.
#[derive(ToResponse)]
#[response(headers(("Retry-After" = u64, description = "Seconds until a retry may succeed")))]
#[allow(dead_code)]
pub(super) struct TooManyRequests(ErrorBody);

/// Unavailable for now: the database does not answer, the replica is draining or at a
/// bound; retry after `Retry-After` seconds (another replica may answer).
#[derive(ToResponse)]
#[response(headers(("Retry-After" = u64, description = "Seconds until a retry may succeed")))]
#[allow(dead_code)]
pub(super) struct Unavailable(ErrorBody);

/// The binary storage volume is full.
#[derive(ToResponse)]
#[allow(dead_code)]
pub(super) struct InsufficientStorage(ErrorBody);

/// A role a token carries.
#[derive(ToSchema)]
#[schema(as = Role)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub(super) enum RoleDoc {
    Agent,
    Admin,
}

/// A file's bytes.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub(super) struct BinaryFile(Vec<u8>);

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    /// The (method, path) pairs of the main listener's route table in `mod.rs`, read from
    /// its source: `.route("/path", get(..).post(..))`.
    fn route_table() -> BTreeSet<(String, String)> {
        let source = include_str!("mod.rs");
        // The metrics listener's table is another document's business.
        let source = source.split("fn metrics_router").next().expect("mod.rs");
        let mut routes = BTreeSet::new();
        for chunk in source.split(".route(").skip(1) {
            let Some(path) = chunk.trim_start().strip_prefix('"') else {
                continue;
            };
            let Some((path, rest)) = path.split_once('"') else {
                continue;
            };
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

    /// A response object, with a `$ref` into `components.responses` resolved.
    fn resolve<'a>(doc: &'a Value, response: &'a Value) -> &'a Value {
        match response["$ref"].as_str() {
            Some(r) => {
                let name = r
                    .strip_prefix("#/components/responses/")
                    .unwrap_or_else(|| panic!("a response $ref outside components: {r}"));
                &doc["components"]["responses"][name]
            }
            None => response,
        }
    }

    #[test]
    fn every_route_is_in_the_document_and_nothing_else() {
        let routes = route_table();
        assert!(routes.len() > 40, "the route table parser found {routes:?}");
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
    fn operation_ids_are_unique() {
        let doc = document_json();
        let mut seen = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let id = op["operationId"].as_str().unwrap_or_default().to_string();
                assert!(!id.is_empty(), "{method} {path} has no operationId");
                assert!(seen.insert(id.clone()), "operationId {id} twice");
            }
        }
    }

    #[test]
    fn every_error_response_has_the_error_body() {
        let doc = document_json();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object().unwrap();
                assert!(
                    responses
                        .keys()
                        .any(|s| s.starts_with('1') || s.starts_with('2')),
                    "{method} {path} documents no success"
                );
                // Readiness answers 503 with its own body: which check failed.
                let probe = path == "/readiness" || path == "/readyz";
                for (status, resp) in responses {
                    if (status.starts_with('4') || status.starts_with('5')) && !probe {
                        let resp = resolve(&doc, resp);
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
    fn every_operation_documents_the_400_of_bad_input() {
        // U+0000 in the query is refused on every route, parameters or not.
        let doc = document_json();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let bad = resolve(&doc, &op["responses"]["400"]);
                assert!(
                    bad["description"]
                        .as_str()
                        .is_some_and(|d| d.contains("U+0000")),
                    "{method} {path}: {bad}"
                );
            }
        }
    }

    #[test]
    fn every_client_id_carries_the_client_id_rule() {
        let doc = document_json();
        let mut patterns = Vec::new();
        for item in doc["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                for p in op["parameters"].as_array().into_iter().flatten() {
                    if p["name"] == "client_id" && p["in"] == "path" {
                        patterns.push(p["schema"]["pattern"].clone());
                    }
                }
            }
        }
        for name in ["MintRequest", "EnrollRequest"] {
            patterns.push(
                doc["components"]["schemas"][name]["properties"]["client_id"]["pattern"].clone(),
            );
        }
        assert!(patterns.len() > 8, "{patterns:?}");
        for p in patterns {
            assert_eq!(p, CLIENT_ID_PATTERN);
        }
        // The pattern says what check_client_id says, on the edges of the rule.
        let pattern = regex::Regex::new(CLIENT_ID_PATTERN).unwrap();
        let long = "a".repeat(128);
        let too_long = "a".repeat(129);
        for id in [
            "a",
            "host-01.example_a",
            "..a",
            ".a",
            "...",
            "a..",
            ".",
            "..",
            "",
            "a/b",
            "a b",
            "é",
            &long,
            &too_long,
        ] {
            assert_eq!(
                pattern.is_match(id),
                agent_protocol::check_client_id(id).is_ok(),
                "{id:?}"
            );
        }
    }

    #[test]
    fn every_limit_carries_the_rule_page_limit_applies() {
        let doc = document_json();
        let mut seen = 0;
        for item in doc["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                for p in op["parameters"].as_array().into_iter().flatten() {
                    if p["name"] == "limit" {
                        let pattern = p["schema"]["pattern"].as_str().unwrap_or_default();
                        assert!(
                            [LIMIT_1000_PATTERN, LIMIT_500_PATTERN].contains(&pattern),
                            "{p}"
                        );
                        seen += 1;
                    }
                }
            }
        }
        assert!(seen >= 9, "{seen} limits");
        for (pattern, max) in [(LIMIT_1000_PATTERN, 1000), (LIMIT_500_PATTERN, 500)] {
            let re = regex::Regex::new(pattern).unwrap();
            let mut samples: Vec<String> = (0..=1100).map(|n| n.to_string()).collect();
            samples.extend(
                [
                    "",
                    "007",
                    "0",
                    "00",
                    "+5",
                    " 5",
                    "5 ",
                    "-1",
                    "1e2",
                    "99999999999999999999",
                ]
                .map(String::from),
            );
            for v in samples {
                let accepted = super::super::extract::Page::with_limit(&v)
                    .limit(50, max)
                    .is_ok();
                assert_eq!(re.is_match(&v), accepted, "{v:?} with max {max}");
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
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes["bearer"]["scheme"], "bearer");
        assert_eq!(schemes["session"]["in"], "cookie");
        assert_eq!(schemes["session"]["name"], COOKIE);
    }

    #[test]
    fn anonymous_routes_say_so_and_the_rest_need_a_credential() {
        let doc = document_json();
        let anonymous = [
            ("get", "/api/v1/openapi.json"),
            ("post", "/api/v1/enroll"),
            ("get", "/api/v1/session"),
            ("post", "/api/v1/session"),
            ("delete", "/api/v1/session"),
            ("get", "/health"),
            ("get", "/healthz"),
            ("get", "/readiness"),
            ("get", "/readyz"),
            ("get", "/"),
            ("get", "/ui/{file}"),
        ];
        for (method, path) in anonymous {
            assert_eq!(
                doc["paths"][path][method]["security"],
                serde_json::json!([{}]),
                "{method} {path}"
            );
        }
        let list = &doc["paths"]["/api/v1/agents"]["get"];
        assert_eq!(list["security"], Value::Null, "the global schemes apply");
        assert_eq!(
            doc["security"],
            serde_json::json!([{"bearer": []}, {"session": []}])
        );
    }
}
