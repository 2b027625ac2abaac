//! An async server: Bob's application answers every request in a task of its own, so a
//! slow answer never delays the others.
//!
//! ```text
//! cargo run -p p2p-handler --example async_server
//! ```
//!
//! `Handler::spawn` starts a node on the current tokio runtime and returns a handle (cheap
//! to clone: every clone drives the same node) and the application's inbox. Bob takes
//! requests from `inbox.received` and spawns one task per request; each answers with
//! `response_to` when it is done. Four clients ask at once, and the first asks for a slow
//! answer: here, one that waits until the three others were answered and confirmed
//! (`ResponseDelivered`: the client acknowledged the reply, on the same inbox). A server
//! answering one request at a time would wait for ever.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use p2p_handler::{AllowList, Config, Event, Handler, Keypair, TcpTransport};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    for line in run().await? {
        println!("{line}");
    }
    Ok(())
}

/// Runs four clients against the server; returns the replies in the order they came.
async fn run() -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let localhost: SocketAddr = "127.0.0.1:0".parse()?;
    let server_key = Keypair::from_private_bytes([9; 32]);
    let clients: Vec<Keypair> = (1..=4u8)
        .map(|i| Keypair::from_private_bytes([i; 32]))
        .collect();
    let (bob, mut inbox) = Handler::spawn(
        TcpTransport,
        localhost,
        server_key.clone(),
        AllowList::from_keys(clients.iter().map(|k| *k.public_bytes())),
        Config::default(),
        [9; 32], // The seed of all its randomness (use the OS's in production).
    )
    .await?;

    // The server: one task per request; it ends when four replies are confirmed.
    let server = tokio::spawn({
        let bob = bob.clone();
        async move {
            // Opened when the three quick answers are confirmed.
            let gate = Arc::new(tokio::sync::Notify::new());
            let mut confirmed = 0;
            while confirmed < 4 {
                match inbox.received.recv().await {
                    Some(Event::Request {
                        peer,
                        exchange,
                        payload,
                        ..
                    }) => {
                        let (bob, gate) = (bob.clone(), gate.clone());
                        tokio::spawn(async move {
                            let text = String::from_utf8_lossy(&payload).into_owned();
                            if text.starts_with("slow") {
                                gate.notified().await; // Stands for a long computation.
                            }
                            let _ = bob
                                .response_to(peer, exchange, format!("done: {text}"))
                                .await;
                        });
                    }
                    Some(Event::ResponseDelivered { .. }) => {
                        confirmed += 1;
                        if confirmed == 3 {
                            gate.notify_one();
                        }
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        }
    });

    // Four clients at once; the first asks for the slow answer.
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    for (i, key) in clients.into_iter().enumerate() {
        let (to, addr) = (bob.local_peer_id(), bob.local_addr());
        let tx = tx.clone();
        let allow = AllowList::from_keys([*server_key.public_bytes()]);
        tokio::spawn(async move {
            let result = async {
                let (client, mut inbox) = Handler::spawn(
                    TcpTransport,
                    localhost,
                    key,
                    allow,
                    Config::default(),
                    [i as u8; 32],
                )
                .await?;
                let text = if i == 0 {
                    "slow request".to_owned()
                } else {
                    format!("request {i}")
                };
                client.request(to, addr, text).await?;
                let reply = loop {
                    match inbox.received.recv().await {
                        Some(Event::Reply { payload, .. }) => {
                            break String::from_utf8_lossy(&payload).into_owned();
                        }
                        Some(Event::Failed { failure, .. }) => {
                            return Err(failure.to_string().into());
                        }
                        Some(_) => {}
                        None => return Err("the client stopped".into()),
                    }
                };
                client.shutdown().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(reply)
            }
            .await;
            let _ = tx.send(result.map_err(|e| e.to_string())).await;
        });
    }
    drop(tx);
    let mut replies = Vec::new();
    while let Some(reply) = rx.recv().await {
        replies.push(reply?);
    }
    tokio::time::timeout(Duration::from_secs(30), server).await??;
    bob.shutdown().await?;
    Ok(replies)
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_client_is_answered_though_one_answer_waits_for_the_others() {
        // The slow answer waited for the three others: had the server answered one
        // request at a time, it would never have come.
        let mut replies = super::run().await.unwrap();
        replies.sort();
        assert_eq!(
            replies,
            [
                "done: request 1",
                "done: request 2",
                "done: request 3",
                "done: slow request"
            ]
        );
    }
}
