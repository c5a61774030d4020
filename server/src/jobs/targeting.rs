//! Which agents a job goes to.
//!
//! A [`Target`] combines fields that must all hold. Those SQL can evaluate (ids, labels,
//! os, arch, online) become an [`AgentSelection`] that the store applies inside its
//! `INSERT … SELECT`; version comparisons (the order of `agent_protocol::version`) and the
//! percentage (the stable hash of `binaries::rollout::selected`) become a predicate the
//! store applies to the selected ids before inserting.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::binaries::rollout::{check_labels, selected};
use crate::ids::{MAX_LABEL_LEN, MAX_LABELS, check_client_id};
use crate::store::{AgentPredicate, AgentSelection};
use agent_protocol::version;

/// Most ids one target may list.
pub(crate) const MAX_TARGET_IDS: usize = 10_000;
/// Longest os, arch or version accepted.
const MAX_FIELD_LEN: usize = 64;

/// `target` of `POST /api/v1/jobs`: every field given must hold; at least one is given.
/// Unknown fields are refused (serde), so a typo never widens a job to the whole fleet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// These client_ids (1 to 10,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<String>>,
    /// The agent reported every one of these labels in its hello.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    /// Reported os, compared case-insensitively (`linux`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// Reported arch, compared case-insensitively (`aarch64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Reported version: exact (`2.5.0`, equal in version order, so `v2.5` matches) or a
    /// comparison `>=2.5.0`, `>2.5.0`, `<=2.5.0`, `<2.5.0`, `!=2.5.0`, `=2.5.0`.
    /// Agents that reported no version never match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `true`: only agents connected now; `false`: only agents not connected now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    /// 1 to 100: the agents within this share by the stable hash of the job's name and
    /// the client_id (as rollouts select by binary), so the same name and a larger
    /// percentage select a superset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<i64>,
}

/// A version field parsed: the comparison and the version it compares with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VersionRule {
    pub(crate) op: VersionOp,
    pub version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VersionOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl VersionRule {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let ops = [
            (">=", VersionOp::Ge),
            ("<=", VersionOp::Le),
            ("!=", VersionOp::Ne),
            ("==", VersionOp::Eq),
            (">", VersionOp::Gt),
            ("<", VersionOp::Lt),
            ("=", VersionOp::Eq),
        ];
        let (op, rest) = ops
            .iter()
            .find_map(|(p, op)| s.strip_prefix(p).map(|rest| (*op, rest.trim())))
            .unwrap_or((VersionOp::Eq, s));
        if rest.is_empty() || rest.len() > MAX_FIELD_LEN || rest.contains(char::is_whitespace) {
            return Err(format!(
                "target.version must be a version (`2.5.0`) or a comparison such as `>=2.5.0` (got {s:?})"
            ));
        }
        Ok(VersionRule {
            op,
            version: rest.to_string(),
        })
    }

    pub(crate) fn matches(&self, reported: &str) -> bool {
        let ord = version::compare(reported, &self.version);
        match self.op {
            VersionOp::Eq => ord == Ordering::Equal,
            VersionOp::Ne => ord != Ordering::Equal,
            VersionOp::Lt => ord == Ordering::Less,
            VersionOp::Le => ord != Ordering::Greater,
            VersionOp::Gt => ord == Ordering::Greater,
            VersionOp::Ge => ord != Ordering::Less,
        }
    }
}

/// A checked target, ready for the store.
pub(crate) struct Resolved {
    pub(crate) selection: AgentSelection,
    /// Present when the version or the percentage must be checked per agent.
    pub keep: Option<AgentPredicate>,
}

