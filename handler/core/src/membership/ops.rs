//! The operators' operations, as functions (the `p2p-node membership` commands are thin
//! wrappers): start a network, propose its next epoch, combine signatures, verify.

use super::{
    DecodeError, Digest, Document, GovernanceId, Ledger, Member, Refusal, Signature, SignatureFile,
    Signed, check_expiry, check_genesis,
};

/// Why signatures could not be combined into a document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CombineError {
    /// The signature is of another document.
    #[error(
        "it signs epoch {epoch} of network {network:?} with digest {digest}, not this document ({expected})"
    )]
    OtherDocument {
        /// Its network.
        network: String,
        /// Its epoch.
        epoch: u64,
        /// The digest it signs.
        digest: Digest,
        /// This document's.
        expected: Digest,
    },
    /// The signature does not verify.
    #[error("the signature by {0} does not verify")]
    Invalid(GovernanceId),
    /// This signer signed already, differently.
    #[error("{0} signed this document already")]
    Repeated(GovernanceId),
}

impl Signed {
    /// A network's first document (epoch 1), unsigned: its committee signs it next.
    pub fn genesis(
        network: &str,
        threshold: u8,
        committee: Vec<GovernanceId>,
        members: Vec<Member>,
        expires: Option<u64>,
    ) -> Result<Self, DecodeError> {
        Self::new(Document {
            network: network.to_owned(),
            epoch: 1,
            previous: Digest::NONE,
            expires,
            threshold,
            committee,
            members,
        })
    }

    /// The epoch after `self`, unsigned: `members` in place of the current ones, and the
    /// committee and threshold kept unless given.
    pub fn propose(
        &self,
        members: Vec<Member>,
        threshold: Option<u8>,
        committee: Option<Vec<GovernanceId>>,
        expires: Option<u64>,
    ) -> Result<Self, DecodeError> {
        let mut doc = self.document().successor_template();
        doc.members = members;
        doc.expires = expires;
        if let Some(threshold) = threshold {
            doc.threshold = threshold;
        }
        if let Some(committee) = committee {
            doc.committee = committee;
        }
        Self::new(doc)
    }

    /// Adds a signature made by `p2p-node membership sign`, after checking that it is of
    /// this document and verifies. The same signature twice is added once.
    pub fn combine(&mut self, file: &SignatureFile) -> Result<(), CombineError> {
        let doc = self.document();
        if file.digest != self.digest() || file.epoch != doc.epoch || file.network != doc.network {
            return Err(CombineError::OtherDocument {
                network: file.network.clone(),
                epoch: file.epoch,
                digest: file.digest,
                expected: self.digest(),
            });
        }
        let signature: Signature = file.signature;
        if !signature.is_valid_for(&self.digest()) {
            return Err(CombineError::Invalid(signature.signer));
        }
        match self
            .signatures()
            .iter()
            .find(|s| s.signer == signature.signer)
        {
            Some(held) if *held == signature => Ok(()),
            Some(_) => Err(CombineError::Repeated(signature.signer)),
            None => {
                self.add_signature(signature);
                Ok(())
            }
        }
    }

    /// Every reason a node would refuse this document: a node at `current` (which is
    /// trusted as it is), or, without one, a node installing it as its genesis. `Ok`: it
    /// would be accepted (or it is `current` itself). A later epoch without `current`
    /// cannot be checked: its signers are the previous epoch's committee.
    pub fn verify(&self, current: Option<&Signed>, now: u64) -> Result<(), Vec<Refusal>> {
        let Some(current) = current else {
            if self.epoch() != 1 {
                return Err(vec![Refusal::NeedsCurrent {
                    epoch: self.epoch(),
                }]);
            }
            let mut reasons = check_genesis(self);
            reasons.extend(check_expiry(self.document(), now));
            return if reasons.is_empty() {
                Ok(())
            } else {
                Err(reasons)
            };
        };
        let mut ledger = Ledger::trusting(current.clone(), 1);
        let offered = ledger.offer(std::slice::from_ref(self), now, false);
        if let Some(fork) = offered.fork {
            return Err(vec![Refusal::Fork {
                epoch: fork.epoch,
                ours: fork.ours,
                theirs: fork.theirs,
            }]);
        }
        match offered.refused {
            Some(refused) => Err(refused.reasons),
            None => Ok(()),
        }
    }
}
