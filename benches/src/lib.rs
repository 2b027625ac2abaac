//! Shared set-up for the benchmarks: the physical limits (bare Noise, bare TCP) and the
//! handler under test, built the same way for criterion and for the `measure` binary.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Benchmark set-up: a panic is a failed run.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use p2p_handler::noise::{HandshakeRole, handshake, handshake_ik};
use p2p_handler::wire::MAX_FRAME_LEN;
use p2p_handler::{
    AllowList, Config, Event, Handler, Inbox, Keypair, Options, PeerId, TcpTransport,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use snow::TransportState;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// p50 and p99 of individually timed samples, as the JSON object `report.py` reads.
pub fn percentiles(mut d: Vec<Duration>) -> String {
    d.sort();
    let at = |q: f64| d[((d.len() as f64 * q) as usize).min(d.len() - 1)].as_secs_f64() * 1e6;
    format!(
        "{{\"p50_us\": {:.2}, \"p99_us\": {:.2}, \"samples\": {}}}",
        at(0.5),
        at(0.99),
        d.len()
    )
}

/// Deterministic keys.
pub fn keys(n: usize) -> Vec<Keypair> {
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    (0..n).map(|_| Keypair::generate(&mut rng)).collect()
}

/// One complete Noise XX handshake, both sides in memory; returns both transports.
pub fn noise_pair(a: &Keypair, b: &Keypair) -> (TransportState, TransportState) {
    let mut i = handshake(a, HandshakeRole::Initiator, [1; 32]).unwrap();
    let mut r = handshake(b, HandshakeRole::Responder, [2; 32]).unwrap();
    let mut buf = [0u8; 1024];
    let mut out = [0u8; 1024];
    let n = i.write_message(&[], &mut buf).unwrap();
    r.read_message(&buf[..n], &mut out).unwrap();
    let n = r.write_message(&[], &mut buf).unwrap();
    i.read_message(&buf[..n], &mut out).unwrap();
    let n = i.write_message(&[], &mut buf).unwrap();
    r.read_message(&buf[..n], &mut out).unwrap();
    (
        i.into_transport_mode().unwrap(),
        r.into_transport_mode().unwrap(),
    )
}

/// One complete Noise IK handshake (the dialer knows `b`'s key), both sides in memory;
/// returns both transports.
pub fn noise_ik_pair(a: &Keypair, b: &Keypair) -> (TransportState, TransportState) {
    let mut i = handshake_ik(a, HandshakeRole::Initiator, [1; 32], Some(b.public_bytes())).unwrap();
    let mut r = handshake_ik(b, HandshakeRole::Responder, [2; 32], None).unwrap();
    let mut buf = [0u8; 1024];
    let mut out = [0u8; 1024];
    let n = i.write_message(&[], &mut buf).unwrap();
    r.read_message(&buf[..n], &mut out).unwrap();
    let n = r.write_message(&[], &mut buf).unwrap();
    i.read_message(&buf[..n], &mut out).unwrap();
    (
        i.into_transport_mode().unwrap(),
        r.into_transport_mode().unwrap(),
    )
}

/// The frame codec the handler uses (2-byte length prefix).
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(2)
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec()
}

fn seal(t: &mut TransportState, plain: &[u8], buf: &mut [u8]) -> Bytes {
    let n = t.write_message(plain, buf).unwrap();
    Bytes::copy_from_slice(&buf[..n])
}

