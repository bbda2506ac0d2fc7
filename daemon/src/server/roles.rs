//! Named API tokens with roles (docs/api.md, "Authentication"): who may call what.
//!
//! A tokens file (`tokens_file` in the config, `--tokens-file`) holds one `NAME ROLE TOKEN` line
//! per token (blank lines and `#` comments allowed). It must not be readable or writable by
//! other users (refused at start otherwise), names must be unique, tokens unique and at least
//! 16 characters. The single shared token of `token_file` is the token named `token`, role
//! `admin`. Roles grow: a `reader` may list, show, read and scrape metrics (every `GET`); an
//! `operator` also snapshots, clones, rewinds, refreshes, deletes, ingests, writes and manages
//! environments, leases and bookmarks; an `admin` also sets hooks, policies, quotas and
//! retention rules, masks, schedules, scrubs and replicates ([`required`]). The name of the
//! token a request came with goes to the operation log.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{anyhow, bail};
use axum::http::Method;

use super::auth::Token;

/// What a token may do; each role may do everything the ones before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads only.
    Reader,
    /// Day-to-day operations on volumes and environments.
    Operator,
    /// Everything, policies and replication included.
    Admin,
}

impl Role {
    /// The role named `text`.
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "reader" => Some(Role::Reader),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// One named token.
#[derive(Debug)]
pub struct Named {
    /// Its name, for the log.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The secret.
    pub token: Token,
}

/// Parse a tokens file's text (`what` names it in errors, which never show a token).
pub fn parse(text: &str, what: &str) -> anyhow::Result<Vec<Named>> {
    let mut out: Vec<Named> = Vec::new();
    let (mut names, mut secrets) = (HashSet::new(), HashSet::new());
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{what}, line {}", i + 1);
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, role, secret] = fields[..] else {
            bail!("{}: expected `NAME ROLE TOKEN`, found {} fields", at(), fields.len());
        };
        let role =
            Role::parse(role).ok_or_else(|| anyhow!("{}: role `{role}` is not reader, operator or admin", at()))?;
        let token = Token::new(secret).map_err(|why| anyhow!("{}: the token of `{name}`: {why}", at()))?;
        if !names.insert(name.to_string()) {
            bail!("{}: the name `{name}` is used twice", at());
        }
        if !secrets.insert(secret.to_string()) {
            bail!("{}: the token of `{name}` is also another name's", at());
        }
        out.push(Named { name: name.to_string(), role, token });
    }
    if out.is_empty() {
        bail!("{what} holds no token");
    }
    Ok(out)
}

/// Read a tokens file, refusing one that other users may read or write.
pub fn load(path: &Path) -> anyhow::Result<Vec<Named>> {
    use std::os::unix::fs::PermissionsExt;
    let what = format!("tokens file {}", path.display());
    let md = std::fs::metadata(path).map_err(|e| anyhow!("cannot read {what}: {e}"))?;
    if md.permissions().mode() & 0o077 != 0 {
        bail!("{what} is readable or writable by other users: chmod 600 it (it holds secrets)");
    }
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("cannot read {what}: {e}"))?;
    parse(&text, &what)
}

/// The role a request needs.
pub fn required(method: &Method, path: &str) -> Role {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Role::Reader;
    }
    // `/v1/RESOURCE/...` and `/v1/volumes/NAME/ACTION`.
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let admin_resource = matches!(segments.get(1), Some(&("hooks" | "mask" | "schedules" | "replicas" | "scrub")));
    let admin_action = segments.get(1) == Some(&"volumes")
        && matches!(
            segments.get(3),
            Some(&("policy" | "quota" | "retention" | "replicate" | "replication" | "promote"))
        );
    if admin_resource || admin_action {
        Role::Admin
    } else {
        Role::Operator
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_files_parse_and_refuse_clearly() {
        let text = "# who may do what\nalice admin 0123456789abcdef0123\n\nbob reader fedcba9876543210fedc\n";
        let t = parse(text, "f").expect("parse");
        assert_eq!(
            t.iter().map(|n| (n.name.as_str(), n.role)).collect::<Vec<_>>(),
            [("alice", Role::Admin), ("bob", Role::Reader)]
        );
        for (bad, why) in [
            ("alice admin", "expected `NAME ROLE TOKEN`"),
            ("alice root 0123456789abcdef0123", "role `root`"),
            ("alice admin short", "at least 16"),
            ("a admin 0123456789abcdef0123\na reader fedcba9876543210fedc", "used twice"),
            ("a admin 0123456789abcdef0123\nb reader 0123456789abcdef0123", "also another name's"),
            ("# nothing\n", "holds no token"),
        ] {
            let err = parse(bad, "f").map(|_| ()).expect_err(bad).to_string();
            assert!(err.contains(why), "{bad}: {err}");
            assert!(!err.contains("0123456789abcdef0123"), "an error shows a token: {err}");
        }
    }

    #[test]
    fn roles_of_requests() {
        let r = |m: Method, p: &str| required(&m, p);
        assert_eq!(r(Method::GET, "/v1/volumes"), Role::Reader);
        assert_eq!(r(Method::GET, "/metrics"), Role::Reader);
        assert_eq!(r(Method::POST, "/v1/volumes/db/snapshot"), Role::Operator);
        assert_eq!(r(Method::POST, "/v1/clones"), Role::Operator);
        assert_eq!(r(Method::DELETE, "/v1/volumes/dev"), Role::Operator);
        assert_eq!(r(Method::POST, "/v1/sources/db/ingest"), Role::Operator);
        assert_eq!(r(Method::PUT, "/v1/volumes/db/policy"), Role::Admin);
        assert_eq!(r(Method::PUT, "/v1/hooks/db/pre-snapshot"), Role::Admin);
        assert_eq!(r(Method::POST, "/v1/mask"), Role::Admin);
        assert_eq!(r(Method::POST, "/v1/schedules"), Role::Admin);
        assert_eq!(r(Method::POST, "/v1/volumes/db/replicate"), Role::Admin);
        assert_eq!(r(Method::PUT, "/v1/replicas/db/incoming"), Role::Admin);
        assert_eq!(r(Method::POST, "/v1/scrub"), Role::Admin);
        assert_eq!(r(Method::DELETE, "/v1/volumes/policy"), Role::Operator, "a volume named `policy`");
        assert_eq!(r(Method::DELETE, "/v1/volumes/db/replication"), Role::Admin);
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Reader);
    }
}
