//! Where address records are kept outside the network, so that nodes not yet connected can
//! find each other.
//!
//! Members pass records to each other over their connections (the core does that; see
//! `p2p_handler_core::records` and PROTOCOL.md section 9). A [`RecordBackend`] is the other
//! way: a store that every node writes its own record to and reads everyone's from. It
//! needs no trust: records are signed by their owners and sealed for the members, so a
//! backend (or whoever can write to it) can drop, delay or replay records, never forge or
//! read them, and a replayed one is refused as stale by every node that saw a newer one.
//!
//! [`DirectoryBackend`] keeps one file per member in a folder shared by any means (a
//! mounted bucket, a synced folder, NFS). A blockchain or object-store backend implements
//! the same trait without touching the core.
//!
//! The core's record types (`p2p_handler_core::records`) are re-exported here.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

pub use p2p_handler_core::records::*;

use crate::identity::PeerId;

/// The most records a backend hands over per read (one per member at most).
pub const MAX_BACKEND_RECORDS: usize = crate::membership::MAX_MEMBERS;
/// How often the driver reads its backend unless told otherwise.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(30);

/// A store of sealed address records (see the module docs). Calls block (the driver makes
/// them on a blocking thread); each should finish in bounded time.
pub trait RecordBackend: Send + Sync + 'static {
    /// Stores `owner`'s newest record, replacing what the backend held for it.
    fn publish(&self, owner: PeerId, sealed: &[u8]) -> io::Result<()>;
    /// Every record the backend holds now (at most [`MAX_BACKEND_RECORDS`], none longer
    /// than [`MAX_RECORD_LEN`]): the node judges each.
    fn fetch(&self) -> io::Result<Vec<Bytes>>;
    /// Names the backend in logs ("records directory /srv/records").
    fn describe(&self) -> String;
}

/// A folder with one file per member: `<peer id>.record`, written to a temporary file and
/// renamed into place, so a reader never sees half a record.
#[derive(Debug, Clone)]
pub struct DirectoryBackend {
    dir: PathBuf,
}

/// The suffix of a record file.
pub const RECORD_FILE_SUFFIX: &str = ".record";

impl DirectoryBackend {
    /// A backend over `dir`, which must exist and be a directory.
    pub fn new(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        let meta = std::fs::metadata(&dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("records directory {}: {e}", dir.display()),
            )
        })?;
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("records directory {}: not a directory", dir.display()),
            ));
        }
        Ok(Self { dir })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds `owner`'s record.
    pub fn file_of(&self, owner: &PeerId) -> PathBuf {
        self.dir.join(format!("{owner}{RECORD_FILE_SUFFIX}"))
    }
}

impl RecordBackend for DirectoryBackend {
    fn publish(&self, owner: PeerId, sealed: &[u8]) -> io::Result<()> {
        use std::io::Write as _;
        let target = self.file_of(&owner);
        let temp = self.dir.join(format!(
            ".{owner}{RECORD_FILE_SUFFIX}.{}.tmp",
            std::process::id()
        ));
        let result = (|| {
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(sealed)?;
            file.sync_all()?;
            std::fs::rename(&temp, &target)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", target.display())))
    }

    fn fetch(&self) -> io::Result<Vec<Bytes>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(stem) = name.strip_suffix(RECORD_FILE_SUFFIX) else {
                continue;
            };
            if stem.parse::<PeerId>().is_err() {
                tracing::debug!(file = %entry.path().display(), "not a record file name: skipped");
                continue;
            }
            names.push(entry.path());
        }
        // In name order, so that which ones are kept when there are too many does not
        // depend on the file system.
        names.sort();
        if names.len() > MAX_BACKEND_RECORDS {
            tracing::warn!(
                dir = %self.dir.display(),
                files = names.len(),
                "more record files than a membership has members: reading the first {MAX_BACKEND_RECORDS}"
            );
            names.truncate(MAX_BACKEND_RECORDS);
        }
        let mut records = Vec::with_capacity(names.len());
        for path in names {
            let len = match std::fs::metadata(&path) {
                Ok(meta) => meta.len(),
                Err(_) => continue, // Replaced or removed while we listed: next time.
            };
            if len > MAX_RECORD_LEN as u64 {
                tracing::warn!(
                    file = %path.display(),
                    bytes = len,
                    "record file longer than any record ({MAX_RECORD_LEN} bytes): skipped"
                );
                continue;
            }
            match std::fs::read(&path) {
                Ok(bytes) => records.push(Bytes::from(bytes)),
                Err(e) => {
                    tracing::debug!(file = %path.display(), error = %e, "unreadable: skipped")
                }
            }
        }
        Ok(records)
    }

    fn describe(&self) -> String {
        format!("records directory {}", self.dir.display())
    }
}

/// A backend in memory, shared by clones: tests, and nodes in one process.
#[derive(Clone, Default)]
pub struct MemoryBackend {
    records: Arc<Mutex<std::collections::BTreeMap<PeerId, Bytes>>>,
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBackend").finish_non_exhaustive()
    }
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts bytes under `owner` as a writer of the backend could (tests of replays).
    pub fn put(&self, owner: PeerId, bytes: Bytes) {
        if let Ok(mut records) = self.records.lock() {
            records.insert(owner, bytes);
        }
    }

    /// What it holds for `owner`.
    pub fn get(&self, owner: &PeerId) -> Option<Bytes> {
        self.records.lock().ok()?.get(owner).cloned()
    }
}

impl RecordBackend for MemoryBackend {
    fn publish(&self, owner: PeerId, sealed: &[u8]) -> io::Result<()> {
        self.put(owner, Bytes::copy_from_slice(sealed));
        Ok(())
    }

    fn fetch(&self) -> io::Result<Vec<Bytes>> {
        let records = self
            .records
            .lock()
            .map_err(|_| io::Error::other("memory backend poisoned"))?;
        Ok(records
            .values()
            .take(MAX_BACKEND_RECORDS)
            .cloned()
            .collect())
    }

    fn describe(&self) -> String {
        "records in memory".into()
    }
}

/// What the driver does with address records ([`crate::Options::records`]).
#[derive(Clone)]
pub struct RecordOptions {
    /// The addresses to publish, most preferred first; empty: the address the node bound,
    /// when it is one peers can dial.
    pub addresses: Vec<std::net::SocketAddr>,
    /// How long each record lives (it is refreshed at half that).
    pub ttl: Duration,
    /// Where records are kept outside the network, if anywhere.
    pub backend: Option<Arc<dyn RecordBackend>>,
    /// How often the backend is read.
    pub poll_interval: Duration,
    /// Whether this node publishes a record of its own (default true). A client that only
    /// sends (`p2p-node send`) reads records and publishes none.
    pub publish: bool,
}

impl fmt::Debug for RecordOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordOptions")
            .field("addresses", &self.addresses)
            .field("ttl", &self.ttl)
            .field("backend", &self.backend.as_ref().map(|b| b.describe()))
            .field("poll_interval", &self.poll_interval)
            .field("publish", &self.publish)
            .finish()
    }
}

impl Default for RecordOptions {
    fn default() -> Self {
        Self {
            addresses: Vec::new(),
            ttl: crate::endpoint::DEFAULT_RECORD_TTL,
            backend: None,
            poll_interval: DEFAULT_POLL_INTERVAL,
            publish: true,
        }
    }
}
