//! Schedules: a named cron expression (UTC) with steps the daemon runs in order (PRODUCT.md,
//! "schedule"), and what the last run did.
//!
//! Records live in the metadata engine under `cR` + name, as JSON, loaded at open and written
//! with one put and a commit each (like the operation log). The cron expression is kept as text:
//! the daemon parses it (this crate reads no clock and computes no fire times). Steps are parsed
//! into [`Step`] when added and checked against the catalog ([`Catalog::check_step`]); their
//! text form ([`Step`]'s `Display`) is what the API shows and what [`Step::parse`] reads.
//!
//! A run writes `running` (its start) before its first step and clears it when it ends, so a
//! record still `running` at open was cut short by a stop or a crash: the daemon reports it as
//! interrupted.
//!
//! A snapshot or refresh step may name an environment instead of a volume (the environment's
//! operation, all members as one); ingest, mask and prune act on one volume and refuse an
//! environment's name. Volumes and environments share one namespace; which names were
//! environments when the schedule was added is kept in its record ([`Schedule::environments`]),
//! so a run refuses a name that changed kind since ([`Catalog::check_scheduled_step`]).
//!
//! Locking: part of the [`Catalog`], behind the store's lock; write with no transaction open.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Catalog, CatalogError, Kind, Reference, Result};

/// Key prefix of schedule records.
const K_SCHEDULE: &[u8] = b"cR";

/// One step of a schedule, in the words of the CLI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// `ingest SOURCE --from PATH_OR_NBD_URI`.
    Ingest {
        /// The source fed.
        source: String,
        /// An image file or block device on the daemon's host, or `nbd://HOST:PORT/EXPORT`.
        from: String,
    },
    /// `mask SNAPSHOT --into VOLUME [--with SCRIPT]`.
    Mask {
        /// The snapshot masked (`prod@latest`).
        snapshot: String,
        /// The masked volume.
        into: String,
        /// The script; none: the volume's `mask` hook.
        script: Option<String>,
    },
    /// `snapshot VOLUME_OR_ENV`.
    Snapshot {
        /// The volume, or an environment (`ENV@N`).
        volume: String,
    },
    /// `refresh CLONE_OR_ENV...`: each clone (or every member of an environment, as one) to the
    /// newest snapshot of its origin volume, in order.
    Refresh {
        /// The clones and environments.
        clones: Vec<String>,
    },
    /// `prune VOLUME`: apply its retention rules.
    Prune {
        /// The volume.
        volume: String,
    },
}

/// The step forms, for errors.
const FORMS: &str = "ingest SOURCE --from PATH_OR_NBD_URI | mask SNAPSHOT --into VOLUME [--with SCRIPT] | \
                     snapshot VOLUME_OR_ENV | refresh CLONE_OR_ENV... | prune VOLUME";

fn bad_step(text: &str, why: &str) -> CatalogError {
    CatalogError::BadSchedule(format!("step `{}`: {why} (steps: {FORMS})", text.trim()))
}

