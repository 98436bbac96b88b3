//! Unpacking a tar artifact into a release, refusing any entry that would land outside it.
//!
//! Archives come from the network (verified against their digest, but a digest only proves the
//! bytes are the ones the operator shipped, not that they are harmless). Entries are written by
//! hand rather than with `tar`'s `unpack`, so every rule is explicit:
//!
//! * entry paths must be relative with no `..` (absolute paths and `..` refuse the whole
//!   archive: a half-unpacked release is never used);
//! * only regular files, directories, symlinks and hard links; devices, fifos and the like are
//!   refused;
//! * a symlink's target must be relative and stay inside the release, resolved lexically from
//!   the link's own directory; a hard link's target must be an earlier entry inside the release;
//! * every entry is written into a directory whose canonical path is inside the release, and
//!   an existing path is unlinked first, so nothing is ever written through a symlink or into a
//!   file shared with another release;
//! * modes keep the permission bits only (no setuid, setgid or sticky from an archive).

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use super::confine::{ensure_dir_inside, safe_relative};

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("archive {archive}: entry `{entry}` refused: {reason}")]
    Refused {
        archive: String,
        entry: String,
        reason: String,
    },
    #[error("archive {archive}: {message}")]
    Broken { archive: String, message: String },
}

/// Unpack the archive at `archive` into `dest` (a directory inside `root`, the release).
/// Returns how many entries were written.
pub fn unpack(archive: &Path, dest: &Path, root: &Path) -> Result<u64, UnpackError> {
    let name = archive
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let broken = |message: String| UnpackError::Broken {
        archive: name.clone(),
        message,
    };
    let refused = |entry: &Path, reason: String| UnpackError::Refused {
        archive: name.clone(),
        entry: entry.display().to_string(),
        reason,
    };
    let file = std::fs::File::open(archive).map_err(|e| broken(format!("cannot open: {e}")))?;
    let mut tar = tar::Archive::new(file);
    let entries = tar
        .entries()
        .map_err(|e| broken(format!("not a tar archive: {e}")))?;
    let mut written = 0u64;
    for entry in entries {
        let mut entry = entry.map_err(|e| broken(format!("unreadable entry: {e}")))?;
        let raw_path = entry
            .path()
            .map_err(|e| broken(format!("unreadable entry name: {e}")))?
            .into_owned();
        let Some(relative) = safe_relative(&raw_path) else {
            return Err(refused(
                &raw_path,
                "absolute paths and `..` could leave the release".to_string(),
            ));
        };
        // Where the entry lands, relative to the release root (for link checks).
        let dest_rel = dest
            .strip_prefix(root)
            .map(Path::to_path_buf)
            .unwrap_or_default()
            .join(&relative);
        let target = dest.join(&relative);
        let kind = entry.header().entry_type();
        if relative.as_os_str().is_empty() {
            // `./` itself: the directory exists already.
            if kind.is_dir() {
                continue;
            }
            return Err(refused(
                &raw_path,
                "names the release directory".to_string(),
            ));
        }
        if let Some(parent) = target.parent() {
            ensure_dir_inside(root, parent).map_err(|e| refused(&raw_path, e.to_string()))?;
        }
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        if kind.is_dir() {
            match std::fs::symlink_metadata(&target) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    std::fs::remove_file(&target)
                        .map_err(|e| refused(&raw_path, format!("cannot replace: {e}")))?;
                    std::fs::create_dir(&target)
                        .map_err(|e| refused(&raw_path, format!("cannot create: {e}")))?;
                }
                Err(_) => std::fs::create_dir(&target)
                    .map_err(|e| refused(&raw_path, format!("cannot create: {e}")))?,
            }
            let _ =
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode | 0o700));
            written += 1;
            continue;
        }
        clear(&target).map_err(|e| refused(&raw_path, e))?;
        if kind.is_file() || kind == tar::EntryType::Continuous {
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&target)
                .map_err(|e| refused(&raw_path, format!("cannot create: {e}")))?;
            std::io::copy(&mut entry, &mut out)
                .map_err(|e| broken(format!("entry `{}`: {e}", raw_path.display())))?;
            // On disk before the release is renamed into place (see `Apps::build`).
            out.sync_data()
                .map_err(|e| refused(&raw_path, format!("cannot sync: {e}")))?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                .map_err(|e| refused(&raw_path, format!("cannot set its mode: {e}")))?;
        } else if kind.is_symlink() {
            let link = entry
                .link_name()
                .map_err(|e| broken(format!("unreadable link target: {e}")))?
                .ok_or_else(|| refused(&raw_path, "symlink without a target".to_string()))?
                .into_owned();
            let parent_rel = dest_rel.parent().unwrap_or(Path::new(""));
            if link.is_absolute() || !stays_inside(parent_rel, &link) {
                return Err(refused(
                    &raw_path,
                    format!("symlink to `{}` points outside the release", link.display()),
                ));
            }
            symlink(&link, &target)
                .map_err(|e| refused(&raw_path, format!("cannot create: {e}")))?;
        } else if kind.is_hard_link() {
            let link = entry
                .link_name()
                .map_err(|e| broken(format!("unreadable link target: {e}")))?
                .ok_or_else(|| refused(&raw_path, "hard link without a target".to_string()))?
                .into_owned();
            let Some(link_rel) = safe_relative(&link) else {
                return Err(refused(
                    &raw_path,
                    format!(
                        "hard link to `{}` points outside the release",
                        link.display()
                    ),
                ));
            };
            // Hard link names are relative to the archive's root, which is `dest`.
            let source = dest.join(&link_rel);
            if let Some(parent) = source.parent() {
                let canonical = parent
                    .canonicalize()
                    .map_err(|e| refused(&raw_path, format!("hard link target: {e}")))?;
                if !canonical.starts_with(root) {
                    return Err(refused(
                        &raw_path,
                        format!(
                            "hard link to `{}` points outside the release",
                            link.display()
                        ),
                    ));
                }
            }
            match std::fs::symlink_metadata(&source) {
                Ok(meta) if meta.is_file() => {}
                _ => {
                    return Err(refused(
                        &raw_path,
                        format!(
                            "hard link to `{}`, which is not an earlier file of the archive",
                            link.display()
                        ),
                    ));
                }
            }
            std::fs::hard_link(&source, &target)
                .map_err(|e| refused(&raw_path, format!("cannot link: {e}")))?;
        } else if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            continue;
        } else {
            return Err(refused(
                &raw_path,
                format!("entries of type {kind:?} are not release content"),
            ));
        }
        written += 1;
    }
    Ok(written)
}

