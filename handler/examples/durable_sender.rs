//! A durable sender: a request survives its sender's stop and is finished by the next
//! start on the same data directory.
//!
//! ```text
//! cargo run -p p2p-handler --example durable_sender
//! ```
//!
//! Alice keeps her exchanges in a data directory (`Options::data_dir`). She asks Bob, whose
//! application is slow to answer, and stops before the reply comes: her shutdown keeps the
//! unfinished exchange in the directory. Bob answers meanwhile; his reply waits in his
//! cache for a resend. Alice starts again on the same directory: the exchange resumes by
//! itself (same id, next attempt), Bob answers the resend from his cache without asking
//! his application twice, and Alice gets the reply she asked for before the stop.

use std::path::Path;
use std::time::Duration;

use p2p_handler::{AllowList, Config, Event, ExchangeId, Keypair, Options, P2pHandler};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("durable-sender-{}", std::process::id()));
    let (id, reply, requests_seen) = run(&dir)?;
    println!("exchange {id} finished after a restart: {reply:?}");
    println!("Bob's application saw the request {requests_seen} time(s)");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Runs the story in `dir`; returns the exchange, its reply, and how many times Bob's
/// application was handed the request.
fn run(dir: &Path) -> Result<(ExchangeId, String, usize), Box<dyn std::error::Error>> {
    let alice_key = Keypair::from_private_bytes([1; 32]);
    let bob_key = Keypair::from_private_bytes([2; 32]);
    let bob = P2pHandler::new(
        "127.0.0.1:0",
        bob_key.clone(),
        AllowList::from_keys([*alice_key.public_bytes()]),
    )?;
    let to_bob = AllowList::from_keys([*bob_key.public_bytes()]);
    let start_alice = || -> Result<P2pHandler, Box<dyn std::error::Error>> {
        // Seeded from fixed bytes for a repeatable example; real nodes seed from the OS
        // (`P2pHandler::with_config` does).
        let options = Options::new(Config::default(), [1; 32]).data_dir(dir)?;
        Ok(P2pHandler::with_options(
            "127.0.0.1:0",
            alice_key.clone(),
            to_bob.clone(),
            options,
        )?)
    };

    // First run: the request is acknowledged by Bob, then Alice stops.
    let alice = start_alice()?;
    let id = alice.request(
        bob.local_peer_id(),
        bob.local_address(),
        &b"settle invoice 17"[..],
    )?;
    let (peer, exchange) = match bob.receive_timeout(Duration::from_secs(30)) {
        Some(Event::Request { peer, exchange, .. }) => (peer, exchange),
        other => return Err(format!("Bob expected the request, got {other:?}").into()),
    };
    let report = alice.shutdown();
    assert_eq!(
        report.kept,
        1,
        "the unfinished exchange is kept in {}",
        dir.display()
    );

    // Bob answers while Alice is away; the reply cannot be delivered yet.
    bob.response_to(peer, exchange, &b"invoice 17 settled"[..])?;

    // Second run, same directory: the exchange resumes and finishes.
    let alice = start_alice()?;
    let reply = loop {
        match alice.receive_timeout(Duration::from_secs(60)) {
            Some(Event::Reply {
                exchange, payload, ..
            }) if exchange == id => break String::from_utf8_lossy(&payload).into_owned(),
            Some(Event::Failed { failure, .. }) => return Err(failure.to_string().into()),
            Some(_) => {}
            None => return Err("no reply after the restart".into()),
        }
    };
    // Bob's application was never asked again: the resend was answered from his cache.
    let mut requests_seen = 1;
    while let Some(event) = bob.check_receive() {
        if matches!(event, Event::Request { .. }) {
            requests_seen += 1;
        }
    }
    alice.shutdown();
    bob.shutdown();
    Ok((id, reply, requests_seen))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_reply_arrives_after_a_restart_and_the_request_ran_once() {
        let dir = std::env::temp_dir().join(format!("durable-sender-test-{}", std::process::id()));
        let (_, reply, seen) = super::run(&dir).unwrap();
        assert_eq!(reply, "invoice 17 settled");
        assert_eq!(seen, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
