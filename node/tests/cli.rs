//! The `p2p-node` program end to end: keygen, id, serve and send on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

#[path = "../../handler/tests/common/mod.rs"]
mod common;
mod support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use common::RawPeer;
use p2p_handler::Keypair;
use p2p_handler::wire::{AbortReason, AckOf, ExchangeId, Message};
use support::{Setup, failure, keygen, node, output};

#[test]
fn two_nodes_exchange_a_message_through_a_command() {
    let setup = Setup::new("basic");
    // keygen refuses to overwrite a key.
    assert!(
        !node()
            .args(["keygen", "--out"])
            .arg(setup.dir.join("bob.key"))
            .status()
            .unwrap()
            .success()
    );
    let (mut server, target) = setup.serve(&["--count", "1", "--exec", "tr a-z A-Z"]);
    assert!(
        target.starts_with(&setup.bob),
        "serve prints its peer id: {target}"
    );
    let reply = output(setup.send("alice", &target).arg("hello bob"));
    assert_eq!(reply, "HELLO BOB\n");
    assert!(
        server.0.wait().unwrap().success(),
        "serve --count 1 exits after one answer"
    );
}

#[test]
fn a_log_filter_with_an_unknown_word_or_a_thread_count_out_of_bounds_is_refused() {
    let setup = Setup::new("bad-values");
    // RUST_LOG=verbos would have turned every line off, silently.
    let err = failure(
        node()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--allow-any-peer-insecure",
                "--key",
            ])
            .arg(setup.dir.join("bob.key"))
            .env("RUST_LOG", "verbos"),
    );
    assert!(
        err.contains("invalid RUST_LOG \"verbos\"") && err.contains("is not a level"),
        "{err}"
    );
    for jobs in ["0", "1000000000000"] {
        let err = failure(
            node()
                .args(["serve", "--jobs", jobs, "--key"])
                .arg(setup.dir.join("bob.key")),
        );
        assert!(
            err.contains("--jobs") && err.contains("1 to 1024"),
            "{jobs}: {err}"
        );
    }
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let err = failure(node().args(["send", "--key", "/nonexistent.key", "--to", "nope", "x"]));
    assert!(err.contains("PEER_ID@HOST:PORT"), "{err}");
    // A listening address without its port names the input and the form expected.
    let dir = std::env::temp_dir().join(format!("p2p-node-listen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    keygen(&dir, "k.key");
    let err = failure(
        node()
            .args([
                "serve",
                "--listen",
                "127.0.0.1",
                "--allow-any-peer-insecure",
                "--key",
            ])
            .arg(dir.join("k.key")),
    );
    assert!(
        err.contains("bad address \"127.0.0.1\"") && err.contains("expected HOST:PORT"),
        "{err}"
    );
    // `--repeat 0` sends nothing rather than one; a response timeout under a second is no
    // time for a command to start. Both refused before anything runs.
    let err = failure(node().args([
        "send",
        "--key",
        "/nonexistent.key",
        "--to",
        "nope",
        "--repeat",
        "0",
        "x",
    ]));
    assert!(
        err.contains("--repeat") && err.contains("0 is not in 1.."),
        "{err}"
    );
    for bad in ["500ms", "0", "soon"] {
        let err = failure(
            node()
                .args([
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--allow-any-peer-insecure",
                ])
                .args(["--response-timeout", bad, "--key"])
                .arg(dir.join("k.key")),
        );
        assert!(
            err.contains("--response-timeout") && err.contains(bad),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_dead_peer_shows_the_handlers_cause_as_a_sentence() {
    let setup = Setup::new("dead");
    // A port nobody listens on any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target = format!("{}@127.0.0.1:{port}", setup.bob);
    // Dials that never reach the peer are retried for the whole exchange budget (about
    // 225 s with the defaults): a budget of about a second here.
    let config = setup.dir.join("quick.toml");
    std::fs::write(
        &config,
        "[handler]\nmax_attempts = 1\nconnect_timeout = \"200ms\"\nack_timeout = \"200ms\"\n\
         reply_timeout = \"400ms\"\nresponse_timeout = \"300ms\"\n",
    )
    .unwrap();
    let err = failure(
        setup
            .send("alice", &target)
            .arg("--config")
            .arg(&config)
            .arg("anyone?"),
    );
    assert!(
        err.contains("gave up after")
            && err.contains("attempts (last: could not connect")
            && err.contains("the peer never acknowledged it"),
        "{err}"
    );
    assert!(!err.contains("no reply within"), "{err}");
}

#[test]
fn exec_streams_large_requests_through_the_command() {
    let setup = Setup::new("large");
    let (_server, target) = setup.serve(&["--exec", "cat"]);
    for size in [1 << 20, 16 << 20] {
        // Within the default 16 MiB limit, newline included.
        let mut payload: Vec<u8> = (0..size - 1).map(|i| b'a' + (i % 26) as u8).collect();
        payload.push(b'\n');
        let file = setup.dir.join("payload");
        std::fs::write(&file, &payload).unwrap();
        let out = setup
            .send("alice", &target)
            .stdin(std::fs::File::open(&file).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == payload, "{size} bytes come back intact");
    }
}

#[test]
fn a_slow_command_for_one_peer_does_not_delay_another() {
    let setup = Setup::new("slow");
    let script = setup.gated_echo();
    let (_server, target) = setup.serve(&["--exec", &script]);
    let mut slow = setup
        .send("alice", &target)
        .arg("slow")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Carol's answer arrives while Alice's command is still held at the gate.
    let fast = output(setup.send("carol", &target).arg("fast"));
    assert_eq!(fast, "fast\n");
    assert!(
        slow.try_wait().unwrap().is_none(),
        "Alice's request is still running"
    );
    setup.open_gate();
    let out = slow.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "slow\n");
}

#[test]
fn a_command_past_the_response_timeout_is_killed_and_serving_goes_on() {
    let setup = Setup::new("timeout");
    let script = setup.gated_echo();
    // A duration like every other time option ("1" alone, whole seconds, still works).
    let (mut server, target) = setup.serve(&["--exec", &script, "--response-timeout", "1s"]);
    // The gate never opens: the command is killed, the dialer told.
    let err = failure(setup.send("alice", &target).arg("slow"));
    // A sentence, not Rust's Debug output.
    assert!(
        err.contains("the peer gave up after accepting it: its application did not answer in time"),
        "{err}"
    );
    assert!(!err.contains("Aborted("), "{err}");
    // The server is still there and answers others.
    assert_eq!(output(setup.send("carol", &target).arg("fast")), "fast\n");
    assert!(server.running(), "serve keeps running");
}

#[test]
fn a_reply_the_dialer_cannot_take_is_aborted_and_serving_goes_on() {
    let setup = Setup::new("too-large");
    let (mut server, target) = setup.serve(&[]);
    let addr = target.split_once('@').unwrap().1.parse().unwrap();
    // A dialer that accepts 4 bytes sends 11: the echo cannot go back.
    let alice = Keypair::from_file(setup.dir.join("alice.key")).unwrap();
    let mut peer = RawPeer::dial(addr, &alice, 4);
    let exchange = ExchangeId(1);
    peer.send(&Message::Request {
        exchange,
        attempt: 1,
        payload: bytes::Bytes::from_static(b"hello world"),
    });
    assert_eq!(
        peer.recv(),
        Some(Message::Ack {
            exchange,
            attempt: 1,
            of: AckOf::Request
        })
    );
    assert_eq!(
        peer.recv(),
        Some(Message::Abort {
            exchange,
            attempt: 1,
            reason: AbortReason::ReplyTooLarge
        })
    );
    drop(peer);
    assert!(server.running(), "serve keeps running");
    assert_eq!(output(setup.send("carol", &target).arg("next")), "next\n");
}

/// A serving node is killed (SIGKILL) in the middle of a burst from three peers, each
/// waiting for an answer to a request the node had acknowledged, and started again on the
/// same data directory and port. Every request gets exactly one reply, and the command
/// (the application) saw each request once, apart from the flagged redeliveries of the
/// three it had not answered when it died.
#[test]
fn a_node_killed_mid_burst_loses_nothing_and_repeats_nothing() {
    const CLIENTS: [&str; 3] = ["alice", "carol", "dave"];
    const EACH: usize = 6;
    let setup = Setup::new("sigkill");
    let dave = keygen(&setup.dir, "dave.key");
    let mut allow = std::fs::read_to_string(setup.dir.join("allow.toml")).unwrap();
    allow.push_str(&format!("[[peer]]\nid = \"{dave}\"\n"));
    std::fs::write(setup.dir.join("allow.toml"), allow).unwrap();
    let (log, arrived, gate) = (
        setup.dir.join("seen.log"),
        setup.dir.join("arrived"),
        setup.dir.join("gate"),
    );
    for fifo in [&arrived, &gate] {
        assert!(Command::new("mkfifo").arg(fifo).status().unwrap().success());
    }
    // Logs every request with its redelivery flag. A first delivery of request 3 reports
    // itself on `arrived`, then waits on `gate`: the node is killed while it waits.
    let exec = format!(
        "x=$(cat); echo \"$P2P_REDELIVERED $x\" >> '{log}'; \
         case \"$P2P_REDELIVERED $x\" in '0 '*-3) echo \"$x\" > '{arrived}'; read _ < '{gate}';; esac; \
         printf 're:%s' \"$x\"",
        log = log.display(),
        arrived = arrived.display(),
        gate = gate.display(),
    );
    let data = setup.dir.join("data");
    let data_arg = data.to_str().unwrap();
    let args = ["--exec", exec.as_str(), "--data-dir", data_arg];
    let (server, target) = setup.serve(&args);
    let listen = target.split('@').nth(1).unwrap().to_owned();
    let clients: Vec<_> = CLIENTS
        .iter()
        .map(|client| {
            let (setup_dir, target) = (setup.dir.clone(), target.clone());
            std::thread::spawn(move || {
                for i in 0..EACH {
                    let message = format!("{client}-{i}");
                    let out = node()
                        .args(["send", "--timeout", "60", "--to", &target])
                        .arg("--key")
                        .arg(setup_dir.join(format!("{client}.key")))
                        .arg(&message)
                        .output()
                        .unwrap();
                    assert!(
                        out.status.success(),
                        "{message}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    assert_eq!(
                        String::from_utf8_lossy(&out.stdout),
                        format!("re:{message}\n")
                    );
                }
            })
        })
        .collect();
    // Wait (on the FIFO, no clock) until each client's request 3 is with the command.
    let mut waiting = 0;
    while waiting < CLIENTS.len() {
        let mut lines = String::new();
        std::fs::File::open(&arrived)
            .unwrap()
            .read_to_string(&mut lines)
            .unwrap();
        waiting += lines.lines().count();
    }
    let mut server = server;
    server.0.kill().unwrap(); // SIGKILL
    server.0.wait().unwrap();
    let (_server, again) = setup.serve_on(&listen, &args);
    assert_eq!(again, target, "same node, same address");
    for client in clients {
        client.join().unwrap();
    }
    // Release the commands the killed node left waiting.
    let mut open_gate = std::fs::OpenOptions::new().write(true).open(&gate).unwrap();
    for _ in 0..CLIENTS.len() {
        writeln!(open_gate, "go").unwrap();
    }
    let log = std::fs::read_to_string(&log).unwrap();
    for client in CLIENTS {
        for i in 0..EACH {
            let message = format!("{client}-{i}");
            let fresh = log.lines().filter(|l| *l == format!("0 {message}")).count();
            let again = log.lines().filter(|l| *l == format!("1 {message}")).count();
            assert_eq!(fresh, 1, "{message} seen {fresh} times:\n{log}");
            let expected_again = usize::from(i == 3);
            assert_eq!(
                again, expected_again,
                "{message} redelivered {again} times:\n{log}"
            );
        }
    }
}

#[test]
fn a_data_directory_prints_an_earlier_requests_outcome_in_full_and_keys_prevent_resends() {
    let setup = Setup::new("resume");
    let script = setup.gated_echo();
    let (_server, target) = setup.serve(&["--exec", &script]);
    let data = setup.dir.join("alice-data");
    let send = |args: &[&str]| {
        let mut cmd = setup.send("alice", &target);
        cmd.arg("--data-dir").arg(&data).args(args);
        cmd
    };
    // The first run gives up waiting while Bob's command is held at the gate; its request
    // stays in the data directory, unfinished.
    let first = send(&["--timeout", "1", "--idempotency-key", "job-1", "slow one"])
        .output()
        .unwrap();
    assert!(!first.status.success());
    // The gate opens once Bob's command waits at it (it may only start when the next run
    // resumes the request, on a loaded machine).
    let gate = std::thread::scope(|s| {
        s.spawn(|| setup.open_gate());
        // Run again with the same key: the request is not made a second time; the first
        // is resumed and its reply printed.
        send(&["--idempotency-key", "job-1", "slow one"])
            .output()
            .unwrap()
    });
    let again = gate;
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert!(err.contains("resuming request"), "{err}");
    assert_eq!(String::from_utf8_lossy(&again.stdout), "slow one\n");
    // A run without a key after a run left an outcome behind prints that outcome in
    // full. (Here: a request made with --timeout 1 whose reply came after the run ended.)
    let left = send(&["--timeout", "1", "slow two"]).output().unwrap();
    assert!(!left.status.success());
    let next = std::thread::scope(|s| {
        s.spawn(|| setup.open_gate());
        send(&["fast"]).output().unwrap()
    });
    let err = String::from_utf8_lossy(&next.stderr);
    assert!(next.status.success(), "{err}");
    assert!(
        err.contains("earlier request: x") && err.contains("(9 bytes): slow two"),
        "{err}"
    );
    assert_eq!(String::from_utf8_lossy(&next.stdout), "fast\n");
}

#[test]
fn outcomes_collects_what_a_data_directory_holds_without_sending() {
    let setup = Setup::new("outcomes");
    let data = setup.dir.join("alice-data");
    let alice = Keypair::from_file(setup.dir.join("alice.key")).unwrap();
    let bob: p2p_handler::PeerId = setup.bob.parse().unwrap();
    // A durable node whose request fails (nobody at the address) and whose application
    // never reads the failure before it stops.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    runtime.block_on(async {
        let config = p2p_handler::Config {
            max_attempts: 1,
            connect_timeout: std::time::Duration::from_millis(100),
            ack_timeout: std::time::Duration::from_millis(100),
            reply_timeout: std::time::Duration::from_millis(200),
            response_timeout: std::time::Duration::from_millis(150),
            ..p2p_handler::Config::default()
        };
        let (handler, _inbox) = p2p_handler::Handler::spawn_with(
            p2p_handler::TcpTransport,
            "127.0.0.1:0".parse().unwrap(),
            alice.clone(),
            p2p_handler::AllowList::from_peers([bob]),
            p2p_handler::Options::new(config, [1; 32])
                .data_dir(&data)
                .unwrap(),
        )
        .await
        .unwrap();
        handler
            .request(bob, nobody, &b"lost cause"[..])
            .await
            .unwrap();
        while handler.status().await.unwrap().outbound_in_flight > 0 {
            tokio::task::yield_now().await;
        }
        handler.shutdown().await.unwrap();
    });
    drop(runtime);
    let outcomes = |extra: &[&str]| {
        let mut cmd = node();
        cmd.args(["outcomes", "--data-dir"])
            .arg(&data)
            .arg("--key")
            .arg(setup.dir.join("alice.key"))
            .args(extra);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (kept, note) = outcomes(&["--keep"]);
    assert!(
        kept.contains(&format!("to {bob} failed: gave up after"))
            && kept.contains("its request (10 bytes): lost cause"),
        "{kept}"
    );
    assert!(
        note.contains("1 outcome kept; 0 requests still unfinished"),
        "{note}"
    );
    let (collected, note) = outcomes(&[]);
    assert_eq!(collected, kept);
    assert!(note.contains("1 outcome collected"), "{note}");
    let (none, note) = outcomes(&[]);
    assert_eq!(none, "");
    assert!(note.contains("0 outcomes collected"), "{note}");
}

#[test]
fn check_lists_every_problem_serve_would_meet_and_passes_what_it_would_start() {
    let setup = Setup::new("check");
    let dir = &setup.dir;
    std::fs::write(dir.join("afile"), "").unwrap();
    std::fs::write(dir.join("broken.toml"), "[[peer]]\nid = \"not hex\"\n").unwrap();
    std::fs::write(
        dir.join("node.toml"),
        "key = \"bob.key\"\nallow = \"broken.toml\"\nlisten = \"127.0.0.1:0\"\n\
         data_dir = \"afile\"\nexec = \"no-such-program-here --x\"\n",
    )
    .unwrap();
    // Three problems, all listed by one run, each naming its input; nothing is bound.
    let err = failure(
        node()
            .args(["check", "--config"])
            .arg(dir.join("node.toml")),
    );
    for expected in [
        "allow:",
        "broken.toml",
        "line 2",
        "data_dir:",
        "afile",
        "not a directory",
        "\"no-such-program-here\" is not a command",
        "3 problems found",
    ] {
        assert!(err.contains(expected), "{expected:?} missing: {err}");
    }
    // `serve` refuses the same command and the same file at start, rather than starting
    // and refusing every request (or saying "File exists").
    let err = failure(
        node()
            .args(["serve", "--config"])
            .arg(dir.join("node.toml"))
            .args(["--allow", "allow.toml", "--data-dir", "data"])
            .current_dir(dir),
    );
    assert!(
        err.contains("\"no-such-program-here\" is not a command"),
        "{err}"
    );
    let err = failure(
        node()
            .args(["serve", "--config"])
            .arg(dir.join("node.toml"))
            .args(["--allow", "allow.toml", "--exec", "cat"])
            .current_dir(dir),
    );
    assert!(err.contains("afile: not a directory"), "{err}");
    // A shell command the shell cannot read is refused too; one it can is passed.
    let err = failure(
        node()
            .args(["check", "--config"])
            .arg(dir.join("node.toml"))
            .args([
                "--allow",
                "allow.toml",
                "--data-dir",
                "data",
                "--exec",
                "tr 'a-z",
            ])
            .current_dir(dir),
    );
    assert!(err.contains("the shell cannot read"), "{err}");
    // Fixed by flags (which override the file, as for serve): it passes, says what it
    // found, and creates nothing.
    let out = output(
        node()
            .args(["check", "--config"])
            .arg(dir.join("node.toml"))
            .args(["--allow", "allow.toml", "--data-dir", "data"])
            .args(["--exec", "x=$(cat); printf '%s' \"$x\" | tr a-z A-Z"])
            .current_dir(dir),
    );
    assert!(out.contains(&setup.bob), "{out}");
    assert!(out.contains("2 peers in force"), "{out}");
    assert!(out.contains("created at start"), "{out}");
    assert!(out.contains("serve` would start"), "{out}");
    assert!(
        !dir.join("data").exists(),
        "check created the data directory"
    );
}

#[test]
fn a_key_another_user_owns_is_named_with_both_users_and_the_fix() {
    // As a container does it: the key belongs to the user who ran keygen, mode 600, and
    // the node runs as another. Only root can play both users here.
    let me = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = me
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .is_some_and(|ids| ids.split_whitespace().next() == Some("0"));
    if !root || Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("not root, or no setpriv: cannot run the node as another user here");
        return;
    }
    let dir = std::env::temp_dir().join(format!("p2p-node-owner-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    keygen(&dir, "k.key");
    let err = failure(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_p2p-node"))
            .args(["check", "--allow-any-peer-insecure", "--key"])
            .arg(dir.join("k.key")),
    );
    assert!(
        err.contains("belongs to uid 0")
            && err.contains("runs as uid 65534")
            && err.contains("chown 65534"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_send_that_times_out_says_why_and_names_a_peer_that_speaks_another_protocol() {
    let setup = Setup::new("not-p2p");
    // Something that is not a node: it answers the handshake with an HTTP error and
    // hangs up, as a web server on the wrong port does.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten().take(64) {
            let mut stream = stream;
            let mut buf = [0u8; 512];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let err = failure(setup.send("alice", &format!("{}@{addr}", setup.bob)).args([
        "--timeout",
        "10",
        "hello?",
    ]));
    assert!(err.contains("no reply within 10s: "), "{err}");
    assert!(
        err.contains("the last: could not connect")
            && err.contains("the connection ended in the middle of a frame")
            && err.contains("is the other end a p2p-handler node?"),
        "{err}"
    );
    assert!(!err.contains("bytes remaining on stream"), "{err}");
}

#[test]
fn keygen_never_replaces_a_key_unasked_and_says_how_to() {
    let dir = std::env::temp_dir().join(format!("p2p-node-keygen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let first = keygen(&dir, "k.key");
    let err = failure(node().args(["keygen", "--out"]).arg(dir.join("k.key")));
    assert!(
        err.contains("k.key exists") && err.contains("--force"),
        "{err}"
    );
    let again = output(node().args(["id", "--key"]).arg(dir.join("k.key")));
    assert_eq!(again.trim(), first, "the key was replaced");
    let second = output(
        node()
            .args(["keygen", "--force", "--out"])
            .arg(dir.join("k.key")),
    );
    assert_ne!(second.trim(), first);
    std::fs::remove_dir_all(&dir).unwrap();
}
