//! The garbage collector: a task beside the periodic flush that dismantles what deletes and
//! other operations released, one bounded step at a time ([`Store::collect_garbage_step`],
//! see `store::gc`), so a large delete never holds the catalog's lock for long.
//!
//! It wakes when an operation leaves garbage behind (`Store::op` wakes it) and on every tick of
//! the flush interval (a queue left by a crash is resumed after a start). Each step runs on the
//! blocking pool and takes the write lock for itself alone; between steps the task yields (or
//! waits `gc_step_pause`), so readers and writers waiting for the lock get it. When the queue
//! is empty it settles the collection ([`Store::settle_collection`]): a flush, after which the
//! slots the steps freed are punched and can be reused. After its first round it counts every
//! volume's unique bytes, stale after a start, so the first `forkd list` finds them counted
//! ([`Store::count_unique`]). On shutdown it stops between steps; what is left waits, durably,
//! for the next start.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// Run steps whenever garbage waits, until `stop`: looking every `tick`, waiting `pause`
/// between two steps.
pub(super) async fn run(store: Arc<Store>, (tick, pause): (Duration, Duration), stop: CancellationToken) {
    let mut tick = tokio::time::interval(tick);
    let mut counted = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = store.collector_woken() => {}
            _ = tick.tick() => {}
        }
        collect(&store, pause, &stop).await;
        blocking(&store, "flush after garbage collection", Store::settle_collection).await;
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

/// Steps until the queue is empty, a step fails or `stop`, `pause` apart.
async fn collect(store: &Arc<Store>, pause: Duration, stop: &CancellationToken) {
    while !stop.is_cancelled() {
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.collect_garbage_step()).await {
            Ok(Ok(step)) if step.more && pause.is_zero() => tokio::task::yield_now().await,
            Ok(Ok(step)) if step.more => tokio::time::sleep(pause).await,
            Ok(Ok(_)) => break,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "garbage collection step failed; tried again at the next tick");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "garbage collection task failed");
                break;
            }
        }
    }
}
