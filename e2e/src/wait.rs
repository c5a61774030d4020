//! Bounded waits that say what they are waiting for.
//!
//! The harness never sleeps in the hope that something has happened: it polls the state
//! that shows it (or awaits the event) under a stated bound, prints a progress line every
//! few seconds while it waits, and fails with the last observed state when the bound
//! passes.

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::time::Instant;

/// How often a waiting line is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// One observation of the awaited condition.
pub enum Check<T> {
    Ready(T),
    /// Not yet; the text says how far along it is ("41/60 agents connected").
    Pending(String),
}

/// Polls `check` every `interval` until it is ready, at most `bound`.
pub async fn until<T, F, Fut>(
    what: &str,
    bound: Duration,
    interval: Duration,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Check<T>>>,
{
    let start = Instant::now();
    let mut next_progress = start + PROGRESS_EVERY;
    loop {
        let state = match check().await? {
            Check::Ready(value) => {
                if start.elapsed() >= PROGRESS_EVERY {
                    progress(&format!("{what}: done after {}", secs(start.elapsed())));
                }
                return Ok(value);
            }
            Check::Pending(state) => state,
        };
        let now = Instant::now();
        if now - start >= bound {
            bail!(
                "timed out after {} waiting for {what}; last state: {state}",
                secs(bound)
            );
        }
        if now >= next_progress {
            progress(&format!(
                "waiting for {what}: {state} [{} of {}]",
                secs(now - start),
                secs(bound)
            ));
            next_progress = now + PROGRESS_EVERY;
        }
        tokio::time::sleep(interval).await;
    }
}

/// Like [`until`], but an error from `check` is one more pending observation, not the
/// end of the wait: for checks against the Kubernetes API or `kubectl exec`, where a
/// throttled request, a timeout or an exec upgrade error on a loaded machine says nothing
/// about the awaited state. The bound still decides, and the error is the last state
/// reported when it passes.
pub async fn until_retrying<T, F, Fut>(
    what: &str,
    bound: Duration,
    interval: Duration,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Check<T>>>,
{
    until(what, bound, interval, || {
        let observation = check();
        async move {
            Ok(match observation.await {
                Ok(check) => check,
                Err(e) => Check::Pending(format!("error (retrying): {e:#}")),
            })
        }
    })
    .await
}

/// Awaits `fut` for at most `bound`, printing a line every few seconds meanwhile.
pub async fn bounded<T>(what: &str, bound: Duration, fut: impl Future<Output = T>) -> Result<T> {
    let start = Instant::now();
    tokio::pin!(fut);
    let mut ticker = tokio::time::interval_at(start + PROGRESS_EVERY, PROGRESS_EVERY);
    let deadline = tokio::time::sleep(bound);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            value = &mut fut => return Ok(value),
            _ = &mut deadline => bail!("timed out after {} waiting for {what}", secs(bound)),
            _ = ticker.tick() => progress(&format!(
                "waiting for {what} [{} of {}]",
                secs(start.elapsed()),
                secs(bound)
            )),
        }
    }
}

/// A progress line, indented under the step that prints it.
pub fn progress(line: &str) {
    println!("      … {line}");
}

/// `12.3s`
pub fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn retrying_waits_outlast_transient_errors_but_not_their_bound() {
        let calls = AtomicU32::new(0);
        let value = until_retrying(
            "a flaky check",
            Duration::from_secs(5),
            Duration::ZERO,
            || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => bail!("429 Too Many Requests"),
                    _ => Ok(Check::Ready(7)),
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(value, 7);

        let e = until_retrying::<(), _, _>(
            "a broken check",
            Duration::from_millis(50),
            Duration::from_millis(10),
            || async { bail!("connection refused") },
        )
        .await
        .unwrap_err();
        assert!(format!("{e}").contains("connection refused"), "{e}");
    }

    #[tokio::test]
    async fn plain_waits_end_at_the_first_error() {
        let e = until::<(), _, _>(
            "a check",
            Duration::from_secs(5),
            Duration::ZERO,
            || async { bail!("gave up") },
        )
        .await
        .unwrap_err();
        assert_eq!(e.to_string(), "gave up");
    }
}
