//! Retention: per-volume rules that say which snapshots stay (PRODUCT.md, "retention"), the pure
//! plan that applies them, and [`Catalog::prune`], which deletes what the plan names in one
//! commit.
//!
//! The rules, each optional: keep the newest N (`keep-last`); keep the newest snapshot of each of
//! the N most recent UTC hours, days, or ISO weeks (Monday start) that have snapshots
//! (`keep-hourly`, `keep-daily`, `keep-weekly`). A snapshot kept by any rule stays. Whatever the
//! rules, these stay too: bookmarked snapshots, snapshots of a bookmarked environment snapshot,
//! snapshots clones depend on (they cannot be deleted until the clones are detached or gone),
//! the latest snapshot of a source while an ingest runs (its base), and the snapshots the caller
//! pins (operations running in the daemon). A volume without rules is never pruned, and unless
//! `keep-last` is explicitly 0, the newest snapshot always stays: rules can never delete
//! everything by accident.
//!
//! A mask in progress needs no pin: [`Catalog::mask_begin`] makes the masked volume depend on
//! the snapshot being masked before its hook runs, so the dependents rule keeps it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{Catalog, Result, Snapshot, SnapshotId};

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// Which bucket a time falls in (its hour, day or week); `None` for `keep-last`, which counts
/// snapshots rather than buckets.
type Bucket = Option<fn(i64) -> i64>;

/// A volume's retention rules (`forkd retention set`). `None` is a rule not set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Keep the newest N snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent UTC hours with snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent UTC days with snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent ISO weeks with snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
}

impl Retention {
    /// True when no rule is set: nothing is ever pruned.
    pub fn is_empty(&self) -> bool {
        self.rules().is_empty()
    }

    /// The rules that are set, as `(name, N, bucket)`.
    fn rules(&self) -> Vec<(&'static str, u32, Bucket)> {
        let all: [(&'static str, Option<u32>, Bucket); 4] = [
            ("keep-last", self.keep_last, None),
            ("keep-hourly", self.keep_hourly, Some(|t| t.div_euclid(HOUR_MS))),
            ("keep-daily", self.keep_daily, Some(|t| t.div_euclid(DAY_MS))),
            ("keep-weekly", self.keep_weekly, Some(iso_week)),
        ];
        all.into_iter().filter_map(|(name, n, bucket)| n.map(|n| (name, n, bucket))).collect()
    }
}

impl std::fmt::Display for Retention {
    /// `keep-last 3, keep-daily 7`, or `none`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rules: Vec<String> = self.rules().iter().map(|(name, n, _)| format!("{name} {n}")).collect();
        if rules.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&rules.join(", "))
        }
    }
}

/// The ISO week (Monday start) of a unix-millisecond time, as weeks since the Monday before
/// the epoch (1970-01-01 was a Thursday).
fn iso_week(t: i64) -> i64 {
    (t.div_euclid(DAY_MS) + 3).div_euclid(7)
}

/// A snapshot retention deleted, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pruned {
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// The rules that let it go: `kept by none of keep-last 3, keep-daily 7`.
    pub rule: String,
}

/// The snapshots `rules` keep, by id: the rules alone, without bookmarks or pins.
fn kept_by_rules(snapshots: &[Snapshot], rules: &Retention) -> BTreeSet<u64> {
    let mut kept = BTreeSet::new();
    for (_, n, bucket) in rules.rules() {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        match bucket {
            None => kept.extend(snapshots.iter().rev().take(n).map(|s| s.id)),
            Some(bucket) => {
                // Newest first: the first snapshot seen in a bucket is its newest.
                let mut newest: BTreeMap<i64, u64> = BTreeMap::new();
                for s in snapshots.iter().rev() {
                    newest.entry(bucket(s.created_at)).or_insert(s.id);
                }
                kept.extend(newest.values().rev().take(n));
            }
        }
    }
    kept
}

