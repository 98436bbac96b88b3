//! Releases on disk (docs/design.md §7):
//!
//! ```text
//! <data_dir>/apps/<app>/releases/<version>/      one directory per release
//! <data_dir>/apps/<app>/current -> releases/<v>  swapped atomically (rename of a new symlink)
//! <data_dir>/apps/<app>/permanent                version string (tmp + fsync + rename)
//! ```
//!
//! A new release is built in `releases/.staging-<version>-<nonce>` (hard links of the base
//! release's files, then the new artifacts, then unpacked archives) and renamed into place, so
//! `releases/<version>` is always complete, also after a power loss: the new files and every
//! directory of the staging tree are fsynced before the rename. Files are never written through
//! a hard link: an artifact replaces its path (unlink, then a new file), so older releases keep
//! their bytes; an artifact whose bytes and mode the base's file already has keeps that link.
//! Every version name and relative path comes from the network and is checked before it
//! touches a path; every write lands in a directory whose canonical path is inside the release.

use std::io::{Read, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::artifacts::sync_dir;
use crate::cancel::CancelToken;

use super::confine::{ConfineError, ensure_dir_inside, safe_relative};
use super::unpack;

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{0}")]
    Invalid(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Confine(#[from] ConfineError),
    #[error(transparent)]
    Unpack(#[from] unpack::UnpackError),
    #[error("staging was stopped")]
    Cancelled,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ReleaseError + 'a {
    move |source| ReleaseError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A version name from the network: one plain path component (it names a directory).
pub fn check_version(version: &str) -> Result<(), ReleaseError> {
    if version.is_empty()
        || version.starts_with('.')
        || version.contains(['/', '\\', '\0'])
        || version.chars().any(char::is_control)
    {
        return Err(ReleaseError::Invalid(format!(
            "release name `{version}` must be one plain path component"
        )));
    }
    Ok(())
}

/// One file of a new release.
#[derive(Debug, Clone)]
pub struct NewFile {
    /// Path inside the release (checked), or the directory an archive unpacks into.
    pub name: String,
    /// The verified bytes in the content store.
    pub source: PathBuf,
    pub mode: u32,
    pub unpack: bool,
}

/// What building a release did, for the step report.
#[derive(Debug, Clone, Default)]
pub struct Built {
    pub linked: u64,
    pub written: u64,
    /// Artifacts whose bytes and mode the base release already had: its hard link kept.
    pub unchanged: u64,
    pub unpacked: u64,
}

/// The apps of one node.
#[derive(Debug, Clone)]
pub struct Apps {
    root: PathBuf,
}

fn nonce() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{}-{nanos}", std::process::id())
}

impl Apps {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join("apps"),
        }
    }

    pub fn app_dir(&self, app: &str) -> PathBuf {
        self.root.join(app)
    }

    pub fn releases_dir(&self, app: &str) -> PathBuf {
        self.app_dir(app).join("releases")
    }

    /// `releases/<version>` (the name is checked first).
    pub fn release_dir(&self, app: &str, version: &str) -> Result<PathBuf, ReleaseError> {
        check_version(version)?;
        Ok(self.releases_dir(app).join(version))
    }

    /// Apps that have a directory here.
    pub fn installed(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut apps: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| !name.starts_with('.'))
            .collect();
        apps.sort();
        apps
    }

    /// The version `current` names, if any.
    pub fn current(&self, app: &str) -> Option<String> {
        let target = std::fs::read_link(self.app_dir(app).join("current")).ok()?;
        let version = target.file_name()?.to_str()?.to_string();
        check_version(&version).ok()?;
        Some(version)
    }

    /// The current release's version and directory (which exists).
    pub fn current_release(&self, app: &str) -> Option<(String, PathBuf)> {
        let version = self.current(app)?;
        let dir = self.releases_dir(app).join(&version);
        dir.is_dir().then_some((version, dir))
    }

    /// The version in `permanent`, if any.
    pub fn permanent(&self, app: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.app_dir(app).join("permanent")).ok()?;
        let version = text.trim().to_string();
        check_version(&version).ok()?;
        Some(version)
    }

    /// Every release directory of `app` with its modification time, newest first.
    pub fn releases(&self, app: &str) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.releases_dir(app)) else {
            return Vec::new();
        };
        let mut found: Vec<(SystemTime, String)> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                if name.starts_with('.') {
                    return None;
                }
                let modified = e.metadata().and_then(|m| m.modified()).ok()?;
                Some((modified, name))
            })
            .collect();
        found.sort_by(|a, b| b.cmp(a));
        found.into_iter().map(|(_, name)| name).collect()
    }

    /// Point `current` at `releases/<version>`: a new symlink renamed over the old one, so a
    /// reader sees either the old or the new release, never none.
    pub fn activate(&self, app: &str, version: &str) -> Result<(), ReleaseError> {
        let dir = self.release_dir(app, version)?;
        if !dir.is_dir() {
            return Err(ReleaseError::Invalid(format!(
                "release {version} of {app} is not on this node"
            )));
        }
        let app_dir = self.app_dir(app);
        let tmp = app_dir.join(format!(".current-{}", nonce()));
        symlink(Path::new("releases").join(version), &tmp).map_err(io("cannot link", &tmp))?;
        let current = app_dir.join("current");
        if let Err(e) = std::fs::rename(&tmp, &current) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("cannot swap", &current)(e));
        }
        sync_dir(&app_dir);
        Ok(())
    }

    /// Remove `current` (an app that had no release before a failed first install).
    pub fn deactivate(&self, app: &str) -> Result<(), ReleaseError> {
        let app_dir = self.app_dir(app);
        let current = app_dir.join("current");
        match std::fs::remove_file(&current) {
            Ok(()) => {
                sync_dir(&app_dir);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("cannot remove", &current)(e)),
        }
    }

    /// Write `permanent` atomically: a temp file, fsync, rename, fsync of the directory.
    pub fn set_permanent(&self, app: &str, version: &str) -> Result<(), ReleaseError> {
        check_version(version)?;
        let app_dir = self.app_dir(app);
        std::fs::create_dir_all(&app_dir).map_err(io("cannot create", &app_dir))?;
        let tmp = app_dir.join(format!(".permanent-{}", nonce()));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(format!("{version}\n").as_bytes())?;
            file.sync_all()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("cannot write", &tmp)(e));
        }
        let permanent = app_dir.join("permanent");
        if let Err(e) = std::fs::rename(&tmp, &permanent) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("cannot rename", &permanent)(e));
        }
        sync_dir(&app_dir);
        Ok(())
    }

    /// Delete `releases/<version>`.
    pub fn remove_release(&self, app: &str, version: &str) -> Result<(), ReleaseError> {
        let dir = self.release_dir(app, version)?;
        remove_tree(&dir)
    }

    /// Remove every leftover staging directory of `app` (a build interrupted by a crash).
    pub fn remove_staging(&self, app: &str) {
        let releases = self.releases_dir(app);
        let Ok(entries) = std::fs::read_dir(&releases) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".staging-") || name.starts_with(".old-") {
                let path = entry.path();
                if let Err(e) = remove_tree(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a leftover staging directory");
                }
            }
        }
    }

    /// Whether a staging directory of `app` is on disk.
    pub fn has_staging(&self, app: &str) -> bool {
        std::fs::read_dir(self.releases_dir(app)).is_ok_and(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with(".staging-"))
        })
    }

    /// Build `releases/<version>`: `base`'s files hard-linked (an existing directory: the
    /// current release, or a release this rollout staged already), then `files` on top. Runs
    /// blocking file system calls: call it from a blocking thread.
    pub fn build(
        &self,
        app: &str,
        version: &str,
        base: Option<&Path>,
        files: &[NewFile],
        cancel: &CancelToken,
    ) -> Result<Built, ReleaseError> {
        let target = self.release_dir(app, version)?;
        let releases = self.releases_dir(app);
        std::fs::create_dir_all(&releases).map_err(io("cannot create", &releases))?;
        let staging = releases.join(format!(".staging-{version}-{}", nonce()));
        // The staged files and their directory entries reach the disk before the directory is
        // renamed into place: a release the journal calls staged must still be whole after a
        // power loss, not only after a crash of the agent.
        let result = self
            .build_in(&staging, base, files, cancel)
            .and_then(|built| sync_dirs(&staging).map(|()| built));
        let built = match result {
            Ok(built) => built,
            Err(e) => {
                let _ = remove_tree(&staging);
                return Err(e);
            }
        };
        // Into place: an earlier build of this version (never current) moves aside first.
        if target.exists() {
            let old = releases.join(format!(".old-{version}-{}", nonce()));
            if let Err(e) = std::fs::rename(&target, &old) {
                let _ = remove_tree(&staging);
                return Err(io("cannot move aside", &target)(e));
            }
            if let Err(e) = std::fs::rename(&staging, &target) {
                let _ = std::fs::rename(&old, &target);
                let _ = remove_tree(&staging);
                return Err(io("cannot rename into place", &target)(e));
            }
            let _ = remove_tree(&old);
        } else if let Err(e) = std::fs::rename(&staging, &target) {
            let _ = remove_tree(&staging);
            return Err(io("cannot rename into place", &target)(e));
        }
        sync_dir(&releases);
        Ok(built)
    }

    fn build_in(
        &self,
        staging: &Path,
        base: Option<&Path>,
        files: &[NewFile],
        cancel: &CancelToken,
    ) -> Result<Built, ReleaseError> {
        std::fs::create_dir(staging).map_err(io("cannot create", staging))?;
        let mut built = Built::default();
        if let Some(base) = base {
            link_tree(base, staging, &mut built, cancel)?;
        }
        let root = staging
            .canonicalize()
            .map_err(io("cannot resolve", staging))?;
        for file in files {
            if cancel.is_cancelled() {
                return Err(ReleaseError::Cancelled);
            }
            let relative = safe_relative(Path::new(&file.name)).ok_or_else(|| {
                ReleaseError::Invalid(format!(
                    "artifact name `{}` is not a relative path inside the release",
                    file.name
                ))
            })?;
            if file.unpack {
                let dir = root.join(&relative);
                ensure_dir_inside(&root, &dir)?;
                built.unpacked += unpack::unpack(&file.source, &dir, &root)?;
                continue;
            }
            if relative.as_os_str().is_empty() {
                return Err(ReleaseError::Invalid(format!(
                    "artifact name `{}` names the release directory itself",
                    file.name
                )));
            }
            let dest = root.join(&relative);
            if let Some(parent) = dest.parent() {
                ensure_dir_inside(&root, parent)?;
            }
            match std::fs::symlink_metadata(&dest) {
                Ok(meta) if meta.is_dir() => {
                    return Err(ReleaseError::Invalid(format!(
                        "artifact `{}` would replace a directory of the release",
                        file.name
                    )));
                }
                // The base's hard link already has these bytes and this mode: keep it. Saves
                // writing and syncing a copy of every file a release lists but did not change.
                Ok(meta) if same_file_content(&meta, &dest, &file.source, file.mode) => {
                    built.unchanged += 1;
                    continue;
                }
                // Unlink, never write through: the old inode belongs to other releases too.
                Ok(_) => std::fs::remove_file(&dest).map_err(io("cannot replace", &dest))?,
                Err(_) => {}
            }
            copy_new(&file.source, &dest)?;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(file.mode & 0o7777))
                .map_err(io("cannot set the mode of", &dest))?;
            built.written += 1;
        }
        Ok(built)
    }
}

