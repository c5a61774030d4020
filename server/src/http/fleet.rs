//! Routes of the web UI, binaries and rollouts, kept apart from the core route table in
//! `router.rs`, which only delegates to [`FleetRoute`].

use http::{Method, Request};
use hyper::body::Incoming;

use super::error::{ApiError, Result};
use super::{Response, binaries, events, rollouts, ui};
use crate::state::AppState;

/// A matched route of this group. Path parameters are raw segments; handlers check them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetRoute {
    UiIndex,
    UiAsset(String),
    Session,
    Events,
    Binaries,
    Binary(String),
    BinaryDownload(String),
    Rollouts,
    Rollout(String),
    Pods,
}

impl FleetRoute {
    pub fn parse(segments: &[&str]) -> Option<FleetRoute> {
        Some(match segments {
            [""] => FleetRoute::UiIndex,
            ["ui", file] => FleetRoute::UiAsset(file.to_string()),
            ["api", "v1", "session"] => FleetRoute::Session,
            ["api", "v1", "events"] => FleetRoute::Events,
            ["api", "v1", "binaries"] => FleetRoute::Binaries,
            ["api", "v1", "binaries", id] => FleetRoute::Binary(id.to_string()),
            ["api", "v1", "binaries", id, "download"] => FleetRoute::BinaryDownload(id.to_string()),
            ["api", "v1", "rollouts"] => FleetRoute::Rollouts,
            ["api", "v1", "rollouts", id] => FleetRoute::Rollout(id.to_string()),
            ["api", "v1", "pods"] => FleetRoute::Pods,
            _ => return None,
        })
    }

    pub fn template(&self) -> &'static str {
        match self {
            FleetRoute::UiIndex => "/",
            FleetRoute::UiAsset(_) => "/ui/{file}",
            FleetRoute::Session => "/api/v1/session",
            FleetRoute::Events => "/api/v1/events",
            FleetRoute::Binaries => "/api/v1/binaries",
            FleetRoute::Binary(_) => "/api/v1/binaries/{id}",
            FleetRoute::BinaryDownload(_) => "/api/v1/binaries/{id}/download",
            FleetRoute::Rollouts => "/api/v1/rollouts",
            FleetRoute::Rollout(_) => "/api/v1/rollouts/{id}",
            FleetRoute::Pods => "/api/v1/pods",
        }
    }

    pub fn allowed(&self) -> &'static [Method] {
        match self {
            FleetRoute::UiIndex | FleetRoute::UiAsset(_) | FleetRoute::BinaryDownload(_) => {
                &[Method::GET, Method::HEAD]
            }
            FleetRoute::Events | FleetRoute::Pods => &[Method::GET],
            FleetRoute::Session => &[Method::GET, Method::POST, Method::DELETE],
            FleetRoute::Binaries | FleetRoute::Rollouts => &[Method::GET, Method::POST],
            FleetRoute::Binary(_) | FleetRoute::Rollout(_) => &[Method::GET, Method::DELETE],
        }
    }

    pub async fn dispatch(&self, state: &AppState, req: Request<Incoming>) -> Result<Response> {
        let m = req.method().clone();
        let read = m == Method::GET || m == Method::HEAD;
        match self {
            FleetRoute::UiIndex if read => ui::asset(None, &req),
            FleetRoute::UiAsset(file) if read => ui::asset(Some(file), &req),
            FleetRoute::Session if m == Method::GET => ui::session(state, req).await,
            FleetRoute::Session if m == Method::POST => ui::sign_in(state, req).await,
            FleetRoute::Session if m == Method::DELETE => ui::sign_out(state, req).await,
            FleetRoute::Events if m == Method::GET => events::stream(state, req).await,
            FleetRoute::Binaries if m == Method::GET => binaries::list(state, req).await,
            FleetRoute::Binaries if m == Method::POST => binaries::upload(state, req).await,
            FleetRoute::Binary(id) if m == Method::GET => binaries::get(state, id, req).await,
            FleetRoute::Binary(id) if m == Method::DELETE => binaries::delete(state, id, req).await,
            FleetRoute::BinaryDownload(id) if read => binaries::download(state, id, req).await,
            FleetRoute::Rollouts if m == Method::GET => rollouts::list(state, req).await,
            FleetRoute::Rollouts if m == Method::POST => rollouts::create(state, req).await,
            FleetRoute::Rollout(id) if m == Method::GET => rollouts::get(state, id, req).await,
            FleetRoute::Rollout(id) if m == Method::DELETE => {
                rollouts::cancel(state, id, req).await
            }
            FleetRoute::Pods if m == Method::GET => rollouts::pods(state, req).await,
            other => Err(ApiError::MethodNotAllowed {
                allowed: other.allowed(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_fleet_routes() {
        assert_eq!(FleetRoute::parse(&[""]), Some(FleetRoute::UiIndex));
        assert_eq!(
            FleetRoute::parse(&["api", "v1", "binaries", "b1", "download"]),
            Some(FleetRoute::BinaryDownload("b1".into()))
        );
        assert_eq!(FleetRoute::parse(&["ui", "x", "y"]), None);
    }
}
