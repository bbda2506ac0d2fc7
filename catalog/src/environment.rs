//! Environments: named groups of volumes (members) that are snapshotted, cloned, rewound,
//! refreshed and deleted as one (PRODUCT.md, "environment").
//!
//! An environment record (JSON, under `cE<name>`) holds its members (`MEMBER` to volume name)
//! and its environment snapshots `ENV@N`, each naming one snapshot per member. Volumes carry
//! nothing about environments: [`Catalog::environment_of`] looks a volume up in the records.
//!
//! Every operation here builds its volume and environment records on copies and commits them
//! together, with their map changes, in ONE `commit_with` batch: environment records staged
//! with `stage_env` are written by `commit_with` in the same engine batch as the volumes and
//! replace the in-memory records only once it committed. So a member that fails changes
//! nothing, not even the members before it. Since the store runs every catalog operation and
//! every write commit under one exclusive lock, an environment snapshot is one instant for all
//! members: a write answered before it is in every member's snapshot, one answered after it in
//! none.
//!
//! Names: an environment name follows `validate_name` and is never a volume's name (nor the
//! reverse); member names have no `.`, since the clones of environment `NEW` are `NEW.MEMBER`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    format_time, k, parse_time, reference, validate_name, BlockMap, Catalog, CatalogError, HookSetting, Kind, Lease,
    Reference, Result, SnapSel, SnapshotId, Volume,
};

const K_ENV: &[u8] = b"cE";

/// A named group of volumes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Environment {
    /// Its name.
    pub name: String,
    /// Member name to volume name.
    pub members: BTreeMap<String, String>,
    /// Creation time, unix milliseconds.
    pub created_at: i64,
    /// What it was cloned from (`ENV@N`, `ENV@latest`, `ENV@TIME`); None when created.
    pub origin: Option<String>,
    /// Number the next environment snapshot gets.
    pub next_snapshot: u64,
    /// Its environment snapshots, oldest first.
    pub snapshots: Vec<EnvSnapshot>,
    /// Hook scripts by event (a clone starts with its source's: see `hooks`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hooks: BTreeMap<String, HookSetting>,
    /// An environment clone's lease (see `lease`): the environment is deleted as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
}

/// `ENV@N`: one snapshot of every member, taken at one instant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvSnapshot {
    /// Number on its environment, counting up from 1.
    pub id: u64,
    /// Creation time, unix milliseconds.
    pub created_at: i64,
    /// Member name to the member's snapshot.
    pub members: BTreeMap<String, SnapshotId>,
    /// Names for it.
    pub bookmarks: Vec<String>,
}

impl crate::Point for EnvSnapshot {
    fn id(&self) -> u64 {
        self.id
    }
    fn created_at(&self) -> i64 {
        self.created_at
    }
    fn bookmarks(&self) -> &[String] {
        &self.bookmarks
    }
}

/// What an environment reference resolves to: a snapshot per member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvPoint {
    /// The environment.
    pub environment: String,
    /// The reference as resolved: `ENV@N`, `ENV@latest` or `ENV@TIME`.
    pub label: String,
    /// Member name to its snapshot.
    pub members: BTreeMap<String, SnapshotId>,
}

/// What a rewind or refresh did to one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberMove {
    /// The member.
    pub member: String,
    /// Its volume.
    pub volume: String,
    /// The snapshot it now shows.
    pub target: SnapshotId,
    /// The snapshot that keeps its state before.
    pub kept: SnapshotId,
}

impl Environment {
    /// The environment snapshot `sel` names (`Latest`: the newest; `At`: the newest at or
    /// before that time).
    fn find(&self, sel: &SnapSel) -> Result<&EnvSnapshot> {
        crate::select(&self.name, &self.snapshots, sel)
    }
}

/// Load every environment record.
pub(crate) fn load(map: &BlockMap) -> Result<BTreeMap<String, Environment>> {
    let mut out = BTreeMap::new();
    for (key, val) in map.scan_meta(K_ENV)? {
        let name = String::from_utf8_lossy(&key[K_ENV.len()..]).into_owned();
        let env: Environment =
            serde_json::from_slice(&val).map_err(|_| CatalogError::Corrupt(format!("{name} (environment)")))?;
        if env.name != name {
            return Err(CatalogError::Corrupt(format!("{name} (environment)")));
        }
        out.insert(name, env);
    }
    Ok(out)
}

/// Check a member name: a valid name without `.`.
fn check_member_name(member: &str) -> Result<()> {
    validate_name("member", member)?;
    if member.contains('.') {
        return Err(CatalogError::InvalidName {
            name: member.to_string(),
            why: "a member name has no `.` (the clones of environment NEW are named NEW.MEMBER)".into(),
        });
    }
    Ok(())
}