/// Whether `existing` (a hard link from the base release, `meta` its own metadata) is a
/// regular file with `mode` and the same bytes as the verified `source`. Compared byte for
/// byte, not by size or time: the base's file is on this disk, where anything may have
/// changed it since it was staged. Any error reading either says no (the file is replaced).
fn same_file_content(meta: &std::fs::Metadata, existing: &Path, source: &Path, mode: u32) -> bool {
    if !meta.is_file() || meta.permissions().mode() & 0o7777 != mode & 0o7777 {
        return false;
    }
    let Ok(source_meta) = std::fs::metadata(source) else {
        return false;
    };
    if source_meta.len() != meta.len() {
        return false;
    }
    let (Ok(mut left), Ok(mut right)) =
        (std::fs::File::open(existing), std::fs::File::open(source))
    else {
        return false;
    };
    const CHUNK: u64 = 64 * 1024;
    let (mut a, mut b) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
    let mut remaining = meta.len();
    while remaining > 0 {
        let n = remaining.min(CHUNK) as usize;
        if left.read_exact(&mut a[..n]).is_err()
            || right.read_exact(&mut b[..n]).is_err()
            || a[..n] != b[..n]
        {
            return false;
        }
        remaining -= n as u64;
    }
    // Neither grew since its length was read.
    let at_end = |file: &mut std::fs::File| matches!(file.read(&mut [0u8; 1]), Ok(0));
    at_end(&mut left) && at_end(&mut right)
}

