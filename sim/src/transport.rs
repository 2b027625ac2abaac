//! The handler's transport trait over turmoil's simulated TCP.

use std::io;
use std::net::SocketAddr;

use p2p_handler::transport::{Listener, Transport};

/// turmoil's virtual TCP. Only usable inside a turmoil host.
#[derive(Debug, Clone, Copy, Default)]
pub struct TurmoilTransport;

impl Transport for TurmoilTransport {
    type Stream = turmoil::net::TcpStream;
    type Listener = TurmoilListener;

    /// Turmoil has no backlog to set: its listeners queue without bound.
    async fn bind(&self, addr: SocketAddr, _backlog: u32) -> io::Result<Self::Listener> {
        Ok(TurmoilListener(
            turmoil::net::TcpListener::bind(addr).await?,
        ))
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<Self::Stream> {
        turmoil::net::TcpStream::connect(addr).await
    }
}

/// A turmoil listener.
pub struct TurmoilListener(turmoil::net::TcpListener);

impl std::fmt::Debug for TurmoilListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TurmoilListener")
            .field(&self.0.local_addr())
            .finish()
    }
}

impl Listener for TurmoilListener {
    type Stream = turmoil::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(Self::Stream, SocketAddr)> {
        self.0.accept().await
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}
