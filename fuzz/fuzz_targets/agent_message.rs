//! The agent protocol's parsers, on any text: agent → server messages as the server reads
//! them (including its one U+0000 rule), server → agent messages as agents read them.
//! Whatever parses must serialise and parse back to the same message.
#![no_main]

use agent_protocol::{AgentMessage, ServerMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(msg) = serde_json::from_str::<AgentMessage>(text) {
        let _ = agent_server::fuzzing::check_json("", text);
        let json = msg.to_json();
        let again = serde_json::from_str::<AgentMessage>(&json)
            .unwrap_or_else(|e| panic!("{json} does not parse back: {e}"));
        assert_eq!(again.to_json(), json);
    }
    if let Ok(msg) = ServerMessage::parse(text)
        && !matches!(msg, ServerMessage::Unknown)
    {
        let json = msg.to_json();
        let again = ServerMessage::parse(&json)
            .unwrap_or_else(|e| panic!("{json} does not parse back: {e}"));
        assert_eq!(again.to_json(), json);
    }
});
