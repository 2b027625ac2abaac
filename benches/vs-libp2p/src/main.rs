//! rust-libp2p request-response over TCP + Noise + yamux on loopback, through the four
//! workloads of our own benchmarks, with libp2p's default settings apart from timeouts:
//!
//! * `reuse`: one client, sequential exchanges of 64 B on one open connection;
//! * `fresh`: one client, each exchange on a new connection (dial, Noise, yamux, request,
//!   response, close);
//! * `mib16`: one 16 MiB request (64 B response) on an open connection;
//! * `peers100`: 100 clients, each with its own swarm and connection, 20 exchanges each,
//!   all at once against one server.
//!
//! Prints one JSON line of rates, which `benches/report.py` puts beside the handler's figures
//! of the same run. Run: `cargo run --release --manifest-path benches/vs-libp2p/Cargo.toml`.

use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self, Codec, Event, Message, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, identity, noise, tcp, yamux};

/// Length-prefixed bytes both ways: the least a request-response codec can do.
#[derive(Clone, Default)]
struct Raw;

/// Larger than the largest workload.
const MAX: usize = 32 << 20;

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, data: Vec<u8>) -> io::Result<()> {
    io.write_all(&(data.len() as u32).to_be_bytes()).await?;
    io.write_all(&data).await?;
    io.close().await
}

impl Codec for Raw {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    fn read_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> impl Future<Output = io::Result<Vec<u8>>> + Send
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io)
    }

    fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> impl Future<Output = io::Result<Vec<u8>>> + Send
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io)
    }

    fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        r: Vec<u8>,
    ) -> impl Future<Output = io::Result<()>> + Send
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, r)
    }

    fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        r: Vec<u8>,
    ) -> impl Future<Output = io::Result<()>> + Send
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, r)
    }
}

type Node = Swarm<request_response::Behaviour<Raw>>;

fn node() -> Node {
    let timeouts =
        request_response::Config::default().with_request_timeout(Duration::from_secs(120));
    SwarmBuilder::with_existing_identity(identity::Keypair::generate_ed25519())
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp transport")
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                Raw,
                [(StreamProtocol::new("/bench/1"), ProtocolSupport::Full)],
                timeouts,
            )
        })
        .expect("behaviour")
        // libp2p closes a connection without streams at once by default; the reused
        // workloads need it kept between exchanges.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build()
}

/// Starts a server that answers every request with 64 bytes; its id and address.
async fn server() -> (PeerId, Multiaddr) {
    let mut swarm = node();
    swarm
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr"))
        .expect("listen");
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address;
        }
    };
    let peer = *swarm.local_peer_id();
    tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(Event::Message {
                message: Message::Request { channel, .. },
                ..
            }) = swarm.select_next_some().await
            {
                let _ = swarm.behaviour_mut().send_response(channel, vec![1u8; 64]);
            }
        }
    });
    (peer, addr)
}

/// One request, waiting for its response.
async fn exchange(swarm: &mut Node, server: PeerId, payload: Vec<u8>) {
    swarm.behaviour_mut().send_request(&server, payload);
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::Behaviour(Event::Message {
                message: Message::Response { .. },
                ..
            }) => return,
            SwarmEvent::Behaviour(Event::OutboundFailure { error, .. }) => {
                panic!("libp2p request failed: {error}")
            }
            _ => {}
        }
    }
}

async fn client(server: PeerId, addr: &Multiaddr) -> Node {
    let mut swarm = node();
    swarm.add_peer_address(server, addr.clone());
    // Connect (and warm up) before timing.
    exchange(&mut swarm, server, vec![7u8; 64]).await;
    swarm
}

/// Exchanges per second, reused connection, 64 B.
async fn reuse(n: u32) -> f64 {
    let (peer, addr) = server().await;
    let mut c = client(peer, &addr).await;
    let start = Instant::now();
    for _ in 0..n {
        exchange(&mut c, peer, vec![7u8; 64]).await;
    }
    f64::from(n) / start.elapsed().as_secs_f64()
}

/// Exchanges per second, a new connection for each.
async fn fresh(n: u32) -> f64 {
    let (peer, addr) = server().await;
    let mut c = client(peer, &addr).await;
    let start = Instant::now();
    for _ in 0..n {
        let _ = c.disconnect_peer_id(peer);
        while c.is_connected(&peer) {
            c.select_next_some().await;
        }
        exchange(&mut c, peer, vec![7u8; 64]).await;
    }
    f64::from(n) / start.elapsed().as_secs_f64()
}

/// MiB/s of one 16 MiB request on an open connection (the median of `n`, as criterion
/// reports ours).
async fn mib16(n: u32) -> f64 {
    let (peer, addr) = server().await;
    let mut c = client(peer, &addr).await;
    let mut rates = Vec::new();
    for _ in 0..n {
        let start = Instant::now();
        exchange(&mut c, peer, vec![7u8; 16 << 20]).await;
        rates.push(16.0 / start.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// Exchanges per second, `peers` clients with `each` reused exchanges, all at once.
async fn many(peers: usize, each: u32) -> f64 {
    let (peer, addr) = server().await;
    let mut clients = Vec::new();
    for _ in 0..peers {
        clients.push(client(peer, &addr).await);
    }
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                for _ in 0..each {
                    exchange(&mut c, peer, vec![7u8; 64]).await;
                }
                c
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client task");
    }
    (peers as f64 * f64::from(each)) / start.elapsed().as_secs_f64()
}

/// The median of `runs` measurements.
async fn median<F, Fut>(runs: usize, f: F) -> f64
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let mut v = Vec::new();
    for _ in 0..runs {
        v.push(f().await);
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 1 } else { 5 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let reuse = median(3, || reuse(2_000 * scale)).await;
        let fresh = median(3, || fresh(200 * scale)).await;
        let mib16 = mib16(3 * scale).await;
        let peers100 = median(3, || many(100, 20)).await;
        println!(
            "{{\"reuse_per_s\": {reuse:.0}, \"fresh_per_s\": {fresh:.0}, \"mib16_mib_per_s\": {mib16:.1}, \"peers100_per_s\": {peers100:.0}}}"
        );
    });
}
