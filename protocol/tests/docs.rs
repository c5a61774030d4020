//! Every JSON example in `docs/protocol.md` parses into the protocol's types and
//! serialises back to the same document.

use agent_protocol::{AgentMessage, ServerMessage};
use serde_json::Value;

const SERVER_TYPES: &[&str] = &[
    "welcome",
    "command",
    "ack",
    "heartbeat_ack",
    "update",
    "error",
];
const AGENT_TYPES: &[&str] = &["hello", "inventory", "result", "heartbeat", "update_result"];

fn examples() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md");
    let doc = std::fs::read_to_string(path).expect("docs/protocol.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line.trim()) {
            (None, "```json") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[test]
fn every_documented_message_round_trips_through_its_type() {
    let mut seen = Vec::new();
    for block in examples() {
        let doc: Value =
            serde_json::from_str(&block).unwrap_or_else(|e| panic!("not JSON ({e}):\n{block}"));
        let kind = doc["type"].as_str().expect("a type").to_string();
        let again: Value = if SERVER_TYPES.contains(&kind.as_str()) {
            let msg =
                ServerMessage::parse(&block).unwrap_or_else(|e| panic!("{kind}: {e}\n{block}"));
            assert!(!matches!(msg, ServerMessage::Unknown), "{kind} is known");
            serde_json::from_str(&msg.to_json()).unwrap()
        } else if AGENT_TYPES.contains(&kind.as_str()) {
            let msg: AgentMessage =
                serde_json::from_str(&block).unwrap_or_else(|e| panic!("{kind}: {e}\n{block}"));
            serde_json::from_str(&msg.to_json()).unwrap()
        } else {
            panic!("docs/protocol.md shows a message of unknown type {kind}");
        };
        assert_eq!(again, doc, "{kind} round trip");
        seen.push(kind);
    }
    for kind in SERVER_TYPES.iter().chain(AGENT_TYPES) {
        assert!(
            seen.iter().any(|s| s == kind),
            "docs/protocol.md has no example of {kind}"
        );
    }
}