impl Target {
    /// Checks every field and splits the target into what SQL selects and what is
    /// checked per agent. `hash_key` seeds the percentage (the job's name). Errors are
    /// messages for the operator.
    pub(crate) fn resolve(&self, hash_key: &str) -> Result<Resolved, String> {
        if *self == Target::default() {
            return Err(
                "target must name at least one of ids, labels, os, arch, version, online, percentage (the whole fleet is {\"percentage\": 100})"
                    .into(),
            );
        }
        let mut selection = AgentSelection::default();
        if let Some(ids) = &self.ids {
            if ids.is_empty() || ids.len() > MAX_TARGET_IDS {
                return Err(format!(
                    "target.ids must list 1 to {MAX_TARGET_IDS} client_ids (got {})",
                    ids.len()
                ));
            }
            for id in ids {
                check_client_id(id).map_err(|e| format!("target.ids: {id:?}: {e}"))?;
            }
            let mut ids = ids.clone();
            ids.sort();
            ids.dedup();
            selection.ids = Some(ids);
        }
        if let Some(labels) = &self.labels {
            if labels.is_empty() {
                return Err("target.labels must list at least one label".into());
            }
            let (valid, problem) = check_labels(labels.clone());
            if let Some(problem) = problem {
                return Err(format!("target.{problem}"));
            }
            if valid.len() > MAX_LABELS {
                return Err(format!(
                    "target.labels may list up to {MAX_LABELS} labels of 1 to {MAX_LABEL_LEN} characters"
                ));
            }
            selection.labels = valid;
        }
        let word = |name: &str, v: &Option<String>| -> Result<Option<String>, String> {
            match v {
                None => Ok(None),
                Some(v) if v.trim().is_empty() || v.len() > MAX_FIELD_LEN => Err(format!(
                    "target.{name} must be 1 to {MAX_FIELD_LEN} characters (got {v:?})"
                )),
                Some(v) => Ok(Some(v.trim().to_lowercase())),
            }
        };
        selection.os = word("os", &self.os)?;
        selection.arch = word("arch", &self.arch)?;
        selection.online = self.online;
        let rule = self
            .version
            .as_deref()
            .map(VersionRule::parse)
            .transpose()?;
        let percentage = match self.percentage {
            None | Some(100) => None,
            Some(p) if (1..100).contains(&p) => Some(p as i32),
            Some(p) => return Err(format!("target.percentage must be from 1 to 100 (got {p})")),
        };
        let keep: Option<AgentPredicate> = if rule.is_none() && percentage.is_none() {
            None
        } else {
            let key = hash_key.to_string();
            Some(Box::new(move |id: &str, reported: Option<&str>| {
                rule.as_ref()
                    .is_none_or(|r| reported.is_some_and(|v| r.matches(v)))
                    && percentage.is_none_or(|p| selected(&key, id, p))
            }))
        };
        Ok(Resolved { selection, keep })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(json: &str) -> Result<Target, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let err = target(r#"{"label": ["gpu"]}"#).unwrap_err();
        assert!(err.contains("unknown field `label`"), "{err}");
    }

    #[test]
    fn empty_target_and_empty_fields_are_refused() {
        assert!(Target::default().resolve("j").is_err());
        for bad in [
            r#"{"ids": []}"#,
            r#"{"labels": []}"#,
            r#"{"os": ""}"#,
            r#"{"arch": "  "}"#,
            r#"{"version": ">="}"#,
            r#"{"percentage": 0}"#,
            r#"{"percentage": 101}"#,
            r#"{"ids": ["has space"]}"#,
            r#"{"labels": ["bad label!"]}"#,
        ] {
            let t = target(bad).unwrap();
            let err = t
                .resolve("j")
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(err.starts_with("target."), "{bad}: {err}");
        }
    }

    #[test]
    fn version_rules_follow_version_order() {
        let ge = VersionRule::parse(">=2.5.0").unwrap();
        assert!(ge.matches("2.5.0") && ge.matches("2.10.0") && !ge.matches("2.5.0-rc.1"));
        let exact = VersionRule::parse("2.5").unwrap();
        assert!(exact.matches("v2.5.0") && !exact.matches("2.5.1"));
        let lt = VersionRule::parse("< 3").unwrap();
        assert!(lt.matches("2.99.0") && !lt.matches("3.0.0"));
        assert!(VersionRule::parse("!=1.0").unwrap().matches("1.1"));
    }

    #[test]
    fn sql_fields_are_normalised_and_per_agent_checks_only_when_needed() {
        let r = target(
            r#"{"os": "Linux", "arch": "AARCH64", "labels": ["gpu", "gpu"], "online": true}"#,
        )
        .unwrap()
        .resolve("j")
        .unwrap();
        assert_eq!(r.selection.os.as_deref(), Some("linux"));
        assert_eq!(r.selection.arch.as_deref(), Some("aarch64"));
        assert_eq!(r.selection.labels, vec!["gpu".to_string()]);
        assert!(r.keep.is_none());
        let r = target(r#"{"version": ">=2", "percentage": 100}"#)
            .unwrap()
            .resolve("j")
            .unwrap();
        let keep = r.keep.unwrap();
        assert!(keep("a", Some("2.1")) && !keep("a", Some("1.9")) && !keep("a", None));
    }

    #[test]
    fn percentage_uses_the_rollouts_stable_hash() {
        let keep = target(r#"{"percentage": 30}"#)
            .unwrap()
            .resolve("disk-check")
            .unwrap()
            .keep
            .unwrap();
        for i in 0..200 {
            let id = format!("agent-{i}");
            assert_eq!(keep(&id, None), selected("disk-check", &id, 30));
        }
    }
}
