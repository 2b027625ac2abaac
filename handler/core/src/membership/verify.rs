//! The acceptance rules, one function per question, each returning every reason it finds.

use std::collections::BTreeSet;

use super::{DecodeError, Digest, Document, GovernanceId, Signed};

/// Why a document was not accepted. A node logs each refusal once and counts it by
/// [`Refusal::code`]; nothing in a refused document touches the allow list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Not a valid encoding (or TOML form) of a document, or larger than any can be.
    #[error("malformed: {0}")]
    Malformed(DecodeError),
    /// A document of another network.
    #[error("it is for network {theirs:?}; this node is in network {ours:?}")]
    WrongNetwork {
        /// This node's network.
        ours: String,
        /// The document's.
        theirs: String,
    },
    /// Not newer than what the node holds: a rollback, or a replay.
    #[error("epoch {epoch} is not newer than this node's epoch {current} (a rollback or a replay)")]
    Stale {
        /// The document's epoch.
        epoch: u64,
        /// The node's.
        current: u64,
    },
    /// Newer, but not the next epoch: the ones between are missing (the node asks its
    /// peers for them).
    #[error("epoch {epoch} skips ahead of this node's epoch {current}: epochs {} to {} are missing", current.saturating_add(1), epoch.saturating_sub(1))]
    Gap {
        /// The document's epoch.
        epoch: u64,
        /// The node's.
        current: u64,
    },
    /// The next epoch, but it does not name the node's document as its previous one.
    #[error("epoch {epoch} follows {got}, but this node's epoch {} is {expected}", epoch.saturating_sub(1))]
    WrongPrevious {
        /// The document's epoch.
        epoch: u64,
        /// The digest of the node's document.
        expected: Digest,
        /// The `previous` the document names.
        got: Digest,
    },
    /// A second, validly signed document for an epoch the node already holds another for.
    /// The node keeps its own and raises an alarm: a threshold of the committee signed
    /// two different documents.
    #[error("fork: epoch {epoch} is {theirs}, validly signed, but this node holds {ours} for it")]
    Fork {
        /// The epoch.
        epoch: u64,
        /// The node's document for it.
        ours: Digest,
        /// The other one.
        theirs: Digest,
    },
    /// Fewer valid signatures of the signing committee than its threshold.
    #[error(
        "only {valid} of the committee of epoch {committee_epoch} signed validly; its threshold is {threshold}"
    )]
    UnderThreshold {
        /// Valid signatures from that committee.
        valid: usize,
        /// Its threshold.
        threshold: u8,
        /// The epoch whose committee signs (the previous one; the genesis signs itself).
        committee_epoch: u64,
    },
    /// The document changes the committee, and the new committee did not reach its own
    /// threshold (it must, so that a committee that cannot sign is never installed).
    #[error(
        "it changes the committee, and only {valid} of the new committee signed validly; its threshold is {threshold}"
    )]
    NewCommitteeUnderThreshold {
        /// Valid signatures from the new committee.
        valid: usize,
        /// The new threshold.
        threshold: u8,
    },
    /// A signature by a key in neither committee.
    #[error("signer {0} is not in the committee")]
    UnknownSigner(GovernanceId),
    /// One signer, twice.
    #[error("signer {0} signed twice")]
    DuplicateSigner(GovernanceId),
    /// A signature that does not verify for this document.
    #[error("the signature by {0} is not valid for this document")]
    BadSignature(GovernanceId),
    /// A later epoch checked on its own (`verify` without the current document): its
    /// signers are the previous epoch's committee, which only that document names.
    #[error("epoch {epoch} cannot be checked on its own: its signers are the committee of epoch {}, so give that document as the current one", epoch.saturating_sub(1))]
    NeedsCurrent {
        /// The document's epoch.
        epoch: u64,
    },
    /// Larger than this node can send to anyone: its members could never receive it from
    /// here. Raise `max_message_size` on every node first, then offer the document again.
    #[error(
        "it is {size} bytes, and this node's max_message_size lets it send documents of at most {max} bytes: no member could receive it (raise max_message_size on every node first)"
    )]
    TooLarge {
        /// The document's encoded size.
        size: usize,
        /// The most a Documents message of this node carries.
        max: usize,
    },
    /// The newest document offered has expired.
    #[error("it expired at {expires} (Unix seconds); it is now {now}")]
    Expired {
        /// When it expired.
        expires: u64,
        /// The node's time.
        now: u64,
    },
}

