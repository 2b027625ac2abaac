//! Where bytes travel: a minimal transport trait and two implementations.
//!
//! The driver needs only to listen, accept and connect, and byte streams that are
//! `AsyncRead + AsyncWrite`. [`TcpTransport`] is tokio's real TCP; [`MemoryTransport`] is an
//! in-process network of `tokio::io::duplex` pipes for tests and benchmarks. The simulator
//! adds a turmoil implementation, so nothing in the driver assumes real sockets.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};
use tokio::sync::mpsc;

/// A way to open and accept byte streams.
pub trait Transport: Clone + Send + Sync + 'static {
    /// A connected byte stream.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// A bound listener.
    type Listener: Listener<Stream = Self::Stream>;

    /// Binds a listener with room for `backlog` connections not accepted yet; port 0 picks
    /// a free port (read it with `local_addr`).
    fn bind(
        &self,
        addr: SocketAddr,
        backlog: u32,
    ) -> impl Future<Output = io::Result<Self::Listener>> + Send;

    /// Opens a stream to `addr`.
    fn connect(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// A bound listener.
pub trait Listener: Send + 'static {
    /// The streams it yields.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Waits for the next incoming stream and its remote address.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;

    /// The address actually bound.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// Real TCP through tokio.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpTransport;

impl Transport for TcpTransport {
    type Stream = tokio::net::TcpStream;
    type Listener = tokio::net::TcpListener;

    async fn bind(&self, addr: SocketAddr, backlog: u32) -> io::Result<Self::Listener> {
        // As `TcpListener::bind` does (address reuse on Unix), but with our backlog rather
        // than its fixed 128, which a burst of dials overflows.
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(backlog)
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<Self::Stream> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        // Exchanges are small request/response turns: do not wait to coalesce segments.
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(Self::Stream, SocketAddr)> {
        let (stream, addr) = tokio::net::TcpListener::accept(self).await?;
        stream.set_nodelay(true)?;
        Ok((stream, addr))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::TcpListener::local_addr(self)
    }
}

/// Bytes buffered in each direction of an in-memory stream.
const MEMORY_PIPE_BYTES: usize = 256 * 1024;

type Incoming = mpsc::Sender<(DuplexStream, SocketAddr)>;

/// An in-process network: listeners are registered by address, connections are duplex pipes.
/// Clones share the same network.
#[derive(Debug, Clone, Default)]
pub struct MemoryTransport {
    net: Arc<Mutex<MemoryNet>>,
}

#[derive(Debug, Default)]
struct MemoryNet {
    listeners: BTreeMap<SocketAddr, Incoming>,
    next_port: u16,
}

impl MemoryNet {
    fn free_port(&mut self, ip: IpAddr) -> io::Result<u16> {
        for _ in 0..u16::MAX {
            self.next_port = self.next_port.wrapping_add(1).max(1024);
            if !self
                .listeners
                .contains_key(&SocketAddr::new(ip, self.next_port))
            {
                return Ok(self.next_port);
            }
        }
        Err(io::Error::new(io::ErrorKind::AddrInUse, "no free port"))
    }
}

impl MemoryTransport {
    /// A new, empty network.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> io::Result<std::sync::MutexGuard<'_, MemoryNet>> {
        self.net
            .lock()
            .map_err(|_| io::Error::other("memory network lock poisoned"))
    }
}

impl Transport for MemoryTransport {
    type Stream = DuplexStream;
    type Listener = MemoryListener;

    async fn bind(&self, addr: SocketAddr, backlog: u32) -> io::Result<Self::Listener> {
        let mut net = self.lock()?;
        let addr = if addr.port() == 0 {
            SocketAddr::new(addr.ip(), net.free_port(addr.ip())?)
        } else {
            addr
        };
        if net.listeners.get(&addr).is_some_and(|tx| !tx.is_closed()) {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, addr.to_string()));
        }
        let (tx, rx) = mpsc::channel(usize::try_from(backlog).unwrap_or(usize::MAX).max(1));
        net.listeners.insert(addr, tx);
        Ok(MemoryListener {
            addr,
            incoming: rx,
            transport: self.clone(),
        })
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<Self::Stream> {
        let (tx, local) = {
            let mut net = self.lock()?;
            let tx = net.listeners.get(&addr).cloned().ok_or_else(|| {
                io::Error::new(io::ErrorKind::ConnectionRefused, addr.to_string())
            })?;
            let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
            (tx, SocketAddr::new(ip, net.free_port(ip)?))
        };
        let (client, server) = tokio::io::duplex(MEMORY_PIPE_BYTES);
        tx.send((server, local))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::ConnectionRefused, addr.to_string()))?;
        Ok(client)
    }
}

/// A listener on a [`MemoryTransport`]. Dropping it frees the address.
#[derive(Debug)]
pub struct MemoryListener {
    addr: SocketAddr,
    incoming: mpsc::Receiver<(DuplexStream, SocketAddr)>,
    transport: MemoryTransport,
}

impl Listener for MemoryListener {
    type Stream = DuplexStream;

    async fn accept(&mut self) -> io::Result<(Self::Stream, SocketAddr)> {
        self.incoming
            .recv()
            .await
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "listener closed"))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

impl Drop for MemoryListener {
    fn drop(&mut self) {
        if let Ok(mut net) = self.transport.net.lock() {
            net.listeners.remove(&self.addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo_once<T: Transport>(transport: T, bind: SocketAddr) {
        let mut listener = transport.bind(bind, 16).await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        });
        let mut c = transport.connect(addr).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn tcp_listener_holds_a_burst_of_dials_beyond_the_usual_128() {
        // Dials complete when the kernel queues them for accepting; with the usual backlog
        // of 128 the rest would lose their SYNs and hang while nobody accepts.
        const DIALS: usize = 400;
        let listener = TcpTransport
            .bind("127.0.0.1:0".parse().unwrap(), 1024)
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let dials: Vec<_> = (0..DIALS)
            .map(|_| tokio::spawn(tokio::net::TcpStream::connect(addr)))
            .collect();
        let mut connected = Vec::new();
        for dial in dials {
            // A guard against a hang, not a timing assertion: a lost SYN is retried after
            // 1 s, then 3 s, ..., so a dial the backlog refused would not finish in time.
            let stream = tokio::time::timeout(std::time::Duration::from_secs(60), dial)
                .await
                .expect("a dial stayed unanswered: the listen backlog overflowed")
                .unwrap()
                .unwrap();
            connected.push(stream);
        }
        assert_eq!(connected.len(), DIALS);
        drop(listener);
    }

    #[tokio::test]
    async fn tcp_round_trip_on_an_ephemeral_port() {
        echo_once(TcpTransport, "127.0.0.1:0".parse().unwrap()).await;
    }

    #[tokio::test]
    async fn memory_round_trip_and_address_lifecycle() {
        let t = MemoryTransport::new();
        echo_once(t.clone(), "127.0.0.1:0".parse().unwrap()).await;
        let addr: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let listener = t.bind(addr, 16).await.unwrap();
        assert_eq!(
            t.bind(addr, 16).await.unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        drop(listener);
        assert_eq!(
            t.connect(addr).await.unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
        t.bind(addr, 16).await.unwrap();
    }
}