/// Copy `source` to a new file `dest` (which must not exist).
fn copy_new(source: &Path, dest: &Path) -> Result<(), ReleaseError> {
    let mut input = std::fs::File::open(source).map_err(io("cannot read", source))?;
    let mut output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(io("cannot create", dest))?;
    std::io::copy(&mut input, &mut output).map_err(io("cannot write", dest))?;
    output.sync_data().map_err(io("cannot sync", dest))?;
    Ok(())
}

/// fsync every directory of the tree at `root` (deepest first), so the entries made in it
/// (files, hard links, symlinks, subdirectories) are on disk. Nothing is followed.
fn sync_dirs(root: &Path) -> Result<(), ReleaseError> {
    let entries = std::fs::read_dir(root).map_err(io("cannot read", root))?;
    for entry in entries {
        let entry = entry.map_err(io("cannot read", root))?;
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            sync_dirs(&entry.path())?;
        }
    }
    std::fs::File::open(root)
        .and_then(|dir| dir.sync_all())
        .map_err(io("cannot sync", root))
}

/// Recreate the tree `from` in `to` (an existing empty directory): directories as new
/// directories, files as hard links (a copy where a link is impossible), symlinks as symlinks
/// with the same target. Nothing is followed.
fn link_tree(
    from: &Path,
    to: &Path,
    built: &mut Built,
    cancel: &CancelToken,
) -> Result<(), ReleaseError> {
    let entries = std::fs::read_dir(from).map_err(io("cannot read", from))?;
    for entry in entries {
        if cancel.is_cancelled() {
            return Err(ReleaseError::Cancelled);
        }
        let entry = entry.map_err(io("cannot read", from))?;
        let source = entry.path();
        let dest = to.join(entry.file_name());
        let kind = entry.file_type().map_err(io("cannot stat", &source))?;
        if kind.is_dir() {
            std::fs::create_dir(&dest).map_err(io("cannot create", &dest))?;
            link_tree(&source, &dest, built, cancel)?;
            if let Ok(meta) = std::fs::metadata(&source) {
                let _ = std::fs::set_permissions(&dest, meta.permissions());
            }
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&source).map_err(io("cannot read", &source))?;
            symlink(&target, &dest).map_err(io("cannot link", &dest))?;
        } else if kind.is_file() {
            if std::fs::hard_link(&source, &dest).is_err() {
                // A copy is new data: synced like every new file of the release.
                std::fs::copy(&source, &dest).map_err(io("cannot copy to", &dest))?;
                std::fs::File::open(&dest)
                    .and_then(|file| file.sync_data())
                    .map_err(io("cannot sync", &dest))?;
            }
            built.linked += 1;
        }
        // Sockets, fifos and devices are not release content: skipped.
    }
    Ok(())
}