impl Refusal {
    /// A short name for metrics labels and tests.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::WrongNetwork { .. } => "wrong_network",
            Self::Stale { .. } => "stale",
            Self::Gap { .. } => "gap",
            Self::WrongPrevious { .. } => "wrong_previous",
            Self::Fork { .. } => "fork",
            Self::UnderThreshold { .. } => "under_threshold",
            Self::NewCommitteeUnderThreshold { .. } => "new_committee_under_threshold",
            Self::UnknownSigner(_) => "unknown_signer",
            Self::DuplicateSigner(_) => "duplicate_signer",
            Self::BadSignature(_) => "bad_signature",
            Self::NeedsCurrent { .. } => "needs_current",
            Self::Expired { .. } => "expired",
            Self::TooLarge { .. } => "too_large",
        }
    }

    /// Whether the same document could be accepted later: a gap closes once the missing
    /// epochs arrive, and an expired document may still pass as part of a chain a newer
    /// document ends. Everything else is final for that document.
    pub fn may_pass_later(&self) -> bool {
        matches!(self, Self::Gap { .. } | Self::Expired { .. })
    }
}

/// What the signatures of a document add up to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SignatureCheck {
    /// Valid signatures from the signing committee.
    pub valid: usize,
    /// Valid signatures from the document's own committee, when it changes the committee.
    pub valid_new: usize,
    /// Every problem found.
    pub problems: Vec<Refusal>,
}

/// Checks `signed`'s signatures against the committee of `signing` (the previous epoch, or
/// the document itself for a genesis) and, if `signed` changes the committee or its
/// threshold, against its own committee too. Every signature must be valid, by a distinct
/// key of one of the committees concerned.
pub fn check_signatures(signing: &Document, signed: &Signed) -> SignatureCheck {
    let next = signed.document();
    let changes = next.committee != signing.committee || next.threshold != signing.threshold;
    let digest = signed.digest();
    let mut check = SignatureCheck::default();
    let mut seen = BTreeSet::new();
    let mut repeated = BTreeSet::new();
    for sig in signed.signatures() {
        if !seen.insert(sig.signer) {
            if repeated.insert(sig.signer) {
                check.problems.push(Refusal::DuplicateSigner(sig.signer));
            }
            continue;
        }
        let in_signing = signing.committee.contains(&sig.signer);
        let in_next = changes && next.committee.contains(&sig.signer);
        if !in_signing && !in_next {
            check.problems.push(Refusal::UnknownSigner(sig.signer));
            continue;
        }
        if !sig.is_valid_for(&digest) {
            check.problems.push(Refusal::BadSignature(sig.signer));
            continue;
        }
        check.valid += usize::from(in_signing);
        check.valid_new += usize::from(in_next);
    }
    if check.valid < usize::from(signing.threshold) {
        check.problems.push(Refusal::UnderThreshold {
            valid: check.valid,
            threshold: signing.threshold,
            committee_epoch: signing.epoch,
        });
    }
    if changes && check.valid_new < usize::from(next.threshold) {
        check.problems.push(Refusal::NewCommitteeUnderThreshold {
            valid: check.valid_new,
            threshold: next.threshold,
        });
    }
    check
}

/// Every reason `next` is not the successor of `current` (expiry aside: see
/// [`check_expiry`]). Empty: it is.
pub fn check_successor(current: &Signed, next: &Signed) -> Vec<Refusal> {
    let (ours, theirs) = (current.document(), next.document());
    if theirs.network != ours.network {
        return vec![Refusal::WrongNetwork {
            ours: ours.network.clone(),
            theirs: theirs.network.clone(),
        }];
    }
    if theirs.epoch <= ours.epoch {
        return vec![Refusal::Stale {
            epoch: theirs.epoch,
            current: ours.epoch,
        }];
    }
    if theirs.epoch > ours.epoch + 1 {
        return vec![Refusal::Gap {
            epoch: theirs.epoch,
            current: ours.epoch,
        }];
    }
    let mut reasons = Vec::new();
    if theirs.previous != current.digest() {
        reasons.push(Refusal::WrongPrevious {
            epoch: theirs.epoch,
            expected: current.digest(),
            got: theirs.previous,
        });
    }
    reasons.extend(check_signatures(ours, next).problems);
    reasons
}

/// Every reason a genesis (epoch 1) is not acceptable as a trust anchor: it must carry a
/// threshold of its own committee's signatures.
pub fn check_genesis(genesis: &Signed) -> Vec<Refusal> {
    let doc = genesis.document();
    if doc.epoch != 1 {
        return vec![Refusal::Malformed(DecodeError::Invalid {
            field: "epoch",
            why: format!("{}: a genesis is epoch 1", doc.epoch),
        })];
    }
    check_signatures(doc, genesis).problems
}

/// `Expired` if `doc` has expired at `now` (Unix seconds).
pub fn check_expiry(doc: &Document, now: u64) -> Option<Refusal> {
    doc.expires
        .filter(|&expires| expires <= now)
        .map(|expires| Refusal::Expired { expires, now })
}