/// A TCP echo server for 64-byte messages on loopback; returns its address.
pub async fn tcp_echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            s.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 64];
                while s.read_exact(&mut buf).await.is_ok() {
                    if s.write_all(&buf).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// The hand-rolled limit for one exchange on an open session: the client sends a sealed
/// Request, the server answers Ack and Reply in one write, the client sends the final Ack.
/// No handler, no tasks beyond the server loop.
pub struct NoiseClient {
    framed: Framed<TcpStream, LengthDelimitedCodec>,
    session: TransportState,
    buf: Vec<u8>,
    plain: Vec<u8>,
}

/// Starts a bare Noise exchange server on loopback and connects a client to it.
pub async fn noise_exchange_pair(payload: usize) -> NoiseClient {
    let k = keys(2);
    let (client_t, mut server_t) = noise_pair(&k[0], &k[1]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut framed = Framed::new(s, codec());
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let mut plain = vec![0u8; MAX_FRAME_LEN];
        let reply = vec![7u8; payload];
        while let Some(Ok(frame)) = framed.next().await {
            // A Request: answer Ack + Reply together. The final Ack needs no answer.
            let n = server_t.read_message(&frame, &mut plain).unwrap();
            if n > 16 {
                let ack = seal(&mut server_t, &[2u8; 14], &mut buf);
                let rep = seal(&mut server_t, &reply, &mut buf);
                framed.feed(ack).await.unwrap();
                framed.feed(rep).await.unwrap();
                SinkExt::<Bytes>::flush(&mut framed).await.unwrap();
            }
        }
    });
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    NoiseClient {
        framed: Framed::new(s, codec()),
        session: client_t,
        buf: vec![0u8; MAX_FRAME_LEN],
        plain: vec![7u8; payload.max(32)],
    }
}

impl NoiseClient {
    /// One request/ack/reply/ack exchange.
    pub async fn exchange(&mut self) {
        let request = seal(&mut self.session, &self.plain, &mut self.buf);
        self.framed.send(request).await.unwrap();
        let mut out = vec![0u8; MAX_FRAME_LEN];
        for _ in 0..2 {
            let frame = self.framed.next().await.unwrap().unwrap();
            self.session.read_message(&frame, &mut out).unwrap();
        }
        let ack = seal(&mut self.session, &[2u8; 14], &mut self.buf);
        self.framed.send(ack).await.unwrap();
    }
}

/// Streams `total` bytes through a bare Noise session over loopback (chunked as the
/// handler chunks), returning when the receiver has decrypted everything.
pub async fn noise_stream(total: usize) -> Duration {
    let k = keys(2);
    let (mut tx_t, mut rx_t) = noise_pair(&k[0], &k[1]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let mut framed = Framed::new(s, codec());
        let mut out = vec![0u8; MAX_FRAME_LEN];
        let mut got = 0;
        while got < total {
            let frame = framed.next().await.unwrap().unwrap();
            got += rx_t.read_message(&frame, &mut out).unwrap();
        }
    });
    let s = TcpStream::connect(addr).await.unwrap();
    let start = Instant::now();
    let mut framed = Framed::new(s, codec());
    let chunk = vec![5u8; MAX_FRAME_LEN - 16];
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    let mut sent = 0;
    while sent < total {
        let n = chunk.len().min(total - sent);
        let frame = seal(&mut tx_t, &chunk[..n], &mut buf);
        framed.feed(frame).await.unwrap();
        sent += n;
    }
    SinkExt::<Bytes>::flush(&mut framed).await.unwrap();
    receiver.await.unwrap();
    start.elapsed()
}

/// Runs `start` on a thread of its own with a one-thread runtime, which goes on running
/// what it spawned until the process ends, and returns what `start` made. Benchmarks put
/// each node on one this way when the figure must not depend on how one shared runtime
/// happens to place two nodes' tasks, as two processes would not share one.
pub fn on_own_thread<T, F>(start: impl FnOnce() -> F + Send + 'static) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            tx.send(start().await).unwrap();
            std::future::pending::<()>().await;
        });
    });
    rx.recv().unwrap()
}

/// A server handler that answers every request with `reply` (on its own task), and its
/// peer id and address.
pub struct Server {
    /// Handle.
    pub handler: Handler,
    /// Peer id.
    pub peer: PeerId,
    /// Listening address.
    pub addr: SocketAddr,
    /// Static public key (a client that knows it dials with IK).
    pub key: [u8; 32],
}

/// Config for benchmarks: generous limits so rate limiting never interferes.
pub fn bench_config(reuse: bool) -> Config {
    Config {
        reuse_connections: reuse,
        request_rate: p2p_handler::RateLimit {
            burst: 1_000_000,
            per_second: 1_000_000,
        },
        connection_rate: p2p_handler::RateLimit {
            burst: 1_000_000,
            per_second: 1_000_000,
        },
        max_queued_per_peer: 100_000,
        ..Config::default()
    }
}

