//! What one node holds of the chain, and the rules by which it moves forward.
//!
//! ```text
//!                 offer(chain)                      per document, in order:
//!   ┌────────────┐ ─────────────> ┌──────────────┐  epoch <= ours: same digest, skip;
//!   │ epoch N    │                │ verify each  │    another one validly signed: Fork
//!   │ (history:  │ <───────────── │ against the  │    (alarm, ours kept); else refused
//!   │  N-h .. N) │  applied: the  │ one before   │  epoch  > N+1: Gap (ask for the rest)
//!   └────────────┘  longest valid └──────────────┘  epoch == N+1: previous, network,
//!                   prefix whose last is unexpired    signatures, or refused
//! ```
//!
//! The ledger never moves backwards and never skips: the only way from epoch N to N+1 is a
//! document that names N's digest and carries a threshold of N's committee.

use std::collections::VecDeque;
use std::fmt;

use super::verify::{check_expiry, check_genesis, check_signatures, check_successor};
use super::{Digest, Refusal, Signed};

/// Copies refused for good (document and signatures), remembered so that a peer repeating
/// one costs no signature checks and no second report. By copy, not by document: the same
/// document with more signatures may well pass.
const REFUSED_MEMORY: usize = 64;
/// Forks remembered (each raises its alarm once).
const FORK_MEMORY: usize = 16;

/// A threshold of a committee signed two different documents for one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fork {
    /// The epoch.
    pub epoch: u64,
    /// The document this node holds for it (and keeps).
    pub ours: Digest,
    /// The other one (refused).
    pub theirs: Digest,
}

impl fmt::Display for Fork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fork at epoch {}: this node holds {}, a validly signed {} exists too",
            self.epoch, self.ours, self.theirs
        )
    }
}

/// A document refused, with every reason found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Its epoch.
    pub epoch: u64,
    /// Its digest.
    pub digest: Digest,
    /// Why (never empty).
    pub reasons: Vec<Refusal>,
}

impl Refused {
    /// The first reason: what metrics count it under.
    pub fn reason(&self) -> Option<&Refusal> {
        self.reasons.first()
    }

    /// Whether the refusal is final for this document (see [`Refusal::may_pass_later`]).
    pub fn is_final(&self) -> bool {
        !self.reasons.iter().any(Refusal::may_pass_later)
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "epoch {} ({}) refused: ",
            self.epoch,
            self.digest.short()
        )?;
        for (i, reason) in self.reasons.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{reason}")?;
        }
        Ok(())
    }
}

/// What an offer did.
#[derive(Debug, Clone, Default)]
pub struct Offered {
    /// The documents accepted, oldest first; the last is the new current one.
    pub applied: Vec<Signed>,
    /// The first document refused, if any, unless it was refused before for good (a
    /// refusal is reported once).
    pub refused: Option<Refused>,
    /// A fork found, the first time it is found.
    pub fork: Option<Fork>,
    /// The chain skipped ahead: the first epoch the node lacks, to ask its peers for.
    pub wanted: Option<u64>,
}

/// The chain one node holds: its current document and up to `max_history` before it.
#[derive(Debug, Clone)]
pub struct Ledger {
    /// Consecutive epochs, oldest first; never empty; the last is current.
    history: VecDeque<Signed>,
    max_history: usize,
    refused: VecDeque<[u8; 32]>,
    forks: VecDeque<Fork>,
}

impl Ledger {
    /// A ledger that trusts `anchor`, the document the operator installed. A genesis must
    /// carry a threshold of its own committee's signatures; a later epoch cannot be checked
    /// without the one before it and is trusted as installed. Either must not have expired
    /// at `now` (Unix seconds).
    pub fn with_anchor(anchor: Signed, now: u64, max_history: usize) -> Result<Self, Refused> {
        let mut reasons = if anchor.epoch() == 1 {
            check_genesis(&anchor)
        } else {
            Vec::new()
        };
        reasons.extend(check_expiry(anchor.document(), now));
        if !reasons.is_empty() {
            return Err(Refused {
                epoch: anchor.epoch(),
                digest: anchor.digest(),
                reasons,
            });
        }
        Ok(Self::starting_at(anchor, max_history))
    }

