//! Noise plumbing: the protocol parameters and a crypto resolver whose randomness is seeded.
//!
//! snow asks its resolver for an RNG once per handshake and uses it for the ephemeral key.
//! [`SeededResolver`] answers with a ChaCha20 stream seeded by the caller, and delegates
//! every primitive to snow's default resolver, except the cipher, which comes from ring when
//! the `ring` feature is on (much faster for small messages). Randomness is never asked of
//! either: snow's own resolvers are only used for DH, hash and cipher, so no handshake can
//! draw OS randomness behind our back and equal seeds give byte-identical handshakes.

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use snow::params::{CipherChoice, DHChoice, HashChoice, NoiseParams};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use snow::{Builder, HandshakeState};

use crate::identity::Keypair;
use crate::wire::{NOISE_PARAMS, NOISE_PARAMS_IK, NOISE_PROLOGUE};

/// A snow resolver that draws randomness from a seeded ChaCha20 stream.
#[derive(Debug, Clone)]
pub struct SeededResolver {
    seed: [u8; 32],
}

impl SeededResolver {
    /// A resolver whose RNG starts from `seed`.
    pub fn new(seed: [u8; 32]) -> Self {
        Self { seed }
    }
}

struct SeededRandom(ChaCha20Rng);

impl Random for SeededRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoResolver for SeededResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(SeededRandom(ChaCha20Rng::from_seed(self.seed))))
    }
    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        DefaultResolver.resolve_dh(choice)
    }
    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(choice)
    }
    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        #[cfg(feature = "ring")]
        if let Some(cipher) = snow::resolvers::RingResolver.resolve_cipher(choice) {
            return Some(cipher);
        }
        DefaultResolver.resolve_cipher(choice)
    }
}

/// Which side of the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeRole {
    /// Sends message 1 and 3.
    Initiator,
    /// Sends message 2.
    Responder,
}

/// Builds a Noise XX handshake state for `keypair`, ephemeral randomness from `seed`.
pub fn handshake(
    keypair: &Keypair,
    role: HandshakeRole,
    seed: [u8; 32],
) -> Result<HandshakeState, snow::Error> {
    let params: NoiseParams = NOISE_PARAMS.parse()?;
    let builder = Builder::with_resolver(params, Box::new(SeededResolver::new(seed)))
        .local_private_key(keypair.private_bytes())?
        .prologue(NOISE_PROLOGUE)?;
    match role {
        HandshakeRole::Initiator => builder.build_initiator(),
        HandshakeRole::Responder => builder.build_responder(),
    }
}

/// Builds a Noise IK handshake state for `keypair`: the initiator must give the responder's
/// static public key (`remote`), which it knows before dialing; the responder gives none.
pub fn handshake_ik(
    keypair: &Keypair,
    role: HandshakeRole,
    seed: [u8; 32],
    remote: Option<&[u8; 32]>,
) -> Result<HandshakeState, snow::Error> {
    let params: NoiseParams = NOISE_PARAMS_IK.parse()?;
    let mut builder = Builder::with_resolver(params, Box::new(SeededResolver::new(seed)))
        .local_private_key(keypair.private_bytes())?
        .prologue(NOISE_PROLOGUE)?;
    if let Some(remote) = remote {
        builder = builder.remote_public_key(remote)?;
    }
    match role {
        HandshakeRole::Initiator => builder.build_initiator(),
        HandshakeRole::Responder => builder.build_responder(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(seed: u64) -> (Keypair, Keypair) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        (Keypair::generate(&mut rng), Keypair::generate(&mut rng))
    }

    /// Runs a full XX handshake and returns the three messages.
    fn run(a: &Keypair, b: &Keypair, seeds: ([u8; 32], [u8; 32])) -> Vec<Vec<u8>> {
        let mut i = handshake(a, HandshakeRole::Initiator, seeds.0).unwrap();
        let mut r = handshake(b, HandshakeRole::Responder, seeds.1).unwrap();
        let mut buf = [0u8; 1024];
        let mut out = [0u8; 1024];
        let mut msgs = Vec::new();
        let n = i.write_message(&[], &mut buf).unwrap();
        msgs.push(buf[..n].to_vec());
        r.read_message(&buf[..n], &mut out).unwrap();
        let n = r.write_message(&[], &mut buf).unwrap();
        msgs.push(buf[..n].to_vec());
        i.read_message(&buf[..n], &mut out).unwrap();
        let n = i.write_message(&[], &mut buf).unwrap();
        msgs.push(buf[..n].to_vec());
        r.read_message(&buf[..n], &mut out).unwrap();
        assert!(i.is_handshake_finished() && r.is_handshake_finished());
        assert_eq!(r.get_remote_static(), Some(&a.public_bytes()[..]));
        assert_eq!(i.get_remote_static(), Some(&b.public_bytes()[..]));
        msgs
    }

    #[test]
    fn the_ephemeral_key_comes_from_the_seeded_stream_alone() {
        // Whatever cipher backend is compiled in (ring links getrandom for its own use),
        // snow asks only our resolver for randomness: the ephemeral public key in message
        // 1 is exactly the one made from the first 32 bytes of the seeded stream.
        let (a, _) = pair(4);
        let seed = [9; 32];
        let mut i = handshake(&a, HandshakeRole::Initiator, seed).unwrap();
        let mut msg1 = [0u8; 128];
        let n = i.write_message(&[], &mut msg1).unwrap();
        assert_eq!(n, 32);
        let mut ephemeral = [0u8; 32];
        ChaCha20Rng::from_seed(seed).fill_bytes(&mut ephemeral);
        assert_eq!(
            &msg1[..32],
            &Keypair::from_private_bytes(ephemeral).public_bytes()[..]
        );
    }

    #[test]
    fn equal_seeds_give_identical_handshakes() {
        let (a, b) = pair(1);
        let first = run(&a, &b, ([1; 32], [2; 32]));
        let again = run(&a, &b, ([1; 32], [2; 32]));
        let other = run(&a, &b, ([3; 32], [2; 32]));
        assert_eq!(first, again);
        assert_ne!(first[0], other[0]);
    }
}
