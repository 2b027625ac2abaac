//! Two nodes in one process, with the synchronous API: Bob answers, Alice asks.
//!
//! ```text
//! cargo run -p p2p-handler --example two_nodes
//! ```
//!
//! Each node is a `P2pHandler` on 127.0.0.1 (port 0: the system picks one) with a key of
//! its own and an allow list naming the other. Alice sends three requests; Bob's loop
//! answers each with the text in capitals; Alice prints the replies. Everything the
//! protocol needs (the Noise handshake, Acks, resends, the final Ack) happens inside the
//! handlers.

use std::time::Duration;

use p2p_handler::{AllowList, Event, Keypair, P2pHandler};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for line in run()? {
        println!("{line}");
    }
    Ok(())
}

/// Runs the exchange; returns what Alice received, one line per reply.
fn run() -> Result<Vec<String>, Box<dyn std::error::Error>> {
    // Keys from fixed bytes so the example is repeatable; real nodes use
    // `Keypair::from_file` on a key made by `p2p-node keygen`.
    let alice_key = Keypair::from_private_bytes([1; 32]);
    let bob_key = Keypair::from_private_bytes([2; 32]);
    // Each allows the other, by static public key.
    let bob = P2pHandler::new(
        "127.0.0.1:0",
        bob_key.clone(),
        AllowList::from_keys([*alice_key.public_bytes()]),
    )?;
    let alice = P2pHandler::new(
        "127.0.0.1:0",
        alice_key,
        AllowList::from_keys([*bob_key.public_bytes()]),
    )?;

    std::thread::scope(|scope| -> Result<Vec<String>, Box<dyn std::error::Error>> {
        // Bob's application: answer three requests, then stop.
        let server = scope.spawn(|| -> Result<(), p2p_handler::HandlerError> {
            let mut answered = 0;
            while answered < 3 {
                if let Some(Event::Request {
                    peer,
                    exchange,
                    payload,
                    ..
                }) = bob.receive_timeout(Duration::from_secs(10))
                {
                    let text = String::from_utf8_lossy(&payload).to_uppercase();
                    bob.response_to(peer, exchange, text.into_bytes())?;
                    answered += 1;
                }
            }
            Ok(())
        });

        // Alice's application: three requests, one outcome each.
        let mut replies = Vec::new();
        for word in ["hello", "from", "alice"] {
            let id = alice.request(bob.local_peer_id(), bob.local_address(), word.as_bytes())?;
            loop {
                match alice.receive_timeout(Duration::from_secs(30)) {
                    Some(Event::Reply {
                        exchange, payload, ..
                    }) if exchange == id => {
                        replies.push(format!("{word} -> {}", String::from_utf8_lossy(&payload)));
                        break;
                    }
                    Some(Event::Failed {
                        exchange, failure, ..
                    }) if exchange == id => {
                        return Err(format!("{word}: {failure}").into());
                    }
                    Some(_) => {}
                    None => return Err("no outcome within 30 s".into()),
                }
            }
        }
        server.join().map_err(|_| "Bob's thread panicked")??;
        Ok(replies)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn alice_gets_each_reply_in_capitals() {
        let replies = super::run().unwrap();
        assert_eq!(
            replies,
            ["hello -> HELLO", "from -> FROM", "alice -> ALICE"]
        );
    }
}