    /// The ledger a node kept (its stored documents, any order): the oldest is trusted as
    /// it was when stored, each later one must follow it. Expiry is not checked: these
    /// documents were accepted when they were newest. An error names the first document
    /// that does not follow (a damaged or edited store).
    pub fn restore(mut stored: Vec<Signed>, max_history: usize) -> Result<Option<Self>, Refused> {
        stored.sort_by_key(Signed::epoch);
        let mut docs = stored.into_iter();
        let Some(anchor) = docs.next() else {
            return Ok(None);
        };
        let mut ledger = Self::starting_at(anchor, max_history);
        for doc in docs {
            let reasons = check_successor(ledger.current(), &doc);
            if !reasons.is_empty() {
                return Err(Refused {
                    epoch: doc.epoch(),
                    digest: doc.digest(),
                    reasons,
                });
            }
            ledger.push(doc);
        }
        Ok(Some(ledger))
    }

    /// A ledger at `doc`, trusted without any check (`verify` uses it to ask what a node
    /// at `doc` would do).
    pub fn trusting(doc: Signed, max_history: usize) -> Self {
        Self::starting_at(doc, max_history)
    }

    fn starting_at(anchor: Signed, max_history: usize) -> Self {
        Self {
            history: VecDeque::from([anchor]),
            max_history: max_history.max(1),
            refused: VecDeque::new(),
            forks: VecDeque::new(),
        }
    }

    /// The document in force.
    pub fn current(&self) -> &Signed {
        // Never empty: built with one document, and trimming keeps the last.
        &self.history[self.history.len() - 1]
    }

    /// The epoch in force.
    pub fn epoch(&self) -> u64 {
        self.current().epoch()
    }

    /// The digest of the document in force.
    pub fn digest(&self) -> Digest {
        self.current().digest()
    }

    /// The document held for `epoch`, if it is within the history.
    pub fn get(&self, epoch: u64) -> Option<&Signed> {
        let oldest = self.history.front()?.epoch();
        let index = usize::try_from(epoch.checked_sub(oldest)?).ok()?;
        self.history.get(index)
    }

