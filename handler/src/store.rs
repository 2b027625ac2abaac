//! Where a durable node keeps what must survive a crash: the [`Store`] trait and its two
//! implementations, [`RedbStore`] (a data directory, the default for production) and
//! [`MemoryStore`] (tests, and restarts within one process).
//!
//! A store is a dumb transactional key-value map: the rows, their meaning and their format
//! belong to the core (`p2p_handler_core::durable`). The handler task commits the endpoint's
//! journal in one transaction before it performs any output or hands out any event of the
//! same step. It keeps taking inputs while a commit runs; their writes go together into the
//! next transaction (pipelined group commit), so a busy node pays for one sync per batch,
//! not per exchange.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

pub use p2p_handler_core::durable::{CorruptRecord, KvOp, Rows, Table, apply};

/// A commit in progress. `'static`, so a store can run it on a blocking thread.
pub type Commit = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'static>>;

/// A row: table, key, value.
pub type Row = (Table, Vec<u8>, Vec<u8>);

/// Durable storage for one node.
pub trait Store: Send + 'static {
    /// Every row, to recover from. Called once, when the handler starts.
    fn load(&mut self) -> Result<Vec<Row>, StoreError>;

    /// Applies `ops` atomically; when the future resolves with `Ok`, they survive a crash of
    /// the process (and, for a store on disk, of the machine). A future dropped before it
    /// resolves may or may not have committed: either way, nothing was acted upon yet.
    fn commit(&mut self, ops: Vec<KvOp>) -> Commit;

    /// Where the store lives, for messages.
    fn location(&self) -> String;
}

/// A store that failed: the node cannot keep its promises with it, so it stops.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be opened, read or written.
    #[error("{path}: {detail}")]
    Io {
        /// File or directory.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// A row does not decode: the file is damaged, or written by another node or version.
    /// Nothing is discarded; move the file away to start afresh, knowing what is lost.
    #[error("{path}: corrupt or incompatible store: {record}")]
    Corrupt {
        /// File.
        path: String,
        /// Which row, and what is wrong with it.
        record: CorruptRecord,
    },
}

/// A store in memory. Clones share the rows, so a test can stop a handler and start another
/// on a clone to play a restart; the rows die with the process.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    rows: Arc<Mutex<Rows>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rows held, for tests.
    pub fn len(&self) -> usize {
        self.rows.lock().map_or(0, |r| r.len())
    }

    /// Whether it holds no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows of one table, for tests.
    pub fn rows(&self, table: Table) -> usize {
        self.rows
            .lock()
            .map_or(0, |r| r.keys().filter(|(t, _)| *t == table).count())
    }
}

impl Store for MemoryStore {
    fn load(&mut self) -> Result<Vec<Row>, StoreError> {
        let rows = self.rows.lock().map_err(|_| poisoned())?;
        Ok(rows
            .iter()
            .map(|((t, k), v)| (*t, k.clone(), v.clone()))
            .collect())
    }

    fn commit(&mut self, ops: Vec<KvOp>) -> Commit {
        let result = match self.rows.lock() {
            Ok(mut rows) => {
                apply(&mut rows, ops);
                Ok(())
            }
            Err(_) => Err(poisoned()),
        };
        Box::pin(std::future::ready(result))
    }

    fn location(&self) -> String {
        "memory".into()
    }
}

fn poisoned() -> StoreError {
    StoreError::Io {
        path: "memory".into(),
        detail: "store lock poisoned".into(),
    }
}

/// A store in a data directory: one `redb` database file, `node.redb`. ACID and crash-safe:
/// each commit is synced to disk before it returns (redb's `Durability::Immediate`). One
/// process at a time: a second opening of the same directory is refused.
#[derive(Clone)]
pub struct RedbStore {
    db: Arc<redb::Database>,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

/// The database file in a data directory.
pub const DB_FILE: &str = "node.redb";

fn table_def(table: Table) -> redb::TableDefinition<'static, &'static [u8], &'static [u8]> {
    redb::TableDefinition::new(table.name())
}

impl RedbStore {
    /// Opens (creating if needed) the store in directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let io = |path: &Path, detail: String| StoreError::Io {
            path: path.display().to_string(),
            detail,
        };
        if dir.exists() && !dir.is_dir() {
            return Err(io(
                dir,
                "not a directory (a data directory is a folder)".into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| io(dir, format!("cannot create: {e}")))?;
        let path = dir.join(DB_FILE);
        let db = redb::Database::create(&path).map_err(|e| io(&path, e.to_string()))?;
        let store = Self {
            db: Arc::new(db),
            path,
        };
        // Every table exists from the start, so reads never meet a missing one.
        let txn = store.db.begin_write().map_err(|e| store.io(e))?;
        for table in Table::ALL {
            txn.open_table(table_def(table)).map_err(|e| store.io(e))?;
        }
        txn.commit().map_err(|e| store.io(e))?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io {
            path: self.path.display().to_string(),
            detail: e.to_string(),
        }
    }

    fn write(db: &redb::Database, ops: Vec<KvOp>) -> Result<(), redb::Error> {
        let txn = db.begin_write()?;
        {
            let mut tables = Table::ALL
                .iter()
                .map(|t| txn.open_table(table_def(*t)))
                .collect::<Result<Vec<_>, _>>()?;
            for op in ops {
                match op {
                    KvOp::Put { table, key, value } => {
                        tables[table as usize].insert(key.as_slice(), value.as_slice())?;
                    }
                    KvOp::Delete { table, key } => {
                        tables[table as usize].remove(key.as_slice())?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

impl Store for RedbStore {
    fn load(&mut self) -> Result<Vec<Row>, StoreError> {
        use redb::{ReadableDatabase, ReadableTable};
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let mut rows = Vec::new();
        for table in Table::ALL {
            let t = txn.open_table(table_def(table)).map_err(|e| self.io(e))?;
            for row in t.iter().map_err(|e| self.io(e))? {
                let (k, v) = row.map_err(|e| self.io(e))?;
                rows.push((table, k.value().to_vec(), v.value().to_vec()));
            }
        }
        Ok(rows)
    }

    fn commit(&mut self, ops: Vec<KvOp>) -> Commit {
        let db = self.db.clone();
        let path = self.path.display().to_string();
        Box::pin(async move {
            let result = tokio::task::spawn_blocking(move || Self::write(&db, ops)).await;
            match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(StoreError::Io {
                    path,
                    detail: e.to_string(),
                }),
                Err(e) => Err(StoreError::Io {
                    path,
                    detail: format!("commit task failed: {e}"),
                }),
            }
        })
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }
}