impl Step {
    /// Parse a step's text (words split on whitespace; no quoting).
    pub fn parse(text: &str) -> Result<Step> {
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            ["ingest", source, "--from", from] => {
                Ok(Step::Ingest { source: (*source).to_string(), from: (*from).to_string() })
            }
            ["mask", snapshot, "--into", into] => {
                Ok(Step::Mask { snapshot: (*snapshot).to_string(), into: (*into).to_string(), script: None })
            }
            ["mask", snapshot, "--into", into, "--with", script]
            | ["mask", snapshot, "--with", script, "--into", into] => Ok(Step::Mask {
                snapshot: (*snapshot).to_string(),
                into: (*into).to_string(),
                script: Some((*script).to_string()),
            }),
            ["snapshot", volume] => Ok(Step::Snapshot { volume: (*volume).to_string() }),
            ["refresh", clones @ ..] if !clones.is_empty() && clones.iter().all(|c| !c.starts_with("--")) => {
                Ok(Step::Refresh { clones: clones.iter().map(|c| (*c).to_string()).collect() })
            }
            ["prune", volume] => Ok(Step::Prune { volume: (*volume).to_string() }),
            [] => Err(bad_step(text, "it is empty")),
            [verb, ..] if ["ingest", "mask", "snapshot", "refresh", "prune"].contains(verb) => {
                Err(bad_step(text, "wrong arguments"))
            }
            [verb, ..] => Err(bad_step(text, &format!("`{verb}` is not a step"))),
        }
    }

    /// The step's first word: `ingest`, `mask`, `snapshot`, `refresh` or `prune`.
    pub fn verb(&self) -> &'static str {
        match self {
            Step::Ingest { .. } => "ingest",
            Step::Mask { .. } => "mask",
            Step::Snapshot { .. } => "snapshot",
            Step::Refresh { .. } => "refresh",
            Step::Prune { .. } => "prune",
        }
    }

    /// The names that may be a volume or an environment: a snapshot step's, a refresh step's.
    pub fn volume_or_env_names(&self) -> &[String] {
        match self {
            Step::Snapshot { volume } => std::slice::from_ref(volume),
            Step::Refresh { clones } => clones,
            Step::Ingest { .. } | Step::Mask { .. } | Step::Prune { .. } => &[],
        }
    }

    /// The volume or environment the step acts on first (for the operation log).
    pub fn target(&self) -> Option<&str> {
        match self {
            Step::Ingest { source, .. } => Some(source),
            Step::Mask { snapshot, .. } => Some(snapshot),
            Step::Snapshot { volume } | Step::Prune { volume } => Some(volume),
            Step::Refresh { clones } => clones.first().map(String::as_str),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Ingest { source, from } => write!(f, "ingest {source} --from {from}"),
            Step::Mask { snapshot, into, script: None } => write!(f, "mask {snapshot} --into {into}"),
            Step::Mask { snapshot, into, script: Some(s) } => write!(f, "mask {snapshot} --into {into} --with {s}"),
            Step::Snapshot { volume } => write!(f, "snapshot {volume}"),
            Step::Refresh { clones } => write!(f, "refresh {}", clones.join(" ")),
            Step::Prune { volume } => write!(f, "prune {volume}"),
        }
    }
}

/// What to do with fire times missed while the daemon was down (or the clock jumped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Run once for all of them.
    #[default]
    Once,
    /// Run at the next fire time only.
    Skip,
}

impl CatchUp {
    /// `once` or `skip`.
    pub fn parse(text: &str) -> Result<CatchUp> {
        match text {
            "once" => Ok(CatchUp::Once),
            "skip" => Ok(CatchUp::Skip),
            _ => Err(CatalogError::BadSchedule(format!("catch_up `{text}`: give once or skip"))),
        }
    }

