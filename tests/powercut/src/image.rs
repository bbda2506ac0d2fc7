//! Moving a tree between the power-cut filesystem and a real directory: loading a directory
//! as the starting state (everything in it durable) and writing the survivors of a cut out as
//! plain files (sparse: blocks that were never written or were punched stay holes), so a
//! restarted daemon can be pointed at them, or they can be loaded again for the next cut.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use crate::model::{Contents, Node, Survivors, Tree, BLOCK, ROOT};

/// Deeper trees are refused (and a directory that durably contains itself is cut off there).
const MAX_DEPTH: usize = 64;

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// A tree holding a copy of directory `from` (regular files and directories only), all of it
/// durable.
pub(crate) fn load(from: &Path) -> io::Result<Tree> {
    let meta = fs::metadata(from)?;
    let mut tree = Tree::new(meta.uid(), meta.gid());
    load_dir(&mut tree, ROOT, from, 0)?;
    Ok(tree)
}

fn load_dir(tree: &mut Tree, dir: u64, path: &Path, depth: usize) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(io::Error::other(format!("{}: tree deeper than {MAX_DEPTH}", path.display())));
    }
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        let perm = u16::try_from(meta.mode() & 0o7777).unwrap_or(0o644);
        let owner = (perm, meta.uid(), meta.gid());
        if meta.is_dir() {
            let node = Node::Dir { now: BTreeMap::new(), durable: BTreeMap::new() };
            let ino = tree.insert_durable(dir, &entry.file_name(), node, owner).map_err(errno)?;
            load_dir(tree, ino, &entry.path(), depth + 1)?;
        } else if meta.is_file() {
            let contents = read_contents(&entry.path())?;
            let node = Node::File { now: contents, durable: Contents::default() };
            tree.insert_durable(dir, &entry.file_name(), node, owner).map_err(errno)?;
        } else {
            return Err(io::Error::other(format!("{}: only files and directories", entry.path().display())));
        }
    }
    Ok(())
}

/// A file's contents, keeping only its non-zero blocks.
fn read_contents(path: &Path) -> io::Result<Contents> {
    let mut file = File::open(path)?;
    let mut contents = Contents { size: file.metadata()?.len(), blocks: BTreeMap::new() };
    let mut index = 0u64;
    loop {
        let mut block = Vec::with_capacity(usize::try_from(BLOCK).unwrap_or(4096));
        let n = (&mut file).take(BLOCK).read_to_end(&mut block)?;
        if n == 0 {
            break;
        }
        if block.iter().any(|&b| b != 0) {
            block.resize(usize::try_from(BLOCK).unwrap_or(4096), 0);
            contents.blocks.insert(index, Arc::new(block));
        }
        index += 1;
    }
    Ok(contents)
}

/// Write the survivors of a cut into directory `to` (which must exist and be empty).
pub(crate) fn write(survivors: &Survivors, to: &Path) -> io::Result<()> {
    if fs::read_dir(to)?.next().is_some() {
        return Err(io::Error::other(format!("{} is not empty", to.display())));
    }
    write_dir(survivors, ROOT, to, &mut vec![ROOT])
}

fn write_dir(survivors: &Survivors, dir: u64, path: &Path, ancestors: &mut Vec<u64>) -> io::Result<()> {
    let Some(Node::Dir { durable, .. }) = survivors.inodes.get(&dir).map(|i| &i.node) else {
        return Ok(());
    };
    for (name, &ino) in durable {
        let Some(inode) = survivors.inodes.get(&ino) else { continue };
        let target = path.join(name);
        match &inode.node {
            Node::Dir { .. } => {
                if ancestors.contains(&ino) || ancestors.len() > MAX_DEPTH {
                    continue;
                }
                fs::create_dir(&target)?;
                ancestors.push(ino);
                write_dir(survivors, ino, &target, ancestors)?;
                ancestors.pop();
            }
            Node::File { durable, .. } => write_file(durable, &target)?,
        }
        fs::set_permissions(&target, fs::Permissions::from_mode(u32::from(inode.perm)))?;
    }
    Ok(())
}

fn write_file(contents: &Contents, path: &Path) -> io::Result<()> {
    let file = File::create(path)?;
    file.set_len(contents.size)?;
    for (&index, block) in &contents.blocks {
        let off = index * BLOCK;
        let len = usize::try_from(BLOCK.min(contents.size.saturating_sub(off))).unwrap_or(0);
        file.write_all_at(&block[..len.min(block.len())], off)?;
    }
    file.sync_all()
}
