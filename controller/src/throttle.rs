//! A per-key throttle for reconcile triggers: the first trigger of an object after a quiet window passes at
//! once (a push is reconciled without delay) and opens a window; triggers inside it are coalesced into one, the
//! latest, released when the window ends (which opens the next). So an object is reconciled at most once per
//! window from its triggers, however many arrive (a rollout's stream of finished machines), and none is held
//! longer than its window. Each window's length comes from the item that opens it.
//!
//! kube-runtime's `debounce` is the trailing kind: every trigger waits the whole period, and a steady stream of
//! triggers postpones the reconcile until the stream pauses.

use std::collections::HashMap;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio_util::time::DelayQueue;

/// Throttles `input` per key (see the module docs); `window` gives the window an item opens. Items without a key
/// (errors) pass through at once and open none.
pub fn per_key<S, K, F, W>(input: S, key: F, window: W) -> PerKey<S, K, F, W>
where
    S: Stream,
    K: Hash + Eq + Clone,
    F: FnMut(&S::Item) -> Option<K>,
    W: FnMut(&S::Item) -> Duration,
{
    PerKey { input: Some(Box::pin(input)), key, window, held: HashMap::new(), windows: DelayQueue::new() }
}

/// The stream [`per_key`] returns.
pub struct PerKey<S: Stream, K, F, W> {
    /// None once the input has ended.
    input: Option<Pin<Box<S>>>,
    key: F,
    window: W,
    /// Keys inside a window, with the latest trigger held for its end (if one came).
    held: HashMap<K, Option<S::Item>>,
    /// When each key's window ends.
    windows: DelayQueue<K>,
}

impl<S: Stream, K, F, W> Unpin for PerKey<S, K, F, W> {}

impl<S, K, F, W> Stream for PerKey<S, K, F, W>
where
    S: Stream,
    K: Hash + Eq + Clone,
    F: FnMut(&S::Item) -> Option<K>,
    W: FnMut(&S::Item) -> Duration,
{
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.get_mut();
        while let Some(input) = this.input.as_mut() {
            match input.as_mut().poll_next(cx) {
                Poll::Ready(Some(item)) => {
                    let Some(k) = (this.key)(&item) else { return Poll::Ready(Some(item)) };
                    match this.held.get_mut(&k) {
                        // Inside its window: the latest trigger waits for the window's end.
                        Some(slot) => *slot = Some(item),
                        None => {
                            this.windows.insert(k.clone(), (this.window)(&item));
                            this.held.insert(k, None);
                            return Poll::Ready(Some(item));
                        }
                    }
                }
                // What is held is still released when its window ends; then the stream ends.
                Poll::Ready(None) => this.input = None,
                Poll::Pending => break,
            }
        }
        loop {
            let k = match this.windows.poll_expired(cx) {
                Poll::Ready(Some(ended)) => ended.into_inner(),
                Poll::Ready(None) if this.input.is_none() => return Poll::Ready(None),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            };
            match this.held.get_mut(&k).and_then(Option::take) {
                // Released now, which opens the key's next window.
                Some(item) => {
                    this.windows.insert(k, (this.window)(&item));
                    return Poll::Ready(Some(item));
                }
                None => {
                    this.held.remove(&k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::time::Instant;

    /// Sends `(key, n)` items at the given offsets (ms) and returns what came out, with when (ms). Key "b" has
    /// windows of `window_ms` × the item's number, the others of `window_ms`.
    async fn run(sends: &[(u64, &'static str, u32)], window_ms: u64) -> Vec<(u64, &'static str, u32)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let start = Instant::now();
        let sends = sends.to_vec();
        tokio::spawn(async move {
            for (at, k, n) in sends {
                tokio::time::sleep_until(start + Duration::from_millis(at)).await;
                let _ = tx.send((k, n));
            }
        });
        let mut out = per_key(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
            |(k, _): &(&'static str, u32)| (*k != "error").then_some(*k),
            |(k, n): &(&'static str, u32)| {
                Duration::from_millis(if *k == "b" { window_ms * u64::from(*n) } else { window_ms })
            },
        );
        let mut seen = Vec::new();
        while let Some((k, n)) = out.next().await {
            seen.push((start.elapsed().as_millis() as u64, k, n));
        }
        seen
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_trigger_passes_at_once_and_a_burst_becomes_one_at_the_window_end() {
        let seen = run(&[(0, "a", 1), (10, "a", 2), (20, "a", 3), (50, "a", 4)], 100).await;
        // 1 at once; 2..4 coalesced into the latest, released when the window ends (100 ms after 1).
        assert_eq!(seen, vec![(0, "a", 1), (100, "a", 4)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_is_released_once_per_window_not_postponed() {
        // A trigger every 30 ms for 400 ms: a trailing debounce would release nothing until the stream stops.
        let sends: Vec<(u64, &str, u32)> = (0..14).map(|i| (i * 30, "a", i as u32)).collect();
        let seen = run(&sends, 100).await;
        let times: Vec<u64> = seen.iter().map(|s| s.0).collect();
        assert_eq!(times, vec![0, 100, 200, 300, 400], "{seen:?}");
        // Each release is the latest trigger before it; the last trigger (13, at 390 ms) is never lost.
        assert_eq!(seen.last().map(|s| s.2), Some(13));
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_throttled_apart_and_a_quiet_key_passes_at_once_again() {
        let seen = run(&[(0, "a", 1), (5, "b", 1), (30, "a", 2), (250, "a", 3), (260, "error", 0)], 100).await;
        assert_eq!(seen, vec![(0, "a", 1), (5, "b", 1), (100, "a", 2), (250, "a", 3), (260, "error", 0)]);
    }

    #[tokio::test(start_paused = true)]
    async fn each_window_is_as_long_as_the_item_that_opens_it_says() {
        // b3 opens a 300 ms window, so b4 waits until 300 ms; b4 then opens a 400 ms one (b5 waits until 700).
        let seen = run(&[(0, "b", 3), (10, "b", 4), (350, "b", 5)], 100).await;
        assert_eq!(seen, vec![(0, "b", 3), (300, "b", 4), (700, "b", 5)]);
    }

    #[tokio::test(start_paused = true)]
    async fn items_without_a_key_are_never_held() {
        let seen = run(&[(0, "error", 1), (1, "error", 2), (2, "error", 3)], 100).await;
        assert_eq!(seen, vec![(0, "error", 1), (1, "error", 2), (2, "error", 3)]);
    }
}