    /// `once` or `skip`.
    pub fn name(self) -> &'static str {
        match self {
            CatchUp::Once => "once",
            CatchUp::Skip => "skip",
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleRun {
    /// Start, unix milliseconds by the daemon's clock.
    pub started_at: i64,
    /// End; for an interrupted run, when the daemon found it at its next start.
    pub finished_at: i64,
    /// `ok`, `failed` or `interrupted`.
    pub result: String,
    /// Why it failed (the failing step and its error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A schedule's record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// Its name (a volume name's rules).
    pub name: String,
    /// A 5-field cron expression, UTC.
    pub cron: String,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// What to do with missed fire times.
    #[serde(default)]
    pub catch_up: CatchUp,
    /// When it was added (unix milliseconds): no fire time before it is due.
    pub created_at: i64,
    /// The latest fire time already run (or skipped): the next one is the first after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fire: Option<i64>,
    /// The last run that ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<ScheduleRun>,
    /// When the last successful run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_at: Option<i64>,
    /// The names in its snapshot and refresh steps that were environments when it was added
    /// (the others were volumes): a name that changed kind since fails its step.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub environments: BTreeSet<String>,
    /// The start of the run in progress (kept durable: still set at open means interrupted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<i64>,
}

fn key(name: &str) -> Vec<u8> {
    let mut k = K_SCHEDULE.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

/// Load every schedule (at open).
pub(crate) fn load(map: &blockmap::BlockMap) -> Result<BTreeMap<String, Schedule>> {
    let mut out = BTreeMap::new();
    for (k, val) in map.scan_meta(K_SCHEDULE)? {
        let name = String::from_utf8_lossy(&k[K_SCHEDULE.len()..]).into_owned();
        let s: Schedule =
            serde_json::from_slice(&val).map_err(|_| CatalogError::Corrupt(format!("schedule {name}")))?;
        out.insert(name, s);
    }
    Ok(out)
}

impl Catalog {
    /// Every schedule, by name.
    pub fn schedules(&self) -> &BTreeMap<String, Schedule> {
        &self.schedules
    }

    /// One schedule.
    pub fn schedule(&self, name: &str) -> Result<&Schedule> {
        self.schedules.get(name).ok_or_else(|| CatalogError::UnknownSchedule(name.to_string()))
    }

    /// Add a new schedule after checking its name and every step; records which of its steps'
    /// names are environments.
    pub fn add_schedule(&mut self, mut schedule: Schedule) -> Result<()> {
        crate::validate_name("schedule", &schedule.name)?;
        if self.schedules.contains_key(&schedule.name) {
            return Err(CatalogError::ScheduleTaken(schedule.name));
        }
        if schedule.steps.is_empty() {
            return Err(CatalogError::BadSchedule("give at least one step".into()));
        }
        for step in &schedule.steps {
            self.check_step(step)?;
        }
        let names = schedule.steps.iter().flat_map(Step::volume_or_env_names);
        schedule.environments = names.filter(|n| self.environments.contains_key(*n)).cloned().collect();
        self.put_schedule(schedule)
    }

    /// Store `schedule` (new or changed) in one commit.
    pub fn put_schedule(&mut self, schedule: Schedule) -> Result<()> {
        let json =
            serde_json::to_vec(&schedule).map_err(|_| CatalogError::Corrupt(format!("schedule {}", schedule.name)))?;
        self.map.put_meta(&key(&schedule.name), json);
        if let Err(e) = self.map.commit() {
            self.map.rollback();
            return Err(e.into());
        }
        self.schedules.insert(schedule.name.clone(), schedule);
        Ok(())
    }

    /// Remove a schedule.
    pub fn remove_schedule(&mut self, name: &str) -> Result<()> {
        self.schedule(name)?;
        self.map.remove_meta(&key(name));
        if let Err(e) = self.map.commit() {
            self.map.rollback();
            return Err(e.into());
        }
        self.schedules.remove(name);
        Ok(())
    }

    /// Whether `step` names volumes (or, for snapshot and refresh, environments) that exist and
    /// suit it (checked when added; a run checks again as it goes).
    pub fn check_step(&self, step: &Step) -> Result<()> {
        match step {
            Step::Ingest { source, .. } => self.step_volume(step, source, Some(Kind::Source)),
            Step::Mask { snapshot, into, .. } => {
                crate::validate_name("volume", into)?;
                self.step_volume(step, &Reference::parse(snapshot)?.volume, None)
            }
            Step::Prune { volume } => self.step_volume(step, volume, None),
            Step::Snapshot { volume } if self.environments.contains_key(volume) => Ok(()),
            Step::Snapshot { volume } => self.step_volume(step, volume, None),
            Step::Refresh { clones } => clones.iter().try_for_each(|c| match self.environments.get(c) {
                Some(env) => env.members.values().try_for_each(|v| self.refreshable(c, v)),
                None => self.step_volume(step, c, Some(Kind::Clone)),
            }),
        }
    }

    /// Whether `step` of `schedule` can run now: [`Catalog::check_step`], and each name still
    /// the kind it was when the schedule was added (an environment, or a volume).
    pub fn check_scheduled_step(&self, schedule: &Schedule, step: &Step) -> Result<()> {
        let kind = |env: bool| if env { "an environment" } else { "a volume" };
        for name in step.volume_or_env_names() {
            let (was, is) = (schedule.environments.contains(name), self.environments.contains_key(name));
            if was && !is && !self.volumes.contains_key(name) {
                return Err(CatalogError::UnknownEnvironment(name.clone()));
            }
            if was != is {
                return Err(CatalogError::BadSchedule(format!(
                    "`{name}` was {} when schedule `{}` was added and is {} now: add the schedule again",
                    kind(was),
                    schedule.name,
                    kind(is)
                )));
            }
        }
        self.check_step(step)
    }

    /// Volume `name` exists and is of `kind`; an environment is refused, as `step` acts on
    /// one volume.
    fn step_volume(&self, step: &Step, name: &str, kind: Option<Kind>) -> Result<()> {
        if self.environments.contains_key(name) {
            return Err(CatalogError::BadSchedule(format!(
                "`{name}` is an environment: the {} step acts on one volume (only snapshot and refresh steps take \
                 an environment)",
                step.verb()
            )));
        }
        let v = self.volume(name)?;
        match kind {
            Some(Kind::Source) if v.kind != Kind::Source => Err(CatalogError::NotASource(name.to_string())),
            Some(Kind::Clone) if v.kind != Kind::Clone => Err(CatalogError::NotAClone(name.to_string(), "refreshed")),
            _ => Ok(()),
        }
    }

    /// Member `volume` of environment `env` can be refreshed: it exists and is a clone.
    fn refreshable(&self, env: &str, volume: &str) -> Result<()> {
        if self.volume(volume)?.kind != Kind::Clone {
            return Err(CatalogError::BadSchedule(format!(
                "environment `{env}` cannot be refreshed: its member `{volume}` is a source, not a clone"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse_and_print_back() {
        for text in [
            "ingest prod --from nbd://src:10809/prod",
            "mask prod@latest --into prodm",
            "mask prod@latest --into prodm --with scrub.sh",
            "snapshot dev1",
            "refresh dev1 dev2",
            "prune prod",
        ] {
            let step = Step::parse(text).expect(text);
            assert_eq!(step.to_string(), text);
        }
        for text in ["", "ingest prod", "refresh", "refresh --to x", "backup prod", "prune a b"] {
            let err = Step::parse(text).expect_err(text).to_string();
            assert!(err.starts_with("step `"), "{err}");
        }
    }

    #[test]
    fn schedules_survive_reopen_and_steps_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = || {
            let kv = metakv::open(metakv::Engine::DEFAULT, &dir.path().join("meta")).expect("open meta");
            Catalog::open(kv).expect("open catalog")
        };
        let mut cat = open();
        cat.create_source("prod", 1 << 20).expect("source");
        cat.snapshot("prod", None).expect("snapshot");
        cat.clone_volume("prod", "dev1").expect("clone");
        let sched = |steps: &[&str]| Schedule {
            name: "nightly".into(),
            cron: "0 2 * * *".into(),
            steps: steps.iter().map(|s| Step::parse(s).expect("step")).collect(),
            created_at: 1,
            ..Schedule::default()
        };
        let err = cat.add_schedule(sched(&["refresh nope"])).expect_err("unknown volume");
        assert!(matches!(err, CatalogError::UnknownVolume(_)), "{err}");
        let err = cat.add_schedule(sched(&["refresh prod"])).expect_err("not a clone");
        assert!(matches!(err, CatalogError::NotAClone(..)), "{err}");
        let err = cat.add_schedule(sched(&["ingest dev1 --from /x"])).expect_err("not a source");
        assert!(matches!(err, CatalogError::NotASource(_)), "{err}");
        cat.add_schedule(sched(&["ingest prod --from /x", "refresh dev1"])).expect("add");
        assert!(matches!(cat.add_schedule(sched(&["prune prod"])), Err(CatalogError::ScheduleTaken(_))));
        cat.map_mut().flush_store().expect("flush");
        drop(cat);
        let mut cat = open();
        assert_eq!(cat.schedule("nightly").expect("kept").steps.len(), 2);
        cat.remove_schedule("nightly").expect("remove");
        assert!(matches!(cat.schedule("nightly"), Err(CatalogError::UnknownSchedule(_))));
    }

    #[test]
    fn environments_in_steps_are_checked_when_added_and_when_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kv = metakv::open(metakv::Engine::DEFAULT, &dir.path().join("meta")).expect("open meta");
        let mut cat = Catalog::open(kv).expect("open catalog");
        for v in ["db", "app"] {
            cat.create_source(v, 1 << 20).expect("source");
            cat.snapshot(v, None).expect("snapshot");
        }
        let members = |pairs: &[(&str, &str)]| pairs.iter().map(|(m, v)| (m.to_string(), v.to_string())).collect();
        cat.env_create("shop", &members(&[("db", "db"), ("app", "app")])).expect("env");
        cat.env_clone("shop", "dev").expect("env clone");
        let check = |cat: &Catalog, text: &str| cat.check_step(&Step::parse(text).expect(text));
        for ok in ["snapshot shop", "snapshot dev", "refresh dev", "refresh dev dev.db", "snapshot dev.app"] {
            check(&cat, ok).expect(ok);
        }
        for (text, verb) in
            [("prune shop", "prune"), ("ingest dev --from /x", "ingest"), ("mask shop@latest --into m", "mask")]
        {
            let err = check(&cat, text).expect_err(text).to_string();
            let name = if verb == "ingest" { "dev" } else { "shop" };
            assert!(
                err.starts_with(&format!("`{name}` is an environment: the {verb} step acts on one volume")),
                "{err}"
            );
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        let err = check(&cat, "refresh shop").expect_err("members are sources").to_string();
        assert!(err.contains("environment `shop` cannot be refreshed: its member `app` is a source"), "{err}");
        assert!(matches!(check(&cat, "snapshot nope"), Err(CatalogError::UnknownVolume(_))));
        assert!(matches!(check(&cat, "refresh nope"), Err(CatalogError::UnknownVolume(_))));

        // Which names were environments is recorded; a run refuses a name that changed kind.
        cat.create_source("x", 1 << 20).expect("source");
        let steps = ["snapshot shop", "refresh dev dev.db", "snapshot x"];
        let sched = Schedule {
            name: "s".into(),
            cron: "0 2 * * *".into(),
            steps: steps.iter().map(|s| Step::parse(s).expect("step")).collect(),
            ..Schedule::default()
        };
        cat.add_schedule(sched).expect("add");
        let s = cat.schedule("s").expect("added").clone();
        assert_eq!(s.environments, ["dev", "shop"].iter().map(|n| n.to_string()).collect());
        for step in &s.steps {
            cat.check_scheduled_step(&s, step).expect("unchanged");
        }
        cat.env_delete("dev", false).expect("env delete");
        let gone = cat.check_scheduled_step(&s, &s.steps[1]).expect_err("gone");
        assert!(matches!(gone, CatalogError::UnknownEnvironment(_)), "{gone}");
        cat.clone_volume("db", "dev").expect("a volume by the same name");
        let err = cat.check_scheduled_step(&s, &s.steps[1]).expect_err("changed kind").to_string();
        assert_eq!(
            err,
            "`dev` was an environment when schedule `s` was added and is a volume now: add the schedule again"
        );
        cat.delete("x").expect("delete x");
        cat.env_delete("shop", true).expect("env delete, volumes kept");
        cat.env_create("x", &members(&[("app", "app")])).expect("an environment by the same name");
        let err = cat.check_scheduled_step(&s, &s.steps[2]).expect_err("changed kind").to_string();
        assert!(err.starts_with("`x` was a volume when schedule `s` was added and is an environment now"), "{err}");
    }
}