/// Remove whatever is at `path` (not a directory) so a new entry is created, never written
/// through.
fn clear(path: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(meta) if meta.is_dir() => Err("would replace a directory".to_string()),
        Ok(_) => std::fs::remove_file(path).map_err(|e| format!("cannot replace: {e}")),
    }
}

/// Whether `target`, a relative symlink target in directory `from` (relative to the release
/// root), stays inside the release when resolved lexically.
fn stays_inside(from: &Path, target: &Path) -> bool {
    let mut depth: Vec<PathBuf> = from
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(PathBuf::from(part)),
            _ => None,
        })
        .collect();
    for component in target.components() {
        match component {
            Component::Normal(part) => depth.push(PathBuf::from(part)),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth.pop().is_none() {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar with raw entry names (the `tar` builder refuses `..`, which is the point here).
    fn raw_tar(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, kind, link, data) in entries {
            let mut header = tar::Header::new_old();
            {
                let old = header.as_old_mut();
                old.name[..name.len()].copy_from_slice(name.as_bytes());
                old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            let _ = builder.append(&header, *data);
        }
        builder.into_inner().unwrap_or_default()
    }

    fn try_unpack(bytes: &[u8]) -> (tempfile::TempDir, Result<u64, UnpackError>) {
        let Ok(dir) = tempfile::tempdir() else {
            panic!("no temp dir")
        };
        let archive = dir.path().join("a.tar");
        let release = dir.path().join("release");
        let _ = std::fs::write(&archive, bytes);
        let _ = std::fs::create_dir_all(&release);
        let root = release.canonicalize().unwrap_or(release);
        let result = unpack(&archive, &root, &root);
        (dir, result)
    }

    #[test]
    fn good_archives_unpack() {
        let bytes = raw_tar(&[
            ("static/", tar::EntryType::Directory, "", b""),
            (
                "static/index.html",
                tar::EntryType::Regular,
                "",
                b"<h1>hi</h1>",
            ),
            (
                "static/home.html",
                tar::EntryType::Symlink,
                "index.html",
                b"",
            ),
            (
                "static/copy.html",
                tar::EntryType::Link,
                "static/index.html",
                b"",
            ),
            ("up", tar::EntryType::Symlink, "static/../static", b""),
        ]);
        let (dir, result) = try_unpack(&bytes);
        assert!(matches!(result, Ok(5)), "{result:?}");
        let release = dir.path().join("release");
        assert_eq!(
            std::fs::read_to_string(release.join("static/home.html"))
                .ok()
                .as_deref(),
            Some("<h1>hi</h1>")
        );
    }

    #[test]
    fn escaping_entries_are_refused() {
        for entries in [
            vec![("../evil", tar::EntryType::Regular, "", b"x" as &[u8])],
            vec![("/tmp/evil", tar::EntryType::Regular, "", b"x")],
            vec![("a/../../evil", tar::EntryType::Regular, "", b"x")],
            vec![("link", tar::EntryType::Symlink, "../..", b"")],
            vec![("link", tar::EntryType::Symlink, "/etc", b"")],
            vec![("d/link", tar::EntryType::Symlink, "../../x", b"")],
            vec![("hard", tar::EntryType::Link, "../outside", b"")],
            vec![("dev", tar::EntryType::Char, "", b"")],
        ] {
            let (dir, result) = try_unpack(&raw_tar(&entries));
            assert!(
                matches!(result, Err(UnpackError::Refused { .. })),
                "{entries:?}: {result:?}"
            );
            assert!(!dir.path().join("evil").exists());
        }
    }

    #[test]
    fn lexical_containment() {
        assert!(stays_inside(Path::new("a/b"), Path::new("../c")));
        assert!(stays_inside(Path::new(""), Path::new("./x/../y")));
        assert!(!stays_inside(Path::new("a"), Path::new("../../c")));
        assert!(!stays_inside(Path::new(""), Path::new("..")));
    }
}