/// Remove a directory tree (or a file); a missing path is fine.
pub fn remove_tree(path: &Path) -> Result<(), ReleaseError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("cannot stat", path)(e)),
        Ok(meta) if meta.is_dir() => {
            std::fs::remove_dir_all(path).map_err(io("cannot remove", path))
        }
        Ok(_) => std::fs::remove_file(path).map_err(io("cannot remove", path)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn write(path: &Path, text: &str) {
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::write(path, text);
    }

    #[test]
    fn build_links_old_files_and_replaces_new_ones() -> Result<(), ReleaseError> {
        let dir = tempfile::tempdir().map_err(io("tmp", Path::new("tmp")))?;
        let apps = Apps::new(dir.path());
        let cas = dir.path().join("cas");
        write(&cas.join("a"), "new binary");
        let never = crate::cancel::CancelToken::never();

        apps.build(
            "app",
            "1.0",
            None,
            &[NewFile {
                name: "bin/app".into(),
                source: cas.join("a"),
                mode: 0o755,
                unpack: false,
            }],
            &never,
        )?;
        let v1 = apps.release_dir("app", "1.0")?;
        write(&v1.join("etc/config"), "kept");
        apps.activate("app", "1.0")?;
        assert_eq!(apps.current("app").as_deref(), Some("1.0"));

        write(&cas.join("b"), "newer binary");
        let built = apps.build(
            "app",
            "2.0",
            Some(&v1),
            &[NewFile {
                name: "./bin/app".into(),
                source: cas.join("b"),
                mode: 0o700,
                unpack: false,
            }],
            &never,
        )?;
        assert_eq!((built.linked, built.written, built.unchanged), (2, 1, 0));
        let v2 = apps.release_dir("app", "2.0")?;
        let meta = |p: &Path| std::fs::metadata(p).map_err(io("stat", Path::new("x")));
        // Unchanged files are the same inode; replaced ones are new and the old keeps its bytes.
        assert_eq!(
            meta(&v1.join("etc/config"))?.ino(),
            meta(&v2.join("etc/config"))?.ino()
        );
        assert_ne!(
            meta(&v1.join("bin/app"))?.ino(),
            meta(&v2.join("bin/app"))?.ino()
        );
        assert_eq!(
            std::fs::read_to_string(v1.join("bin/app")).ok().as_deref(),
            Some("new binary")
        );
        assert_eq!(meta(&v2.join("bin/app"))?.mode() & 0o777, 0o700);
        assert!(!apps.has_staging("app"));

        // Listed again with the same bytes and mode: 2.0's link is kept, not a new copy. A
        // different mode, or bytes changed on disk since, get a new file.
        std::fs::copy(v2.join("bin/app"), cas.join("c")).map_err(io("copy", &cas))?;
        let listed = |mode| NewFile {
            name: "bin/app".into(),
            source: cas.join("c"),
            mode,
            unpack: false,
        };
        let built = apps.build("app", "2.1", Some(&v2), &[listed(0o700)], &never)?;
        assert_eq!((built.written, built.unchanged), (0, 1));
        let v21 = apps.release_dir("app", "2.1")?;
        assert_eq!(
            meta(&v2.join("bin/app"))?.ino(),
            meta(&v21.join("bin/app"))?.ino()
        );
        let built = apps.build("app", "2.2", Some(&v2), &[listed(0o755)], &never)?;
        assert_eq!((built.written, built.unchanged), (1, 0));
        write(&cas.join("c"), "newer binarY");
        let built = apps.build("app", "2.3", Some(&v2), &[listed(0o700)], &never)?;
        assert_eq!((built.written, built.unchanged), (1, 0));
        assert_eq!(
            std::fs::read_to_string(apps.release_dir("app", "2.3")?.join("bin/app")).ok(),
            Some("newer binarY".to_string())
        );

        apps.activate("app", "2.0")?;
        apps.set_permanent("app", "2.0")?;
        assert_eq!(apps.current("app").as_deref(), Some("2.0"));
        assert_eq!(apps.permanent("app").as_deref(), Some("2.0"));
        assert!(apps.activate("app", "3.0").is_err());
        assert!(apps.release_dir("app", "../x").is_err());
        Ok(())
    }

    #[test]
    fn writes_through_an_outward_symlink_are_refused() -> Result<(), ReleaseError> {
        let dir = tempfile::tempdir().map_err(io("tmp", Path::new("tmp")))?;
        let apps = Apps::new(dir.path());
        let base = dir.path().join("base");
        std::fs::create_dir_all(&base).map_err(io("mkdir", &base))?;
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).map_err(io("mkdir", &outside))?;
        symlink(&outside, base.join("bin")).map_err(io("link", &base))?;
        let cas = dir.path().join("blob");
        write(&cas, "x");
        let result = apps.build(
            "app",
            "2.0",
            Some(&base),
            &[NewFile {
                name: "bin/evil".into(),
                source: cas,
                mode: 0o644,
                unpack: false,
            }],
            &crate::cancel::CancelToken::never(),
        );
        assert!(result.is_err());
        assert!(!outside.join("evil").exists());
        assert!(!apps.has_staging("app"));
        Ok(())
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            safe_relative(Path::new("./a/b")),
            Some(PathBuf::from("a/b"))
        );
        assert_eq!(safe_relative(Path::new(".")), Some(PathBuf::new()));
        assert_eq!(safe_relative(Path::new("a/../b")), None);
        assert_eq!(safe_relative(Path::new("/etc")), None);
    }
}
