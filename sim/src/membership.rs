//! Signed membership in the simulator: the committee, the documents a scenario makes, and
//! the invariants every run with a `[membership]` table checks.
//!
//! ```toml
//! [membership]
//! committee = 3            # governance keys 0..3 of the simulator's pool (of 8) govern
//! threshold = 2            # signatures needed
//! members = ["a", "b"]     # the genesis's members (default: every node)
//!
//! [[step]]
//! at = "1s"
//! do = "membership"        # hand a document to a node, as its operator would
//! node = "a"
//! members = ["a", "b", "c"]   # default: the previous document's
//! signers = [0, 2]            # pool indices (default: the first `threshold` of the
//!                             # committee that signs); keys 5..8 are outside any committee
//! committee = [1, 2, 3]       # a committee change (needs both thresholds)
//! threshold = 2
//! follows = 1                 # the epoch it follows (default: the newest made): a fork
//! replay = 1                  # or: hand over the document made for epoch 1 again
//! ```
//!
//! Every node starts from the genesis (its operator's file) at every start; a durable node
//! resumes the newest epoch it stored. Members' addresses are their simulated hosts', so
//! the nodes spread documents among themselves.
//!
//! Invariants (built in):
//! 1. A node applies only documents the committee signed: each applied epoch is a document
//!    the simulator made, and a chain of documents each carrying a threshold of its
//!    predecessor's committee leads to it from the one the node held.
//! 2. A node never goes backwards: each applied epoch is above the one it held (across
//!    restarts when durable).
//! 3. Convergence: once faults heal, every member of the newest document is at its epoch
//!    within `liveness` (the run goes on until then; unless two documents share the newest
//!    epoch, a fork, which nodes must never resolve by themselves).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use p2p_handler::Keypair;
use p2p_handler::membership::{
    Digest, Document, GovernanceKey, Member, Signed, check_genesis, check_successor,
};

pub use crate::scenario::{MembershipPlan, POOL};
use crate::scenario::{Scenario, Step};

/// The documents of one run and what each node holds.
pub(crate) struct Registry {
    keys: Vec<GovernanceKey>,
    genesis: Signed,
    /// Every document made, by epoch (several for a fork), in the order made.
    made: BTreeMap<u64, Vec<Signed>>,
    /// The newest valid document made (what a step follows by default).
    newest: Signed,
    /// Documents that carry a threshold of their predecessor's committee (the genesis, of
    /// its own), by digest.
    valid: BTreeMap<Digest, Signed>,
    /// What each node holds: (epoch, digest).
    held: Vec<(u64, Digest)>,
    rng: ChaCha20Rng,
    /// Each node's member entry (key and address).
    members: Vec<Member>,
    names: Vec<String>,
}

