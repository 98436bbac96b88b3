//! Paths that must stay inside a release: names from the network and the directories they are
//! written into (shared by building a release and unpacking an archive into it).

use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} resolves to {}, outside the release", dir.display(), resolved.display())]
    Outside { dir: PathBuf, resolved: PathBuf },
}

/// A relative path from the network (an artifact name, an archive entry): only normal
/// components; `.` components are dropped. `None` for anything absolute or with `..`.
pub fn safe_relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Create `dir` (and its parents) and make sure its canonical path is inside `root` (a
/// symlink in the way could otherwise lead outside).
pub fn ensure_dir_inside(root: &Path, dir: &Path) -> Result<(), ConfineError> {
    let io = |what: &'static str| {
        move |source| ConfineError::Io {
            what,
            path: dir.to_path_buf(),
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(io("cannot create"))?;
    let resolved = dir.canonicalize().map_err(io("cannot resolve"))?;
    if !resolved.starts_with(root) {
        return Err(ConfineError::Outside {
            dir: dir.to_path_buf(),
            resolved,
        });
    }
    Ok(())
}
