//! Requests that share one round trip: callers queue theirs, and a single flusher sends
//! whatever is queued as one batch, then the next batch, until the queue is empty.
//!
//! The same shape as the store's group commit (`store/writer.rs`): no timer and no
//! waiting when the queue is empty, so a lone request goes out at once, while requests
//! that arrive during a round trip wait for that one to end and then share the next.
//! In a reconnect storm thousands of registry claims thus cost a few Redis round trips
//! instead of one each.

use std::sync::Mutex;

/// A queue of `T` with at most one flusher at a time.
pub(crate) struct Batcher<T> {
    queue: Mutex<Queue<T>>,
}

struct Queue<T> {
    /// Requests waiting for the next batch, oldest first.
    waiting: Vec<T>,
    /// Whether a flusher is running: it takes `waiting` until it finds it empty.
    flushing: bool,
}

impl<T> Batcher<T> {
    /// An empty queue.
    pub(crate) fn new() -> Self {
        Batcher {
            queue: Mutex::new(Queue {
                waiting: Vec::new(),
                flushing: false,
            }),
        }
    }

    /// Queues `item`. Returns true when no flusher is running: the caller must start
    /// one, which calls [`Batcher::take`] until it returns an empty batch.
    #[must_use]
    pub(crate) fn push(&self, item: T) -> bool {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.waiting.push(item);
        !std::mem::replace(&mut q.flushing, true)
    }

    /// The flusher's next batch: at most `max` of the oldest waiting requests. An empty
    /// batch means nothing was waiting, and the flusher has stopped (the next
    /// [`Batcher::push`] starts another).
    pub(crate) fn take(&self, max: usize) -> Vec<T> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.waiting.is_empty() {
            q.flushing = false;
            return Vec::new();
        }
        let n = q.waiting.len().min(max);
        q.waiting.drain(..n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_flusher_takes_what_was_queued_meanwhile_then_stops() {
        let b = Batcher::new();
        assert!(b.push(1), "the first request starts a flusher");
        assert!(!b.push(2), "later ones join its queue");
        assert!(!b.push(3));
        assert_eq!(b.take(2), vec![1, 2]);
        assert_eq!(b.take(2), vec![3]);
        assert!(b.take(2).is_empty(), "an empty queue stops the flusher");
        assert!(b.push(4), "so the next request starts another");
    }
}
