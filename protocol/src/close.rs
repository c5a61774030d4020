//! Close codes (RFC 6455 §7.4; 4000–4999 are ours) and what an agent does after each, plus
//! the HTTP refusals of the upgrade request.

use std::time::Duration;

/// What an agent does after its connection ends or its upgrade is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reconnect {
    /// Do not reconnect: the agent was deleted, or its credentials or id are refused.
    /// Only an operator can fix this (re-enroll, a new token, a valid id).
    Stop,
    /// Reconnect after a full-jitter exponential backoff ([`backoff_ceiling`]).
    Backoff,
    /// The server is restarting or rebalancing: reconnect after a short random delay
    /// (0 to [`RESTART_DELAY_MAX`]); another replica answers.
    Soon,
    /// The token expired: read a fresh one, then reconnect.
    RenewToken,
    /// A newer connection with the same `client_id` replaced this one. Once may be our own
    /// previous connection; repeatedly means another host uses the same id. Never
    /// reconnect in a tight loop.
    AnotherHost,
}

/// The upper bound of the random delay after 1012.
pub const RESTART_DELAY_MAX: Duration = Duration::from_secs(5);

/// The upper bound of the full-jitter delay before reconnect attempt `attempt` (0-based):
/// `min(cap, base × 2^attempt)`. Agents wait a uniformly random time below it, so a fleet
/// does not reconnect in lockstep.
pub fn backoff_ceiling(attempt: u32, base: Duration, cap: Duration) -> Duration {
    base.checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(cap)
        .min(cap)
}

/// The close codes of protocol version 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000.
    Normal,
    /// 1009: a message over `WS_MAX_MESSAGE_BYTES`; large inventories go over HTTP.
    TooBig,
    /// 1011: the server could not record the connection.
    StoreUnavailable,
    /// 1012: the server is shutting down or rebalancing.
    Restarting,
    /// 1013: the server is overloaded.
    TryAgainLater,
    /// 4000: nothing heard from the agent for `offline_timeout`.
    HeartbeatTimeout,
    /// 4001: a newer connection with the same `client_id` took over.
    Replaced,
    /// 4002: an operator deleted the agent.
    Deleted,
    /// 4003: the token's `exp` passed during the connection.
    TokenExpired,
    /// 4008: the agent did not read its frames in time.
    SlowConsumer,
    /// Any other code (including 1005, no code at all).
    Other(u16),
}

impl CloseCode {
    pub fn from_u16(code: u16) -> CloseCode {
        match code {
            1000 => CloseCode::Normal,
            1009 => CloseCode::TooBig,
            1011 => CloseCode::StoreUnavailable,
            1012 => CloseCode::Restarting,
            1013 => CloseCode::TryAgainLater,
            4000 => CloseCode::HeartbeatTimeout,
            4001 => CloseCode::Replaced,
            4002 => CloseCode::Deleted,
            4003 => CloseCode::TokenExpired,
            4008 => CloseCode::SlowConsumer,
            other => CloseCode::Other(other),
        }
    }

    pub const fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::TooBig => 1009,
            CloseCode::StoreUnavailable => 1011,
            CloseCode::Restarting => 1012,
            CloseCode::TryAgainLater => 1013,
            CloseCode::HeartbeatTimeout => 4000,
            CloseCode::Replaced => 4001,
            CloseCode::Deleted => 4002,
            CloseCode::TokenExpired => 4003,
            CloseCode::SlowConsumer => 4008,
            CloseCode::Other(code) => code,
        }
    }

    /// The reason text the server sends with the code.
    pub const fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::TooBig => "message too big; send large inventories over HTTP",
            CloseCode::StoreUnavailable => "storage unavailable",
            CloseCode::Restarting => "server restarting",
            CloseCode::TryAgainLater => "try again later",
            CloseCode::HeartbeatTimeout => "heartbeat timeout",
            CloseCode::Replaced => "replaced by a newer connection",
            CloseCode::Deleted => "agent deleted by an operator",
            CloseCode::TokenExpired => "token expired",
            CloseCode::SlowConsumer => "too slow to receive",
            CloseCode::Other(_) => "",
        }
    }

    /// What the agent does next (the table in `docs/protocol.md`, "Close codes").
    pub fn policy(self) -> Reconnect {
        match self {
            CloseCode::Deleted => Reconnect::Stop,
            CloseCode::Replaced => Reconnect::AnotherHost,
            CloseCode::TokenExpired => Reconnect::RenewToken,
            CloseCode::Restarting => Reconnect::Soon,
            CloseCode::Normal
            | CloseCode::TooBig
            | CloseCode::StoreUnavailable
            | CloseCode::TryAgainLater
            | CloseCode::HeartbeatTimeout
            | CloseCode::SlowConsumer
            | CloseCode::Other(_) => Reconnect::Backoff,
        }
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        CloseCode::from_u16(code)
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> Self {
        code.code()
    }
}

/// What an agent does when the server refuses the upgrade with HTTP `status` (the table in
/// `docs/protocol.md`, "Connecting"). A 503 carries `Retry-After`, which the agent honours
/// as the lower bound of its delay.
pub fn refusal_policy(status: u16) -> Reconnect {
    match status {
        // A bad id, a refused token or another agent's token: retrying cannot help.
        400 | 401 | 403 => Reconnect::Stop,
        _ => Reconnect::Backoff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_code_round_trips_through_its_number() {
        for code in [
            1000, 1009, 1011, 1012, 1013, 4000, 4001, 4002, 4003, 4008, 1005, 4999,
        ] {
            assert_eq!(CloseCode::from_u16(code).code(), code);
        }
    }

    #[test]
    fn deleted_stops_replaced_warns_restarting_comes_back_soon() {
        assert_eq!(CloseCode::from(4002).policy(), Reconnect::Stop);
        assert_eq!(CloseCode::from(4001).policy(), Reconnect::AnotherHost);
        assert_eq!(CloseCode::from(4003).policy(), Reconnect::RenewToken);
        assert_eq!(CloseCode::from(1012).policy(), Reconnect::Soon);
        for code in [1000, 1009, 1011, 1013, 4000, 4008, 1006] {
            assert_eq!(CloseCode::from(code).policy(), Reconnect::Backoff, "{code}");
        }
    }

    #[test]
    fn refused_credentials_stop_and_draining_backs_off() {
        for status in [400, 401, 403] {
            assert_eq!(refusal_policy(status), Reconnect::Stop);
        }
        assert_eq!(refusal_policy(503), Reconnect::Backoff);
        assert_eq!(refusal_policy(502), Reconnect::Backoff);
    }

    #[test]
    fn backoff_ceiling_doubles_up_to_the_cap() {
        let (base, cap) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(backoff_ceiling(0, base, cap), Duration::from_secs(1));
        assert_eq!(backoff_ceiling(3, base, cap), Duration::from_secs(8));
        assert_eq!(backoff_ceiling(6, base, cap), cap);
        assert_eq!(backoff_ceiling(u32::MAX, base, cap), cap);
    }
}
