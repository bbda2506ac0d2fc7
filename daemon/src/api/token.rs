//! The API token as both sides read it: a file holding the token (trimmed, printable ASCII
//! without spaces) or, for client commands, the `FORKD_TOKEN` variable. The daemon's own
//! checks (length, constant-time comparison) live in `server::auth`.

use std::path::Path;

use anyhow::{anyhow, bail, Context};

/// A token's characters: printable ASCII, no spaces (it travels in an HTTP header).
pub fn check_token_text(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("it is empty".into());
    }
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a token may only hold printable ASCII characters, without spaces".into());
    }
    Ok(())
}

/// Read a token file: its content with surrounding whitespace (a final newline) trimmed,
/// which must be non-empty printable ASCII without spaces. Used by the daemon and the CLI.
pub fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read token file {}", path.display()))?;
    let text = std::str::from_utf8(&raw)
        .map_err(|_| anyhow!("token file {}: a token may only hold printable ASCII characters", path.display()))?;
    let text = text.trim();
    check_token_text(text).map_err(|why| anyhow!("token file {}: {why}", path.display()))?;
    Ok(text.to_string())
}

/// The token for `forkd` client commands: the trimmed content of `token_file` when given,
/// else `FORKD_TOKEN` (the token itself; empty means unset), else none.
pub fn client_token(token_file: Option<&Path>) -> anyhow::Result<Option<String>> {
    if let Some(path) = token_file {
        return read_token_file(path).map(Some);
    }
    match std::env::var("FORKD_TOKEN") {
        Ok(t) if t.trim().is_empty() => Ok(None),
        Ok(t) => {
            let t = t.trim();
            check_token_text(t).map_err(|why| anyhow!("FORKD_TOKEN: {why}"))?;
            Ok(Some(t.to_string()))
        }
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            bail!("FORKD_TOKEN: a token may only hold printable ASCII characters")
        }
    }
}
