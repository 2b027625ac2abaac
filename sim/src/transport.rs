//! The handler's transport trait over turmoil's simulated TCP.
//!
//! One [`TurmoilTransport`] per node incarnation. Its streams are registered in the order
//! they were opened, so that a crash closes them in that order: tokio drops a crashed
//! runtime's tasks in an order taken from process-wide task ids, and each dropped stream
//! sends its FIN (drawing a latency from turmoil's RNG) as it goes, which made two runs of
//! one seed in one process differ. When the simulator marks the node as crashing, the
//! first of its streams to be dropped closes all of them, oldest first; the others then
//! find theirs already closed.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use p2p_handler::transport::{Listener, Transport};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

type Slot = Arc<Mutex<Option<turmoil::net::TcpStream>>>;

/// What a node's streams share.
#[derive(Debug, Default)]
struct Registry {
    next: AtomicU64,
    crashing: AtomicBool,
    open: Mutex<BTreeMap<u64, Slot>>,
}

impl Registry {
    fn open(&self) -> MutexGuard<'_, BTreeMap<u64, Slot>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(self: &Arc<Self>, stream: turmoil::net::TcpStream) -> SimStream {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let slot: Slot = Arc::new(Mutex::new(Some(stream)));
        self.open().insert(id, slot.clone());
        SimStream {
            id,
            slot,
            registry: self.clone(),
        }
    }
}

/// turmoil's virtual TCP. Only usable inside a turmoil host.
#[derive(Debug, Clone, Default)]
pub struct TurmoilTransport {
    registry: Arc<Registry>,
}

impl TurmoilTransport {
    /// A transport for one incarnation of a node.
    pub fn new() -> Self {
        Self::default()
    }

    /// Call before the node is crashed (or bounced): its streams then close in the order
    /// they were opened.
    pub fn crashing(&self) -> CrashSwitch {
        CrashSwitch(self.registry.clone())
    }
}

/// Marks a node's streams as crashing (see [`TurmoilTransport::crashing`]).
#[derive(Debug, Clone)]
pub struct CrashSwitch(Arc<Registry>);

impl CrashSwitch {
    /// The node is about to be dropped by turmoil.
    pub fn set(&self) {
        self.0.crashing.store(true, Ordering::Release);
    }
}

impl Transport for TurmoilTransport {
    type Stream = SimStream;
    type Listener = TurmoilListener;

    /// Turmoil has no backlog to set: its listeners queue without bound.
    async fn bind(&self, addr: SocketAddr, _backlog: u32) -> io::Result<Self::Listener> {
        Ok(TurmoilListener {
            inner: turmoil::net::TcpListener::bind(addr).await?,
            registry: self.registry.clone(),
        })
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<Self::Stream> {
        let stream = turmoil::net::TcpStream::connect(addr).await?;
        Ok(self.registry.register(stream))
    }
}

/// A turmoil stream, closed in a deterministic order when its node crashes.
#[derive(Debug)]
pub struct SimStream {
    id: u64,
    slot: Slot,
    registry: Arc<Registry>,
}

impl SimStream {
    fn with<R>(
        &self,
        f: impl FnOnce(Pin<&mut turmoil::net::TcpStream>) -> Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_mut() {
            Some(stream) => f(Pin::new(stream)),
            None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

impl Drop for SimStream {
    fn drop(&mut self) {
        if self.registry.crashing.load(Ordering::Acquire) {
            // Close every stream of the node, oldest first (dropping each sends its FIN).
            let all: Vec<Slot> = std::mem::take(&mut *self.registry.open())
                .into_values()
                .collect();
            for slot in all {
                let stream = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                drop(stream);
            }
            return;
        }
        self.registry.open().remove(&self.id);
        let stream = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(stream);
    }
}

impl AsyncRead for SimStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.with(|s| s.poll_read(cx, buf))
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.with(|s| s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|s| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|s| s.poll_shutdown(cx))
    }
}

/// A turmoil listener.
pub struct TurmoilListener {
    inner: turmoil::net::TcpListener,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for TurmoilListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TurmoilListener")
            .field(&self.inner.local_addr())
            .finish()
    }
}

impl Listener for TurmoilListener {
    type Stream = SimStream;

    async fn accept(&mut self) -> io::Result<(Self::Stream, SocketAddr)> {
        let (stream, addr) = self.inner.accept().await?;
        Ok((self.registry.register(stream), addr))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}
