//! The garbage collector: a task beside the periodic flush that dismantles what deletes and
//! other operations released, one bounded step at a time ([`Store::collect_garbage_step`],
//! see `store::gc`), so a large delete never holds the catalog's lock for long.
//!
//! It wakes when an operation leaves garbage behind (`Store::op` wakes it) and on every tick of
//! the flush interval (a queue left by a crash is resumed after a start). After its first
//! round it counts every volume's unique bytes, stale after a start, so the first `forkd list`
//! finds them counted ([`Store::count_unique`]). Each step runs on the
//! blocking pool and takes the write lock for itself alone; between steps the task yields, so
//! readers and writers waiting for the lock get it. When the queue is empty it flushes: the
//! slots the steps freed are punched and can be reused. On shutdown it stops between steps;
//! what is left waits, durably, for the next start.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// Run steps whenever garbage waits, until `stop`.
pub(super) async fn run(store: Arc<Store>, tick: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(tick);
    let mut counted = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = store.collector_woken() => {}
            _ = tick.tick() => {}
        }
        if collect(&store, &stop).await {
            blocking(&store, "flush after garbage collection", Store::flush).await;
        }
        if !std::mem::replace(&mut counted, true) {
            // After what a crash left is collected (its steps make figures stale).
            blocking(&store, "counting unique bytes", |s| {
                s.count_unique();
                Ok(())
            })
            .await;
        }
    }
}

/// Run `f` on the blocking pool; a failure is logged as `what`.
async fn blocking(store: &Arc<Store>, what: &str, f: fn(&Store) -> crate::store::Result<()>) {
    let s = store.clone();
    match tokio::task::spawn_blocking(move || f(&s)).await {
        Ok(Err(e)) => tracing::warn!(error = %e, "{what} failed"),
        Err(e) => tracing::warn!(error = %e, "{what} failed"),
        Ok(Ok(())) => {}
    }
}

/// Steps until the queue is empty, a step fails or `stop`. Returns whether any step ran.
async fn collect(store: &Arc<Store>, stop: &CancellationToken) -> bool {
    let mut ran = false;
    while !stop.is_cancelled() {
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.collect_garbage_step()).await {
            Ok(Ok(step)) => {
                ran |= step.freed_nodes > 0;
                if !step.more {
                    break;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "garbage collection step failed; tried again at the next tick");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "garbage collection task failed");
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    ran
}