impl Catalog {
    /// All environments, by name.
    pub fn environments(&self) -> &BTreeMap<String, Environment> {
        &self.environments
    }

    /// One environment.
    pub fn environment(&self, name: &str) -> Result<&Environment> {
        self.environments.get(name).ok_or_else(|| CatalogError::UnknownEnvironment(name.to_string()))
    }

    /// The environment `volume` is a member of, if any.
    pub fn environment_of(&self, volume: &str) -> Option<&Environment> {
        self.environments.values().find(|e| e.members.values().any(|v| v == volume))
    }

    /// Stage an environment record (None: its removal) for the open `commit_with`.
    pub(crate) fn stage_env(&mut self, name: &str, env: Option<Environment>) {
        self.env_pending.push((name.to_string(), env));
    }

    /// Write the staged environment records into the open batch (called by `commit_with`).
    pub(crate) fn stage_environments(&mut self) -> Result<()> {
        for (name, env) in &self.env_pending {
            match env {
                Some(e) => {
                    let json = serde_json::to_vec(e).map_err(|_| CatalogError::Corrupt(name.clone()))?;
                    self.map.put_meta(&k(K_ENV, name), json);
                }
                None => self.map.remove_meta(&k(K_ENV, name)),
            }
        }
        Ok(())
    }

    /// Make the committed environment records the in-memory ones (called by `commit_with`).
    pub(crate) fn apply_environments(&mut self) {
        for (name, env) in std::mem::take(&mut self.env_pending) {
            match env {
                Some(e) => self.environments.insert(name, e),
                None => self.environments.remove(&name),
            };
        }
    }

    /// Check a new environment's name: valid, and neither a volume's nor an environment's.
    pub(crate) fn new_env_name(&self, name: &str) -> Result<()> {
        self.unused_name("environment", name)
    }

    /// Check the members of a new environment: at least one, valid member names, existing
    /// volumes, each given once and in no other environment.
    fn check_members(&self, members: &BTreeMap<String, String>) -> Result<()> {
        if members.is_empty() {
            return Err(CatalogError::BadEnvironment("an environment needs at least one member: MEMBER=VOLUME".into()));
        }
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for (member, volume) in members {
            check_member_name(member)?;
            self.volume(volume)?;
            if let Some(env) = self.environment_of(volume) {
                return Err(CatalogError::InEnvironment {
                    volume: volume.clone(),
                    environment: env.name.clone(),
                    hint: "; a volume belongs to one environment at most",
                });
            }
            if let Some(other) = seen.insert(volume, member) {
                return Err(CatalogError::BadEnvironment(format!(
                    "volume `{volume}` is given twice (members `{other}` and `{member}`)"
                )));
            }
        }
        Ok(())
    }

    /// Create environment `name` over existing volumes (`members`: member name to volume).
    pub fn env_create(&mut self, name: &str, members: &BTreeMap<String, String>) -> Result<Environment> {
        self.new_env_name(name)?;
        self.check_members(members)?;
        let env = Environment {
            name: name.to_string(),
            members: members.clone(),
            created_at: self.now(),
            origin: None,
            next_snapshot: 1,
            snapshots: Vec::new(),
            hooks: BTreeMap::new(),
            lease: None,
        };
        self.commit_with(|cat| {
            cat.stage_env(name, Some(env.clone()));
            Ok((vec![], vec![], env))
        })
    }

    /// Take one snapshot of every member at one instant: `ENV@N`.
    pub fn env_snapshot(&mut self, name: &str, bookmark: Option<&str>) -> Result<EnvPoint> {
        let mut env = self.environment(name)?.clone();
        if let Some(b) = bookmark {
            reference::validate_bookmark(b)?;
            if let Some(s) = env.snapshots.iter().find(|s| s.bookmarks.iter().any(|x| x == b)) {
                return Err(CatalogError::BookmarkTaken { bookmark: b.into(), on: format!("{name}@{}", s.id) });
            }
        }
        let mut volumes: Vec<(String, Volume)> = Vec::new();
        for (member, volume) in &env.members {
            let v = self.volume(volume)?.clone();
            Self::not_masked(&v, "snapshotted")?;
            volumes.push((member.clone(), v));
        }
        self.commit_with(|cat| {
            let created_at = cat.now();
            let mut members = BTreeMap::new();
            for (member, v) in &mut volumes {
                members.insert(member.clone(), cat.take_snapshot(v, "env-snapshot", None)?);
            }
            let id = env.next_snapshot;
            env.next_snapshot += 1;
            let bookmarks = bookmark.map(|b| vec![b.to_string()]).unwrap_or_default();
            env.snapshots.push(EnvSnapshot { id, created_at, members: members.clone(), bookmarks });
            cat.stage_env(&env.name, Some(env.clone()));
            let point = EnvPoint { environment: env.name.clone(), label: format!("{}@{id}", env.name), members };
            Ok((volumes.into_iter().map(|(_, v)| v).collect(), vec![], point))
        })
    }