/// Start options for a benchmark node: durable (a fresh `redb` data directory under
/// `durable`, named after the node) or in memory.
pub fn bench_options(reuse: bool, seed: u8, durable: Option<(&Path, &Keypair)>) -> Options {
    let options = Options::new(bench_config(reuse), [seed; 32]).incarnation(u64::from(seed));
    match durable {
        None => options,
        Some((root, key)) => {
            let dir = root.join(key.peer_id().to_string());
            let _ = std::fs::remove_dir_all(&dir);
            options.data_dir(&dir).unwrap()
        }
    }
}

/// Starts an answering server allowing `clients`.
pub async fn server(key: Keypair, clients: &[Keypair], reply: Bytes, reuse: bool) -> Server {
    server_with(key, clients, reply, reuse, None).await
}

/// [`server`], durable with a data directory under `durable` if given.
pub async fn server_with(
    key: Keypair,
    clients: &[Keypair],
    reply: Bytes,
    reuse: bool,
    durable: Option<&Path>,
) -> Server {
    let options = bench_options(reuse, 3, durable.map(|d| (d, &key)));
    server_opts(key, clients, reply, options).await
}

/// [`server`] started with `options`.
pub async fn server_opts(
    key: Keypair,
    clients: &[Keypair],
    reply: Bytes,
    options: Options,
) -> Server {
    let (handler, mut inbox) = Handler::spawn_with(
        TcpTransport,
        "127.0.0.1:0".parse().unwrap(),
        key.clone(),
        AllowList::from_peers(clients.iter().map(Keypair::peer_id)),
        options,
    )
    .await
    .unwrap();
    let responder = handler.clone();
    tokio::spawn(async move {
        // Answers each request as it arrives, without waiting for the previous answer to be
        // confirmed, as a server of many peers would: a durable node confirms an answer
        // only once it is committed, so waiting would cost one sync per request.
        let mut answering = FuturesUnordered::new();
        loop {
            tokio::select! {
                biased;
                Some(_) = answering.next(), if !answering.is_empty() => {}
                event = inbox.received.recv() => match event {
                    Some(Event::Request { peer, exchange, .. }) => {
                        answering.push(responder.response_to(peer, exchange, reply.clone()));
                    }
                    Some(_) => {}
                    None => break,
                },
            }
        }
    });
    Server {
        peer: key.peer_id(),
        addr: handler.local_addr(),
        key: *key.public_bytes(),
        handler,
    }
}

/// A client handler allowed to talk to `server`.
pub async fn client(key: Keypair, server: PeerId, reuse: bool, seed: u8) -> (Handler, Inbox) {
    client_with(key, server, reuse, seed, None).await
}

/// [`client`], durable with a data directory under `durable` if given.
pub async fn client_with(
    key: Keypair,
    server: PeerId,
    reuse: bool,
    seed: u8,
    durable: Option<&Path>,
) -> (Handler, Inbox) {
    let options = bench_options(reuse, seed, durable.map(|d| (d, &key)));
    Handler::spawn_with(
        TcpTransport,
        "127.0.0.1:0".parse().unwrap(),
        key,
        AllowList::from_peers([server]),
        options,
    )
    .await
    .unwrap()
}

/// A client handler that knows the server's static key (`server_key`): it dials with IK,
/// the request in message 1, and redeems the tickets the server gives it.
pub async fn client_ik(
    key: Keypair,
    server_key: [u8; 32],
    reuse: bool,
    seed: u8,
) -> (Handler, Inbox) {
    Handler::spawn_with(
        TcpTransport,
        "127.0.0.1:0".parse().unwrap(),
        key,
        AllowList::from_keys([server_key]),
        bench_options(reuse, seed, None),
    )
    .await
    .unwrap()
}

/// One exchange through the handler: request, wait for its reply.
pub async fn handler_exchange(
    client: &Handler,
    inbox: &mut Inbox,
    server: &Server,
    payload: Bytes,
) {
    let id = client
        .request(server.peer, server.addr, payload)
        .await
        .unwrap();
    loop {
        match inbox.received.recv().await {
            Some(Event::Reply { exchange, .. }) if exchange == id => return,
            Some(_) => {}
            None => panic!("client stopped"),
        }
    }
}