    /// Every document held, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &Signed> {
        self.history.iter()
    }

    /// The forks found, oldest first.
    pub fn forks(&self) -> impl Iterator<Item = &Fork> {
        self.forks.iter()
    }

    /// What to send a peer at epoch `after`: the documents from `after + 1` on, as many as
    /// fit in `max_bytes` of encoding. Empty if the history does not reach back to
    /// `after + 1` (the peer must ask another) or the first does not fit.
    pub fn chain_after(&self, after: u64, max_bytes: usize) -> Vec<Signed> {
        let Some(first) = after.checked_add(1).and_then(|e| self.get(e)) else {
            return Vec::new();
        };
        let mut chain = Vec::new();
        let mut bytes = 0usize;
        for doc in self
            .history
            .iter()
            .skip_while(|d| d.epoch() < first.epoch())
        {
            bytes = bytes.saturating_add(doc.encode().len());
            if bytes > max_bytes {
                break;
            }
            chain.push(doc.clone());
        }
        chain
    }

    /// Offers documents, oldest first (one, or a chain from a peer). Each must follow the
    /// one before; the node applies the longest verified prefix whose last document has not
    /// expired at `now` (Unix seconds), unless `newer_exists` (the sender holds a later
    /// epoch than the chain reaches: the chain is the first part of a longer one, and
    /// moving forward on it is never worse than staying). It stops at the first refusal.
    pub fn offer(&mut self, chain: &[Signed], now: u64, newer_exists: bool) -> Offered {
        let mut out = Offered::default();
        let mut verified: Vec<Signed> = Vec::new();
        // The copy refused, if one is: remembered below when the refusal is final.
        let mut refused_copy = None;
        for doc in chain {
            if self.refused.contains(&doc.fingerprint()) {
                break; // Refused for good before, and reported then.
            }
            let tip = verified.last().unwrap_or_else(|| self.current());
            if doc.epoch() <= tip.epoch() {
                match self.older(doc, &verified) {
                    Ok(()) => continue,
                    Err(Older::Fork(fork)) => {
                        self.remember_refused(doc.fingerprint());
                        if !self.forks.iter().any(|f| *f == fork) {
                            if self.forks.len() == FORK_MEMORY {
                                self.forks.pop_front();
                            }
                            self.forks.push_back(fork);
                            out.fork = Some(fork);
                        }
                    }
                    Err(Older::Refused(refused)) => {
                        refused_copy = Some(doc.fingerprint());
                        out.refused = Some(refused);
                    }
                }
                break;
            }
            let reasons = check_successor(tip, doc);
            if !reasons.is_empty() {
                if let Some(super::Refusal::Gap { current, .. }) = reasons.first() {
                    out.wanted = Some(current + 1);
                }
                refused_copy = Some(doc.fingerprint());
                out.refused = Some(Refused {
                    epoch: doc.epoch(),
                    digest: doc.digest(),
                    reasons,
                });
                break;
            }
            verified.push(doc.clone());
        }
        // The newest accepted must not have expired, unless a newer one exists.
        let keep = if newer_exists {
            verified.len()
        } else {
            verified
                .iter()
                .rposition(|d| check_expiry(d.document(), now).is_none())
                .map_or(0, |i| i + 1)
        };
        if keep < verified.len() && out.refused.is_none() && out.fork.is_none() {
            let newest = &verified[verified.len() - 1];
            out.refused = Some(Refused {
                epoch: newest.epoch(),
                digest: newest.digest(),
                reasons: check_expiry(newest.document(), now).into_iter().collect(),
            });
        }
        verified.truncate(keep);
        if let Some(refused) = &out.refused
            && let Some(copy) = refused_copy
            && refused.is_final()
        {
            self.remember_refused(copy);
        }
        for doc in &verified {
            self.push(doc.clone());
        }
        out.applied = verified;
        out
    }

    /// A document at or below the tip: the same as ours (Ok), or a fork, or refused.
    fn older(&self, doc: &Signed, verified: &[Signed]) -> Result<(), Older> {
        let held = |epoch: u64| {
            self.get(epoch)
                .or_else(|| verified.iter().find(|d| d.epoch() == epoch))
        };
        let Some(ours) = held(doc.epoch()) else {
            return Err(self.stale(doc));
        };
        if ours.digest() == doc.digest() {
            return Ok(());
        }
        if doc.document().network != ours.document().network {
            return Err(Older::Refused(Refused {
                epoch: doc.epoch(),
                digest: doc.digest(),
                reasons: vec![Refusal::WrongNetwork {
                    ours: ours.document().network.clone(),
                    theirs: doc.document().network.clone(),
                }],
            }));
        }
        // Signed by the committee that signed ours? Then that committee signed two.
        let reasons = if doc.epoch() == 1 {
            check_signatures(ours.document(), doc).problems
        } else {
            match held(doc.epoch() - 1) {
                Some(before) => check_successor(before, doc),
                None => return Err(self.stale(doc)),
            }
        };
        if reasons.is_empty() {
            return Err(Older::Fork(Fork {
                epoch: doc.epoch(),
                ours: ours.digest(),
                theirs: doc.digest(),
            }));
        }
        Err(Older::Refused(Refused {
            epoch: doc.epoch(),
            digest: doc.digest(),
            reasons,
        }))
    }

    fn stale(&self, doc: &Signed) -> Older {
        Older::Refused(Refused {
            epoch: doc.epoch(),
            digest: doc.digest(),
            reasons: vec![Refusal::Stale {
                epoch: doc.epoch(),
                current: self.epoch(),
            }],
        })
    }

    fn remember_refused(&mut self, copy: [u8; 32]) {
        if self.refused.len() == REFUSED_MEMORY {
            self.refused.pop_front();
        }
        self.refused.push_back(copy);
    }

    fn push(&mut self, doc: Signed) {
        debug_assert_eq!(doc.epoch(), self.epoch() + 1);
        self.history.push_back(doc);
        while self.history.len() > self.max_history {
            self.history.pop_front();
        }
    }
}

enum Older {
    Fork(Fork),
    Refused(Refused),
}
