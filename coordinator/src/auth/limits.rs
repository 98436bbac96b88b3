//! The limits on what one caller may ask for, whoever they are (they apply with TLS off too).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hotroll_proto::v1 as pb;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Artifacts one script may bind (and digests one HasArtifacts may ask about).
pub const MAX_ARTIFACTS_PER_SCRIPT: usize = 256;
/// Uploads one client may have in flight at once.
pub const MAX_CONCURRENT_UPLOADS: usize = 4;
/// Bounds on a Hello: labels, apps, journal entries, and the length of any one string in it.
pub const MAX_HELLO_LABELS: usize = 128;
pub const MAX_HELLO_APPS: usize = 1024;
pub const MAX_HELLO_JOURNAL: usize = 4096;
pub const MAX_HELLO_STRING: usize = 1024;
/// Releases an OTP node may list per app (its release handler keeps a handful).
pub const MAX_HELLO_RELEASES: usize = 64;
/// Length of a journal entry's error text (a failed step's output can be long).
const MAX_HELLO_JOURNAL_ERROR: usize = 64 * 1024;
/// Clients whose upload slots are remembered before idle ones are forgotten.
const MAX_TRACKED_UPLOADERS: usize = 4096;

/// Uploads in flight per client.
#[derive(Debug, Default)]
pub struct UploadLimiter {
    clients: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl UploadLimiter {
    /// A slot for one upload by `client`, held until the permit drops; `None` when all of the
    /// client's [`MAX_CONCURRENT_UPLOADS`] slots are taken.
    pub fn acquire(&self, client: &str) -> Option<OwnedSemaphorePermit> {
        let semaphore = {
            let mut clients = match self.clients.lock() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            if clients.len() > MAX_TRACKED_UPLOADERS {
                clients.retain(|_, s| s.available_permits() < MAX_CONCURRENT_UPLOADS);
            }
            clients
                .entry(client.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(MAX_CONCURRENT_UPLOADS)))
                .clone()
        };
        semaphore.try_acquire_owned().ok()
    }
}

/// What is out of bounds in `hello`, if anything, as the end of "the Hello has ...".
pub fn hello_out_of_bounds(hello: &pb::Hello) -> Option<String> {
    let too_long = |s: &String| s.len() > MAX_HELLO_STRING;
    if hello.labels.len() > MAX_HELLO_LABELS {
        Some(format!(
            "{} labels (at most {MAX_HELLO_LABELS})",
            hello.labels.len()
        ))
    } else if hello.apps.len() > MAX_HELLO_APPS {
        Some(format!(
            "{} apps (at most {MAX_HELLO_APPS})",
            hello.apps.len()
        ))
    } else if hello
        .apps
        .iter()
        .any(|a| a.releases.len() > MAX_HELLO_RELEASES)
    {
        Some(format!(
            "an app with more than {MAX_HELLO_RELEASES} releases"
        ))
    } else if hello.journal.len() > MAX_HELLO_JOURNAL {
        Some(format!(
            "{} journal entries (at most {MAX_HELLO_JOURNAL})",
            hello.journal.len()
        ))
    } else if hello.labels.iter().any(|(k, v)| too_long(k) || too_long(v))
        || hello.apps.iter().any(|a| {
            too_long(&a.app)
                || too_long(&a.current)
                || too_long(&a.permanent)
                || a.releases
                    .iter()
                    .any(|r| too_long(&r.name) || too_long(&r.version) || too_long(&r.status))
        })
        || hello
            .journal
            .iter()
            .any(|j| too_long(&j.rollout_id) || j.error.len() > MAX_HELLO_JOURNAL_ERROR)
        || too_long(&hello.agent_version)
    {
        Some(format!("a value longer than {MAX_HELLO_STRING} bytes"))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_own_upload_slots() {
        let limiter = UploadLimiter::default();
        let held: Vec<_> = (0..MAX_CONCURRENT_UPLOADS)
            .filter_map(|_| limiter.acquire("token:a"))
            .collect();
        assert_eq!(held.len(), MAX_CONCURRENT_UPLOADS);
        assert!(limiter.acquire("token:a").is_none());
        assert!(limiter.acquire("token:b").is_some());
        drop(held);
        assert!(limiter.acquire("token:a").is_some());
    }
}