/// The ids of `snapshots` (oldest first) that `rules` delete, each with the reason. Bookmarked
/// snapshots and `pinned` ids stay; the newest stays unless `keep_last` is `Some(0)`; with no
/// rule set nothing goes. Pure: the same input always gives the same plan.
pub fn plan(snapshots: &[Snapshot], rules: &Retention, pinned: &BTreeSet<u64>) -> Vec<(u64, String)> {
    if rules.is_empty() {
        return Vec::new();
    }
    let mut kept = kept_by_rules(snapshots, rules);
    if rules.keep_last != Some(0) {
        kept.extend(snapshots.last().map(|s| s.id));
    }
    let reason = format!("kept by none of {rules}");
    snapshots
        .iter()
        .filter(|s| !kept.contains(&s.id) && s.bookmarks.is_empty() && !pinned.contains(&s.id))
        .map(|s| (s.id, reason.clone()))
        .collect()
}

impl Catalog {
    /// Set (or, with `None` or empty rules, clear) a volume's retention rules.
    pub fn set_retention(&mut self, volume: &str, rules: Option<Retention>) -> Result<crate::Volume> {
        let mut v = self.volume(volume)?.clone();
        v.retention = rules.filter(|r| !r.is_empty());
        self.commit_with(|_| Ok((vec![v.clone()], vec![], v)))
    }

    /// The snapshots of `volume` that must stay whatever its rules say, besides bookmarked
    /// ones: `pinned` (by the caller), those clones depend on, those of bookmarked environment
    /// snapshots, and a source's latest while an ingest runs.
    fn held(&self, v: &crate::Volume, pinned: &BTreeSet<SnapshotId>) -> BTreeSet<u64> {
        let mut held: BTreeSet<u64> = pinned.iter().filter(|p| p.volume == v.name).map(|p| p.id).collect();
        held.extend(
            self.volumes.values().filter_map(|c| c.origin.as_ref()).filter(|o| o.volume == v.name).map(|o| o.id),
        );
        let env_snaps = self.environments.values().flat_map(|e| &e.snapshots).filter(|s| !s.bookmarks.is_empty());
        held.extend(env_snaps.flat_map(|s| s.members.values()).filter(|m| m.volume == v.name).map(|m| m.id));
        if v.staging.is_some() {
            held.extend(v.snapshots.last().map(|s| s.id));
        }
        held
    }

    /// What [`Catalog::prune`] would delete now, without deleting it.
    pub fn prune_plan(&self, volume: &str, pinned: &BTreeSet<SnapshotId>) -> Result<Vec<Pruned>> {
        let v = self.volume(volume)?;
        let Some(rules) = &v.retention else { return Ok(Vec::new()) };
        let held = self.held(v, pinned);
        let planned = plan(&v.snapshots, rules, &held);
        let name = &v.name;
        Ok(planned
            .into_iter()
            .map(|(id, rule)| Pruned { snapshot: SnapshotId { volume: name.clone(), id }, rule })
            .collect())
    }

    /// Apply `volume`'s retention rules: delete every snapshot they let go (see the module
    /// documentation), releasing their roots, in one commit. Returns what went and why.
    pub fn prune(&mut self, volume: &str, pinned: &BTreeSet<SnapshotId>) -> Result<Vec<Pruned>> {
        let pruned = self.prune_plan(volume, pinned)?;
        if pruned.is_empty() {
            return Ok(pruned);
        }
        let mut v = self.volume(volume)?.clone();
        let doomed: BTreeSet<u64> = pruned.iter().map(|p| p.snapshot.id).collect();
        let roots: Vec<crate::NodeId> = v.snapshots.iter().filter(|s| doomed.contains(&s.id)).map(|s| s.root).collect();
        v.snapshots.retain(|s| !doomed.contains(&s.id));
        self.commit_with(|cat| {
            for root in roots {
                cat.drop_root(root)?;
            }
            Ok((vec![v], vec![], pruned))
        })
    }
}

#[cfg(test)]
#[path = "retention_tests.rs"]
mod tests;