    /// Resolve `ENV`, `ENV@N`, `ENV@BOOKMARK`, `ENV@latest` or `ENV@TIME` to one snapshot per
    /// member. `@N` and bookmarks name environment snapshots; plain `ENV`, `@latest` and
    /// `@TIME` pick, for each member, its newest snapshot (at or before TIME), which fits a
    /// group of sources fed by separate ingests.
    pub fn env_resolve(&self, reference: &str) -> Result<EnvPoint> {
        let r = Reference::parse(reference)?;
        let env = self.environment(&r.volume)?;
        match r.snapshot.unwrap_or(SnapSel::Latest) {
            sel @ (SnapSel::Id(_) | SnapSel::Bookmark(_)) => self.env_point(env, env.find(&sel)?),
            SnapSel::Latest => self.newest_of_members(env, None),
            SnapSel::At(t) => self.newest_of_members(env, Some(t)),
        }
    }

    /// Environment snapshot `s` of `env`, checking its member snapshots still exist.
    fn env_point(&self, env: &Environment, s: &EnvSnapshot) -> Result<EnvPoint> {
        for sid in s.members.values() {
            self.volume(&sid.volume)?.find(&SnapSel::Id(sid.id))?;
        }
        Ok(EnvPoint {
            environment: env.name.clone(),
            label: format!("{}@{}", env.name, s.id),
            members: s.members.clone(),
        })
    }

    /// Each member's newest snapshot (at or before `at`); an error names a member without one.
    fn newest_of_members(&self, env: &Environment, at: Option<i64>) -> Result<EnvPoint> {
        let mut members = BTreeMap::new();
        for (member, volume) in &env.members {
            let v = self.volume(volume)?;
            let s = v.snapshots.iter().rev().find(|s| at.is_none_or(|t| s.created_at <= t));
            let s = s.ok_or_else(|| CatalogError::MemberWithoutSnapshot {
                environment: env.name.clone(),
                member: member.clone(),
                volume: volume.clone(),
                when: at.map_or_else(|| "yet".to_string(), |t| format!("at or before {}", format_time(t))),
            })?;
            members.insert(member.clone(), SnapshotId { volume: v.name.clone(), id: s.id });
        }
        let label = at.map_or_else(|| format!("{}@latest", env.name), |t| format!("{}@{}", env.name, format_time(t)));
        Ok(EnvPoint { environment: env.name.clone(), label, members })
    }

    /// Clone every member of `from` (see [`Catalog::env_resolve`]) as `NAME.MEMBER`, and make
    /// them environment `name`. Every name is checked before anything changes.
    pub fn env_clone(&mut self, from: &str, name: &str) -> Result<(Environment, EnvPoint)> {
        self.env_clone_leased(from, name, None)
    }

    /// [`Catalog::env_clone`], the new environment holding `lease` from its first commit (see
    /// [`Catalog::lease_for_env_clone`]).
    pub fn env_clone_leased(
        &mut self,
        from: &str,
        name: &str,
        lease: Option<Lease>,
    ) -> Result<(Environment, EnvPoint)> {
        let point = self.env_resolve(from)?;
        self.new_env_name(name)?;
        let hooks = crate::hooks::inherited(&self.environment(&point.environment)?.hooks);
        let mut plan = Vec::new();
        for (member, sid) in &point.members {
            let clone = format!("{name}.{member}");
            self.new_name(&clone)?;
            self.downstream(&sid.to_string())?;
            plan.push((member.clone(), clone, self.volume(&sid.volume)?.clone(), sid.id));
        }
        self.commit_with(|cat| {
            let mut env = Environment {
                name: name.to_string(),
                members: BTreeMap::new(),
                created_at: cat.now(),
                origin: Some(point.label.clone()),
                next_snapshot: 1,
                snapshots: Vec::new(),
                hooks,
                lease,
            };
            let mut clones = Vec::new();
            for (member, clone, parent, id) in &plan {
                clones.push(cat.clone_in(parent, *id, clone)?);
                env.members.insert(member.clone(), clone.clone());
            }
            cat.stage_env(name, Some(env.clone()));
            Ok((clones, vec![], (env, point)))
        })
    }

