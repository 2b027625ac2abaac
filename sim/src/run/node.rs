//! A node: the handler on its turmoil host, the commands the simulator sends it, and its
//! graceful stop.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use p2p_handler::endpoint::Failure;
use p2p_handler::{
    AllowList, AllowedPeer, Event, Handler, Inbox, Keypair, Notice, Options, PeerId, Status,
};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot};

use super::PORT;
use super::app::{on_event, on_notice};
use super::disk::SimStore;
use super::tap::SimTap;
use super::world::{Shared, lock, now};
use crate::scenario::App;
use crate::trace::What;
use crate::transport::TurmoilTransport;

pub(super) enum NodeCommand {
    Request {
        to: PeerId,
        /// `None`: by peer id alone (`request_to`), the address from records.
        addr: Option<SocketAddr>,
        payload: Bytes,
        deadline: Option<Duration>,
    },
    /// Refuse the oldest request pending from `peer` (step `step`).
    Reject {
        peer: PeerId,
        step: usize,
    },
    /// Cancel our exchange `exchange` (step `step`), labelled `label` in the trace.
    Cancel {
        exchange: p2p_handler::wire::ExchangeId,
        label: String,
        step: usize,
    },
    /// Records as the node's records directory would hand them over.
    OfferRecords {
        records: Vec<Bytes>,
    },
    Respond {
        peer: PeerId,
        step: usize,
    },
    /// Allow the peer whose static key this is (nodes of one network know each other's
    /// keys, so they dial each other with IK).
    Allow {
        key: [u8; 32],
    },
    Revoke {
        peer: PeerId,
    },
    SetAllowList {
        keys: Vec<[u8; 32]>,
    },
    OfferMembership {
        document: Box<p2p_handler::membership::Signed>,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    /// A graceful stop: drain, let started work finish within `grace`, shut down.
    Stop {
        grace: Duration,
    },
}

/// A node's host: starts the handler as the scenario configures this node, then serves the
/// simulator's commands and hands the handler's events to the application until a stop.
pub(super) async fn node_main(shared: Arc<Mutex<Shared>>, node: usize) -> turmoil::Result {
    let (tx, mut commands) = mpsc::unbounded_channel();
    let start = Start::new(&shared, node);
    let transport = TurmoilTransport::new();
    lock(&shared).nodes[node].crash_switch = Some(transport.crashing());
    let (handler, mut inbox) = Handler::spawn_with(
        transport,
        start.listen,
        start.key,
        start.allow,
        start.options,
    )
    .await
    .map_err(|e| e.to_string())?;
    let app = start.app;
    // Listening: from now on the simulator may send this node commands.
    lock(&shared).nodes[node].commands = Some(tx);
    loop {
        tokio::select! {
            biased;
            command = commands.recv() => match command {
                Some(NodeCommand::Stop { grace }) => {
                    let node = Node { shared: &shared, index: node, handler: &handler, app: &app };
                    return stop(node, &mut commands, &mut inbox, grace).await;
                }
                Some(NodeCommand::Status { reply }) => {
                    // Everything the handler said before this status is read first: a run
                    // that ends on it has seen every event of the nodes that report.
                    let status = handler.status().await;
                    let node = Node { shared: &shared, index: node, handler: &handler, app: &app };
                    read_inbox(node, &mut inbox);
                    if let Ok(status) = status {
                        let _ = reply.send(status);
                    }
                }
                Some(command) => run_command(&shared, node, &handler, command).await,
                None => break,
            },
            event = inbox.received.recv() => match event {
                Some(event) => on_event(&shared, node, &handler, &app, event),
                // The handler stopped on its own (its store failed): the process exits,
                // as p2p-node's does, and the simulator carries that out as a crash.
                None => {
                    {
                        let mut s = lock(&shared);
                        let incarnation = s.nodes[node].incarnation;
                        s.exits.push_back((node, incarnation));
                    }
                    std::future::pending::<()>().await;
                }
            },
            Some(notice) = inbox.priority.recv() => on_notice(&shared, node, notice),
        }
    }
    Ok(())
}

/// What a node starts its handler with, in this incarnation.
struct Start {
    key: Keypair,
    allow: AllowList,
    app: App,
    listen: SocketAddr,
    options: Options,
}

impl Start {
    /// Counts the new incarnation (the node is up from here) and derives everything the
    /// handler needs from the scenario and the seed.
    fn new(shared: &Arc<Mutex<Shared>>, node: usize) -> Self {
        let mut s = lock(shared);
        let durable = s.scenario.durable_of(node);
        // Requests the last incarnation's application held are gone with it (a durable
        // node's come again, flagged redelivered).
        s.pending.retain(|(n, _), _| *n != node);
        {
            let inc = s.incarnation_key(node);
            let s = &mut *s;
            let outcomes = &s.outcomes;
            s.model
                .started(node, |id| outcomes.contains_key(&(node, inc, id)));
        }
        let state = &mut s.nodes[node];
        state.incarnation += 1;
        state.up = true;
        state.received = 0;
        state.requests_seen = 0;
        state.copies = Default::default();
        state.membership_applied = 0;
        let incarnation = state.incarnation;
        // Restarted: the operator made room on the disk.
        state
            .disk_full
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let store = durable.then(|| SimStore::for_node(&mut s, node, incarnation));
        let mut rng = ChaCha20Rng::seed_from_u64(s.seed);
        rng.set_stream(1 + node as u64 * 1000 + incarnation);
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let allow = allow_list(&s, node);
        let app = s.scenario.nodes[node].app.clone();
        let config = s.scenario.config_of(node);
        let sabotage = s.scenario.sabotage;
        // Its own stream of the run's seed per node and incarnation.
        let buggify = s.scenario.buggify.then(|| {
            (s.seed ^ 0x4255_4747)
                .wrapping_add((node as u64) << 32 | incarnation)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        });
        s.push(node, What::Start);
        let genesis = s.membership.as_mut().map(|m| {
            m.on_start(node, durable);
            m.genesis().clone()
        });
        let records = s.records.as_mut().map(|r| {
            r.on_start(node, durable);
            (r.listen_addr(node), r.ttl)
        });
        let key = s.keys[node].clone();
        drop(s);
        let tap = Arc::new(SimTap {
            shared: shared.clone(),
            node,
        });
        let port = records.map_or(PORT, |(addr, _)| addr.port());
        // The wall clock is virtual too: a fixed epoch plus simulated time, so stored
        // deadlines replay identically.
        let wall: p2p_handler::WallClock =
            Arc::new(|| std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + now());
        let mut options = Options::new(config, seed)
            .incarnation(incarnation)
            .tap(tap)
            .wall_clock(wall);
        options.sabotage = sabotage;
        options.buggify = buggify;
        if let Some(genesis) = genesis {
            options = options.membership(genesis);
        }
        if let Some((addr, ttl)) = records {
            // No directory: members find each other from the document's first addresses
            // and pass records on among themselves.
            options = options.records(p2p_handler::records::RecordOptions {
                addresses: vec![addr],
                ttl,
                ..Default::default()
            });
        }
        if let Some(store) = store {
            options = options.store(store);
        }
        Self {
            key,
            allow,
            app,
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            options,
        }
    }
}

/// The node's allow list: the nodes it names, or every other node.
fn allow_list(s: &Shared, node: usize) -> AllowList {
    let spec = &s.scenario.nodes[node];
    let allowed: Vec<[u8; 32]> = match &spec.allow {
        Some(names) => names
            .iter()
            .filter_map(|n| s.scenario.node_index(n))
            .map(|i| *s.keys[i].public_bytes())
            .collect(),
        None => s
            .keys
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != node)
            .map(|(_, k)| *k.public_bytes())
            .collect(),
    };
    // Members of one network know each other's keys: they dial each other with IK.
    if spec.know_keys {
        AllowList::from_keys(allowed)
    } else {
        AllowList::from_peers(allowed.iter().map(p2p_handler::PeerId::from_public_key))
    }
}

