//! A node's simulated disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use p2p_handler::store::{Commit, KvOp, Row};
use p2p_handler::{MemoryStore, Store, StoreError};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

use super::world::Shared;
use tokio::sync::mpsc;

/// A node's simulated disk: survives crashes and restarts of its host. Under the storage
/// fault a commit takes virtual time, and a crash meanwhile drops it unapplied (or, when
/// `torn`, finds it applied for half the commits: it reached the disk, the sync had not
/// returned). A full
/// disk (`disk_full`) fails every commit, writing nothing, until the node restarts.
pub(super) struct SimStore {
    pub(super) rows: MemoryStore,
    pub(super) latency: Option<Duration>,
    pub(super) full: Arc<AtomicBool>,
    /// With `torn`: draws, per commit, whether it lands at the start of its latency.
    pub(super) torn: Option<ChaCha20Rng>,
    /// With `sync_lies`: the disk's write cache. A commit reports success at once and
    /// reaches the disk only a while later, in order; a crash loses what had not.
    pub(super) cache: Option<WriteCache>,
}

impl SimStore {
    /// Incarnation `incarnation` of durable node `node`'s disk, with the scenario's
    /// storage faults. Started on the node's host (a lying disk's flusher runs there).
    pub(super) fn for_node(s: &mut Shared, node: usize, incarnation: u64) -> Self {
        let scenario = &s.scenario;
        let latency = scenario.storage_fault.then_some(scenario.commit_latency);
        let torn = (latency.is_some() && scenario.torn).then(|| {
            let mut rng = ChaCha20Rng::seed_from_u64(s.seed);
            rng.set_stream(u64::MAX - 1 - node as u64 * 1000 - incarnation);
            rng
        });
        let lies = scenario.sync_lies;
        let state = &mut s.nodes[node];
        let rows = state.store.get_or_insert_with(MemoryStore::new).clone();
        Self {
            cache: lies.map(|lag| WriteCache::start(&rows, lag)),
            rows,
            latency,
            full: state.disk_full.clone(),
            torn,
        }
    }
}

/// A disk whose sync lies: what it acknowledged reaches the platters `lag` later.
pub(super) struct WriteCache {
    lag: Duration,
    pending: mpsc::UnboundedSender<(tokio::time::Instant, Vec<KvOp>)>,
}

impl WriteCache {
    /// Starts the disk's flusher on the node's host: it dies with the host, and what it
    /// had not written with it.
    pub(super) fn start(rows: &MemoryStore, lag: Duration) -> Self {
        let (pending, mut queue) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<KvOp>)>();
        let mut rows = rows.clone();
        tokio::spawn(async move {
            while let Some((at, ops)) = queue.recv().await {
                tokio::time::sleep_until(at).await;
                let _ = rows.commit(ops).await;
            }
        });
        Self { lag, pending }
    }
}

impl Store for SimStore {
    fn load(&mut self) -> Result<Vec<Row>, StoreError> {
        self.rows.load()
    }

    fn commit(&mut self, ops: Vec<KvOp>) -> Commit {
        if self.full.load(Ordering::Relaxed) {
            return Box::pin(async {
                Err(StoreError::Io {
                    path: "simulated disk".into(),
                    detail: "No space left on device (os error 28)".into(),
                })
            });
        }
        if let Some(cache) = &self.cache {
            let at = tokio::time::Instant::now() + cache.lag;
            let _ = cache.pending.send((at, ops));
            return Box::pin(std::future::ready(Ok(())));
        }
        let mut rows = self.rows.clone();
        let early = self
            .torn
            .as_mut()
            .is_some_and(|rng| rng.next_u32() % 2 == 0);
        match self.latency {
            None => rows.commit(ops),
            Some(latency) if early => {
                // On disk already; the handler hears so only after the latency.
                let landed = rows.commit(ops);
                Box::pin(async move {
                    tokio::time::sleep(latency).await;
                    landed.await
                })
            }
            Some(latency) => Box::pin(async move {
                tokio::time::sleep(latency).await;
                rows.commit(ops).await
            }),
        }
    }

    fn location(&self) -> String {
        "simulated disk".into()
    }
}