    /// The environment snapshot a rewind of `env` goes to: `ENV@SEL`, `@SEL`, `N`, or a time
    /// (the newest environment snapshot at or before it).
    fn env_rewind_target(&self, env: &Environment, to: &str) -> Result<EnvPoint> {
        let sel = if let Some(t) = parse_time(to) {
            SnapSel::At(t)
        } else if !to.is_empty() && to.bytes().all(|c| c.is_ascii_digit()) {
            Reference::parse(&format!("{}@{to}", env.name))?.snapshot.unwrap_or(SnapSel::Latest)
        } else {
            let full = if to.starts_with('@') { format!("{}{to}", env.name) } else { to.to_string() };
            let r = Reference::parse(&full)?;
            match r.snapshot {
                Some(sel) if r.volume == env.name => sel,
                _ => {
                    return Err(CatalogError::BadEnvironment(format!(
                        "rewind `{}` to `{to}`: name one of its snapshots (ENV@N, @N, N, @BOOKMARK) or a time",
                        env.name
                    )))
                }
            }
        };
        self.env_point(env, env.find(&sel)?)
    }

    /// Move every member to its snapshot in `targets`, all in one transaction.
    fn env_move(&mut self, env: &str, targets: &BTreeMap<String, SnapshotId>, reason: &str) -> Result<Vec<MemberMove>> {
        let verb = if reason == "rewind" { "rewound" } else { "refreshed" };
        let env = self.environment(env)?.clone();
        let mut volumes = Vec::new();
        for (member, volume) in &env.members {
            let v = self.volume(volume)?.clone();
            if v.kind != Kind::Clone {
                return Err(CatalogError::NotAClone(v.name, verb));
            }
            Self::not_masked(&v, verb)?;
            let target = targets.get(member).ok_or_else(|| CatalogError::UnknownSnapshot(member.clone()))?;
            volumes.push((member.clone(), v, target.clone()));
        }
        self.commit_with(|cat| {
            let mut moves = Vec::new();
            for (member, v, target) in &mut volumes {
                let kept = cat.repoint_in(v, target, reason)?;
                moves.push(MemberMove { member: member.clone(), volume: v.name.clone(), target: target.clone(), kept });
            }
            Ok((volumes.into_iter().map(|(_, v, _)| v).collect(), vec![], moves))
        })
    }

    /// Rewind every member of `name` to its snapshot in an environment snapshot (see
    /// `env_rewind_target`), as one operation: if any member cannot, none changes.
    pub fn env_rewind(&mut self, name: &str, to: &str) -> Result<(EnvPoint, Vec<MemberMove>)> {
        let point = self.env_rewind_target(self.environment(name)?, to)?;
        let moves = self.env_move(name, &point.members, "rewind")?;
        Ok((point, moves))
    }

    /// Refresh every member of `name` to the newest snapshot of its origin volume, as one
    /// operation: if any member cannot, none changes.
    pub fn env_refresh(&mut self, name: &str) -> Result<Vec<MemberMove>> {
        let env = self.environment(name)?;
        let mut targets = BTreeMap::new();
        for (member, volume) in &env.members {
            let v = self.volume(volume)?;
            let origin = Self::refresh_origin(v)?;
            let src = self.volume(&origin.volume)?;
            let s = src.find(&SnapSel::Latest)?;
            targets.insert(member.clone(), SnapshotId { volume: src.name.clone(), id: s.id });
        }
        self.env_move(name, &targets, "refresh")
    }

    /// Delete environment `name` and, unless `keep_volumes`, every member volume with its
    /// snapshots, in one transaction. Refused, naming them, while clones outside the
    /// environment depend on a member. Returns the volumes deleted.
    pub fn env_delete(&mut self, name: &str, keep_volumes: bool) -> Result<Vec<String>> {
        let members = self.check_env_delete(name, keep_volumes)?;
        self.commit_with(|cat| {
            for root in members.iter().flat_map(Volume::roots) {
                cat.drop_root(root)?;
            }
            cat.stage_env(name, None);
            let removed: Vec<String> = members.iter().map(|v| v.name.clone()).collect();
            Ok((vec![], removed.clone(), removed))
        })
    }

    /// The member volumes deleting environment `name` would delete (none with
    /// `keep_volumes`), or why it is refused, without changing anything.
    pub fn check_env_delete(&self, name: &str, keep_volumes: bool) -> Result<Vec<Volume>> {
        let env = self.environment(name)?;
        let members: Vec<Volume> = if keep_volumes {
            Vec::new()
        } else {
            env.members.values().map(|v| self.volume(v).cloned()).collect::<Result<_>>()?
        };
        let inside = |n: &str| env.members.values().any(|v| v == n);
        let deps: Vec<String> = self
            .volumes
            .values()
            .filter(|c| {
                !inside(&c.name) && c.origin.as_ref().is_some_and(|o| members.iter().any(|m| m.name == o.volume))
            })
            .map(|c| c.name.clone())
            .collect();
        if !deps.is_empty() {
            return Err(CatalogError::HasDependents { what: format!("environment `{name}`"), dependents: deps });
        }
        Ok(members)
    }
}

#[cfg(test)]
#[path = "env_tests.rs"]
mod tests;