impl Registry {
    /// The committee and the genesis for `scenario`; `addrs` are the nodes' listening
    /// addresses.
    pub(crate) fn new(
        plan: &MembershipPlan,
        scenario: &Scenario,
        keys: &[Keypair],
        addrs: &[SocketAddr],
        seed: u64,
    ) -> Result<Self, String> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        rng.set_stream(0x6d65_6d62);
        let gov: Vec<GovernanceKey> = (0..POOL)
            .map(|_| GovernanceKey::generate(&mut rng))
            .collect();
        let names: Vec<String> = scenario.nodes.iter().map(|n| n.name.clone()).collect();
        let members: Vec<Member> = keys
            .iter()
            .zip(addrs)
            .zip(&names)
            .map(|((key, addr), name)| Member {
                key: *key.public_bytes(),
                name: Some(name.clone()),
                address: Some(*addr),
                allowed: Vec::new(),
                expires: None,
                record_key: scenario
                    .records
                    .is_some()
                    .then(|| p2p_handler::records::RecordSigner::new(key).record_key()),
            })
            .collect();
        let chosen: Vec<usize> = match &plan.members {
            Some(list) => list.iter().filter_map(|n| scenario.node_index(n)).collect(),
            None => (0..names.len()).collect(),
        };
        let doc = Document {
            network: "sim".into(),
            epoch: 1,
            previous: Digest::NONE,
            expires: None,
            threshold: plan.threshold,
            committee: gov[..plan.committee]
                .iter()
                .map(GovernanceKey::id)
                .collect(),
            members: chosen.iter().map(|&i| members[i].clone()).collect(),
        };
        let mut genesis = Signed::new(doc).map_err(|e| format!("[membership]: {e}"))?;
        for key in &gov[..usize::from(plan.threshold)] {
            genesis.sign(key, &mut rng);
        }
        let held = vec![(1, genesis.digest()); names.len()];
        let mut registry = Self {
            keys: gov,
            genesis: genesis.clone(),
            made: BTreeMap::new(),
            newest: genesis.clone(),
            valid: BTreeMap::new(),
            held,
            rng,
            members,
            names,
        };
        registry.record(genesis);
        Ok(registry)
    }

    /// The document every node's operator installed.
    pub(crate) fn genesis(&self) -> &Signed {
        &self.genesis
    }

    /// The newest valid document made.
    pub(crate) fn newest(&self) -> &Signed {
        &self.newest
    }

    fn record(&mut self, doc: Signed) {
        let valid = if doc.epoch() == 1 {
            check_genesis(&doc).is_empty()
        } else {
            self.valid
                .get(&doc.document().previous)
                .is_some_and(|parent| check_successor(parent, &doc).is_empty())
        };
        if valid {
            self.valid.insert(doc.digest(), doc.clone());
        }
        self.made.entry(doc.epoch()).or_default().push(doc);
    }

    /// The document a `membership` step hands over: made as it says, or replayed.
    pub(crate) fn make(&mut self, step: &Step, scenario: &Scenario) -> Result<Signed, String> {
        if let Some(epoch) = step.replay {
            return self
                .made
                .get(&epoch)
                .and_then(|docs| docs.first())
                .cloned()
                .ok_or_else(|| format!("replay = {epoch}: no document was made for it"));
        }
        let parent = match step.follows {
            // The valid document of that epoch, if one was made (else the first made).
            Some(epoch) => self
                .made
                .get(&epoch)
                .and_then(|docs| {
                    docs.iter()
                        .find(|d| self.valid.contains_key(&d.digest()))
                        .or(docs.first())
                })
                .cloned()
                .ok_or_else(|| format!("follows = {epoch}: no document was made for it"))?,
            None => self.newest.clone(),
        };
        let mut doc = parent.document().successor_template();
        doc.members = match &step.members {
            Some(names) => names
                .iter()
                .filter_map(|n| scenario.node_index(n))
                .map(|i| self.members[i].clone())
                .collect(),
            None => parent.document().members.clone(),
        };
        if let Some(committee) = &step.committee {
            doc.committee = committee
                .iter()
                .map(|&i| {
                    self.keys
                        .get(i)
                        .map(GovernanceKey::id)
                        .ok_or_else(|| format!("committee: key {i} is outside the pool of {POOL}"))
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(threshold) = step.threshold {
            doc.threshold = threshold;
        }
        let mut signed = Signed::new(doc).map_err(|e| format!("membership step: {e}"))?;
        let default_signers: Vec<usize> = parent
            .document()
            .committee
            .iter()
            .take(usize::from(parent.document().threshold))
            .filter_map(|id| self.keys.iter().position(|k| k.id() == *id))
            .collect();
        for i in step.signers.clone().unwrap_or(default_signers) {
            let key = self
                .keys
                .get(i)
                .ok_or_else(|| format!("signers: key {i} is outside the pool of {POOL}"))?;
            signed.sign(key, &mut self.rng);
        }
        self.record(signed.clone());
        // The default parent of the next step: the newest valid document (a refused one
        // leads nowhere; a fork's second branch does not replace the first).
        if self.valid.contains_key(&signed.digest()) && signed.epoch() > self.newest.epoch() {
            self.newest = signed.clone();
        }
        Ok(signed)
    }

    /// Node `node` reports it applied `epoch` (`digest`). Returns what breaks invariants 1
    /// and 2, if anything.
    pub(crate) fn on_applied(&mut self, node: usize, epoch: u64, digest: Digest) -> Vec<String> {
        let mut broken = Vec::new();
        let name = &self.names[node];
        let (held_epoch, held_digest) = self.held[node];
        if epoch <= held_epoch {
            broken.push(format!(
                "membership: {name} went from epoch {held_epoch} back to epoch {epoch}"
            ));
        }
        // Walk back from the applied document to the one held, each link valid.
        let mut at = self.valid.get(&digest);
        let mut reached = false;
        while let Some(doc) = at {
            if doc.epoch() == held_epoch {
                reached = doc.digest() == held_digest;
                break;
            }
            at = self.valid.get(&doc.document().previous);
        }
        if !self.valid.contains_key(&digest) {
            broken.push(format!(
                "membership: {name} applied epoch {epoch} ({}), which no threshold of the \
                 committee signed",
                digest.short()
            ));
        } else if !reached && epoch > held_epoch {
            broken.push(format!(
                "membership: {name} applied epoch {epoch} ({}), which does not follow the \
                 epoch {held_epoch} ({}) it held",
                digest.short(),
                held_digest.short()
            ));
        }
        self.held[node] = (epoch, digest);
        broken
    }

    /// A node starts again: from the genesis unless its disk kept a later epoch.
    pub(crate) fn on_start(&mut self, node: usize, durable: bool) {
        if !durable {
            self.held[node] = (1, self.genesis.digest());
        }
    }

    /// The epoch every member of the newest document must reach, and its digest, unless
    /// two valid documents share the newest epoch (a fork: nothing to converge on).
    pub(crate) fn target(&self) -> Option<&Signed> {
        let (_, docs) = self.valid.values().map(|d| (d.epoch(), d)).fold(
            None::<(u64, Vec<&Signed>)>,
            |acc, (e, d)| match acc {
                Some((best, mut v)) if best == e => {
                    v.push(d);
                    Some((best, v))
                }
                Some((best, v)) if best > e => Some((best, v)),
                _ => Some((e, vec![d])),
            },
        )?;
        match docs.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// The members of the target document (by node index) not at its epoch, of those up.
    pub(crate) fn behind(&self, up: &[bool]) -> Vec<usize> {
        let Some(target) = self.target() else {
            return Vec::new();
        };
        let digest = target.digest();
        (0..self.names.len())
            .filter(|&i| up[i])
            .filter(|&i| target.document().member(&self.member_id(i)).is_some())
            .filter(|&i| self.held[i].1 != digest)
            .collect()
    }

    fn member_id(&self, node: usize) -> p2p_handler::PeerId {
        self.members[node].peer_id()
    }

    /// What `node` holds.
    pub(crate) fn held(&self, node: usize) -> (u64, Digest) {
        self.held[node]
    }
}