/// How long a `stop` step lets started work finish when it names no grace.
pub(super) const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// What a node's loop works with.
#[derive(Clone, Copy)]
pub(super) struct Node<'a> {
    pub(super) shared: &'a Arc<Mutex<Shared>>,
    pub(super) index: usize,
    pub(super) handler: &'a Handler,
    pub(super) app: &'a App,
}

/// Hands the application everything waiting in its inbox, events then notices.
fn read_inbox(node: Node<'_>, inbox: &mut Inbox) {
    let Node {
        shared,
        index,
        handler,
        app,
    } = node;
    while let Ok(event) = inbox.received.try_recv() {
        on_event(shared, index, handler, app, event);
    }
    while let Ok(notice) = inbox.priority.try_recv() {
        on_notice(shared, index, notice);
    }
}

/// A graceful stop, as `p2p-node` does on SIGTERM: drain (new work is refused, started work
/// goes on, and the application goes on answering and taking steps), wait until nothing is
/// left or `grace` ran out, shut down. The application then reads what is left in its
/// inbox; our exchanges the shutdown failed come back in its report and count as their
/// outcomes. The node is down until a `restart`.
pub(super) async fn stop(
    node: Node<'_>,
    commands: &mut mpsc::UnboundedReceiver<NodeCommand>,
    inbox: &mut Inbox,
    grace: Duration,
) -> turmoil::Result {
    let Node {
        shared,
        index,
        handler,
        app,
    } = node;
    let _ = handler.drain().await;
    let deadline = tokio::time::Instant::now() + grace;
    // Checked after each input, and every 10 ms of virtual time when none comes.
    while !handler.status().await.is_ok_and(|status| status.drained) {
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(deadline) => break,
            Some(command) = commands.recv() => {
                // A second stop while stopping changes nothing.
                if !matches!(command, NodeCommand::Stop { .. }) {
                    run_command(shared, index, handler, command).await;
                }
            }
            Some(event) = inbox.received.recv() => on_event(shared, index, handler, app, event),
            Some(notice) = inbox.priority.recv() => on_notice(shared, index, notice),
            () = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    let report = handler.shutdown().await.map_err(|e| e.to_string())?;
    read_inbox(node, inbox);
    for (peer, exchange, payload) in report.failed {
        let failed = Event::Failed {
            peer,
            exchange,
            payload,
            failure: Failure::ShuttingDown,
            redelivered: false,
        };
        on_notice(shared, index, Notice::Event(failed));
    }
    let mut s = lock(shared);
    let durable = s.scenario.durable_of(index);
    if !durable {
        let incarnation = s.incarnation_key(index);
        s.stopped.insert((index, incarnation));
    }
    let state = &mut s.nodes[index];
    state.up = false;
    state.commands = None;
    state.crash_switch = None;
    let unanswered = if durable {
        "kept for the next start"
    } else {
        "aborted"
    };
    s.push(
        index,
        What::App(format!(
            "stopped: {} unanswered request(s) {unanswered}, {} exchange(s) of ours kept",
            report.unanswered_requests, report.kept
        )),
    );
    Ok(())
}

pub(super) async fn run_command(
    shared: &Arc<Mutex<Shared>>,
    node: usize,
    handler: &Handler,
    command: NodeCommand,
) {
    match command {
        NodeCommand::Request {
            to,
            addr,
            payload,
            deadline,
        } => {
            let len = payload.len();
            let probe = payload == crate::swarm::PROBE.as_bytes();
            let options = match deadline {
                Some(within) => p2p_handler::RequestOptions::new().deadline(within),
                None => p2p_handler::RequestOptions::new(),
            };
            let result = match addr {
                Some(addr) => handler.request_with(to, addr, payload, options).await,
                None => handler.request_to_with(to, payload, options).await,
            };
            let mut s = lock(shared);
            let to_name = s.name(&to);
            match result {
                Ok(id) => {
                    if probe {
                        s.probes.insert((node, id));
                    }
                    let label = s.label_or_assign(node, id);
                    let incarnation = s.incarnation_key(node);
                    s.outcomes.insert((node, incarnation, id), 0);
                    s.push(
                        node,
                        What::App(format!("request {label} to {to_name} ({len} B)")),
                    );
                }
                Err(e) => {
                    let why = format!("request to {to_name} refused: {e}");
                    let who = s.names[node].clone();
                    s.refused.push(format!("{who}: {why}"));
                    s.push(node, What::App(why));
                }
            }
        }
        command @ (NodeCommand::Respond { .. }
        | NodeCommand::Reject { .. }
        | NodeCommand::Cancel { .. }) => settle_by_hand(shared, node, handler, command).await,
        command @ (NodeCommand::Allow { .. }
        | NodeCommand::Revoke { .. }
        | NodeCommand::SetAllowList { .. }) => {
            change_allow_list(shared, node, handler, command).await
        }
        NodeCommand::Status { reply } => {
            if let Ok(status) = handler.status().await {
                let _ = reply.send(status);
            }
        }
        NodeCommand::OfferMembership { document } => {
            let text = offer_membership(handler, *document).await;
            lock(shared).push(node, What::App(text));
        }
        NodeCommand::OfferRecords { records } => {
            let count = records.len();
            let text = match handler.offer_records(records).await {
                Ok(taken) => format!("offered {count} record(s) as its directory: {taken} taken"),
                Err(e) => format!("offered {count} record(s): {e}"),
            };
            lock(shared).push(node, What::App(text));
        }
        // Handled by the node's loop, which ends with it.
        NodeCommand::Stop { .. } => {}
    }
}

/// `allow`, `revoke` and `allow_list`: the node's allow list changed at runtime (the model
/// hears who is revoked and who allowed again).
async fn change_allow_list(
    shared: &Arc<Mutex<Shared>>,
    node: usize,
    handler: &Handler,
    command: NodeCommand,
) {
    match command {
        NodeCommand::Allow { key } => {
            let entry = AllowedPeer {
                public_key: Some(key),
                ..AllowedPeer::default()
            };
            let peer = p2p_handler::PeerId::from_public_key(&key);
            // The model hears first: the handler may take the peer's connection before
            // this task runs again.
            let other = lock(shared).by_peer.get(&peer).copied();
            let was = other.map(|o| lock(shared).model.allowed(node, o));
            if handler.allow(peer, entry).await.is_err()
                && let (Some(other), Some(was)) = (other, was)
            {
                lock(shared).model.still_revoked(node, other, was);
            }
        }
        NodeCommand::Revoke { peer } => {
            if let Ok(true) = handler.revoke(peer).await {
                let mut s = lock(shared);
                if let Some(other) = s.by_peer.get(&peer).copied() {
                    s.model.revoked(node, other, now());
                }
            }
        }
        NodeCommand::SetAllowList { keys } => {
            let listed: Vec<PeerId> = keys.iter().map(PeerId::from_public_key).collect();
            // The listed peers are allowed before the handler is told (it may take their
            // connections before this task runs again), the removed ones revoked after.
            let was: Vec<(usize, Option<(Duration, bool)>)> = {
                let mut s = lock(shared);
                let others: Vec<usize> = listed
                    .iter()
                    .filter_map(|p| s.by_peer.get(p).copied())
                    .collect();
                others
                    .into_iter()
                    .map(|other| (other, s.model.allowed(node, other)))
                    .collect()
            };
            let result = handler.set_allow_list(AllowList::from_keys(keys)).await;
            if result.is_err() {
                let mut s = lock(shared);
                for (other, was) in was {
                    s.model.still_revoked(node, other, was);
                }
            }
            if let Ok(removed) = result {
                let mut s = lock(shared);
                for peer in &removed {
                    if let Some(other) = s.by_peer.get(peer).copied() {
                        s.model.revoked(node, other, now());
                    }
                }
                let names: Vec<String> = removed.iter().map(|p| s.name(p)).collect();
                if !names.is_empty() {
                    s.push(
                        node,
                        What::App(format!("allow list removed {}", names.join(", "))),
                    );
                }
            }
        }
        _ => {}
    }
}

/// `respond`, `reject` and `cancel`: the application ends an exchange by hand. One that
/// finds nothing to act on is an idle step.
async fn settle_by_hand(
    shared: &Arc<Mutex<Shared>>,
    node: usize,
    handler: &Handler,
    command: NodeCommand,
) {
    match command {
        NodeCommand::Respond { peer, step } => {
            let result = handler
                .response(peer, Bytes::from_static(b"manual reply"))
                .await;
            let mut s = lock(shared);
            let text = match result {
                Ok(id) => {
                    s.answered.insert((node, peer, id));
                    s.settle_pending(node, peer, id);
                    format!("respond to {}", s.inbound_label(node, &peer, id))
                }
                Err(e) => {
                    let why = format!("respond to {}: {e}", s.name(&peer));
                    s.did_nothing(step, why)
                }
            };
            s.push(node, What::App(text));
        }
        NodeCommand::Reject { peer, step } => {
            let oldest = lock(shared).oldest_pending(node, peer);
            let result = match oldest {
                Some(id) => handler
                    .reject(peer, id)
                    .await
                    .map(|()| id)
                    .map_err(|e| e.to_string()),
                None => Err("nothing pending".to_owned()),
            };
            let mut s = lock(shared);
            let text = match result {
                Ok(id) => {
                    s.settle_pending(node, peer, id);
                    format!("reject {}", s.inbound_label(node, &peer, id))
                }
                Err(e) => {
                    let why = format!("reject a request from {}: {e}", s.name(&peer));
                    s.did_nothing(step, why)
                }
            };
            s.push(node, What::App(text));
        }
        NodeCommand::Cancel {
            exchange,
            label,
            step,
        } => {
            let result = handler.cancel(exchange).await;
            let mut s = lock(shared);
            let text = match result {
                Ok(true) => format!("cancel {label}"),
                Ok(false) => s.did_nothing(step, format!("cancel {label}: already finished")),
                Err(e) => format!("cancel {label}: {e}"),
            };
            s.push(node, What::App(text));
        }
        _ => {}
    }
}

/// Hands a document to the handler as its operator would; what came of it, for the trace.
async fn offer_membership(handler: &Handler, document: p2p_handler::membership::Signed) -> String {
    let epoch = document.epoch();
    match handler.offer_membership(document).await {
        Ok(applied) if applied.is_empty() => format!("membership epoch {epoch}: held already"),
        Ok(_) => format!("membership epoch {epoch} offered: accepted"),
        Err(p2p_handler::HandlerError::MembershipRefused(refused)) => format!(
            "membership epoch {epoch} offered: refused ({})",
            refused
                .reasons
                .iter()
                .map(|r| r.code())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Err(e) => format!("membership epoch {epoch} offered: {e}"),
    }
}

/// Sends a status request to every running node.
pub(super) fn request_statuses(
    shared: &Arc<Mutex<Shared>>,
) -> Vec<Option<oneshot::Receiver<Status>>> {
    let s = lock(shared);
    s.nodes
        .iter()
        .map(|n| {
            let tx = n.commands.as_ref().filter(|_| n.up)?;
            let (reply, rx) = oneshot::channel();
            tx.send(NodeCommand::Status { reply }).ok()?;
            Some(rx)
        })
        .collect()
}

/// Asks every running node for its status, stepping the simulation until they answer.
pub(super) fn collect_statuses(
    sim: &mut turmoil::Sim<'_>,
    shared: &Arc<Mutex<Shared>>,
) -> Vec<Option<Status>> {
    let mut receivers = request_statuses(shared);
    let mut statuses: Vec<Option<Status>> = vec![None; receivers.len()];
    for _ in 0..10_000 {
        for (i, rx) in receivers.iter_mut().enumerate() {
            if let Some(r) = rx
                && let Ok(status) = r.try_recv()
            {
                statuses[i] = Some(status);
                *rx = None;
            }
        }
        if receivers.iter().all(Option::is_none) || sim.step().is_err() {
            break;
        }
    }
    statuses
}
