//! The coordinators this agent may talk to (docs/ha.md): the configured list of a group (or the
//! one coordinator), which of them the agent talks to now, and the highest leader epoch it has
//! seen.
//!
//! * A standby answers "not the leader" naming the leader's URL: the agent follows it when it is
//!   one of the configured coordinators, or any URL over TLS (the server must still prove it
//!   holds a certificate of the fleet's CA). A plaintext URL the config does not name is never
//!   followed: a network answer does not choose where this node connects.
//! * A coordinator that cannot be reached: the next one in the list is tried.
//! * Fencing: a Welcome of a lower leader epoch than the highest this agent has seen is a
//!   deposed leader's; the agent ends that session before any of its commands is run. The
//!   highest epoch is kept in `<data_dir>/leader-epoch`, so a restarted agent fences too.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

const EPOCH_FILE: &str = "leader-epoch";

#[derive(Clone)]
pub struct Coordinators {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    urls: Vec<String>,
    current: String,
    highest_epoch: u64,
    epoch_file: PathBuf,
}

impl std::fmt::Debug for Coordinators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Coordinators")
            .field("urls", &state.urls)
            .field("current", &state.current)
            .finish()
    }
}

/// A Welcome from a deposed leader (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "coordinator {url} leads at epoch {epoch}, but this agent has seen epoch {highest}: a deposed leader; none of its commands is run"
)]
pub struct StaleLeader {
    pub url: String,
    pub epoch: u64,
    pub highest: u64,
}

impl Coordinators {
    /// `urls` in the configured order (never empty: the config checks it); the highest epoch
    /// seen is read from `data_dir`.
    pub fn new(urls: Vec<String>, data_dir: PathBuf) -> Self {
        let epoch_file = data_dir.join(EPOCH_FILE);
        let highest_epoch = std::fs::read_to_string(&epoch_file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
        let current = urls.first().cloned().unwrap_or_default();
        Self {
            inner: Arc::new(Mutex::new(State {
                urls,
                current,
                highest_epoch,
                epoch_file,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a single assignment: a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The coordinator to talk to now.
    pub fn current(&self) -> String {
        self.lock().current.clone()
    }

    pub fn urls(&self) -> Vec<String> {
        self.lock().urls.clone()
    }

    /// `current` could not be reached: move on to the next configured coordinator.
    pub fn next(&self) {
        let mut state = self.lock();
        if state.urls.len() < 2 {
            return;
        }
        let at = state.urls.iter().position(|url| *url == state.current);
        let next = at.map_or(0, |i| (i + 1) % state.urls.len());
        state.current = state.urls[next].clone();
    }

    /// A standby named `leader`: talk to it from now on, if it may be followed (see the module
    /// docs). Returns whether it was.
    pub fn follow(&self, leader: &str) -> bool {
        let mut state = self.lock();
        let listed = state.urls.iter().any(|url| url == leader);
        if !listed && !hotroll_tls::client::is_tls_url(leader) {
            tracing::warn!(
                leader,
                "not following a plaintext leader URL the config does not name"
            );
            return false;
        }
        state.current = leader.to_string();
        true
    }

    /// Check a Welcome's leader epoch; a higher one is remembered (and kept on disk).
    pub fn accept_epoch(&self, epoch: u64) -> Result<(), StaleLeader> {
        let mut state = self.lock();
        if epoch < state.highest_epoch {
            return Err(StaleLeader {
                url: state.current.clone(),
                epoch,
                highest: state.highest_epoch,
            });
        }
        if epoch > state.highest_epoch {
            state.highest_epoch = epoch;
            if let Err(e) = write_atomically(&state.epoch_file, &epoch.to_string()) {
                tracing::warn!(error = %e, "cannot keep the leader epoch on disk; fencing holds until a restart");
            }
        }
        Ok(())
    }

    pub fn highest_epoch(&self) -> u64 {
        self.lock().highest_epoch
    }
}

fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(urls: &[&str]) -> (Coordinators, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let urls = urls.iter().map(|u| u.to_string()).collect();
        (Coordinators::new(urls, dir.path().to_path_buf()), dir)
    }

    #[test]
    fn an_unreachable_coordinator_moves_on_to_the_next_and_wraps_around() {
        let (set, _dir) = set(&["http://a:1", "http://b:1", "http://c:1"]);
        assert_eq!(set.current(), "http://a:1");
        set.next();
        set.next();
        assert_eq!(set.current(), "http://c:1");
        set.next();
        assert_eq!(set.current(), "http://a:1");
    }

    #[test]
    fn only_listed_or_tls_leaders_are_followed() {
        let (set, _dir) = set(&["http://a:1", "http://b:1"]);
        assert!(set.follow("http://b:1"));
        assert_eq!(set.current(), "http://b:1");
        assert!(!set.follow("http://evil:1"));
        assert_eq!(set.current(), "http://b:1");
        assert!(set.follow("https://c:1"));
    }

    #[test]
    fn a_lower_epoch_is_refused_and_the_highest_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let urls = vec!["http://a:1".to_string()];
        let set = Coordinators::new(urls.clone(), dir.path().to_path_buf());
        assert_eq!(set.accept_epoch(7), Ok(()));
        assert_eq!(set.accept_epoch(7), Ok(()));
        let refused = set.accept_epoch(5);
        assert!(matches!(
            refused,
            Err(StaleLeader {
                epoch: 5,
                highest: 7,
                ..
            })
        ));
        let restarted = Coordinators::new(urls, dir.path().to_path_buf());
        assert_eq!(restarted.highest_epoch(), 7);
        assert!(restarted.accept_epoch(6).is_err());
    }
}
