//! The core's promise that it does no I/O is kept by what it may depend on. This test makes
//! adding a dependency a deliberate act: a new entry must be added here, with a reason, and
//! nothing that brings an async runtime or networking may be.

use std::collections::BTreeSet;

/// Each allowed dependency, and why the core needs it.
const ALLOWED: &[(&str, &str)] = &[
    (
        "snow",
        "Noise XX state machines (no std/getrandom features: no OS randomness)",
    ),
    ("bytes", "cheaply cloned payloads"),
    (
        "blake2",
        "peer id = BLAKE2s-256 of the public key; mac1, mac2 and cookies (keyed BLAKE2s)",
    ),
    (
        "chacha20poly1305",
        "cookie replies (XChaCha20-Poly1305, WireGuard's; no getrandom feature: nonces are passed in)",
    ),
    ("curve25519-dalek", "X25519 public keys from private ones"),
    ("rand_core", "the RNG traits"),
    (
        "rand_chacha",
        "the seeded RNG every random choice comes from",
    ),
    ("thiserror", "error types"),
    ("serde", "allow-list, peer-id and Config (de)serialisation"),
    (
        "humantime-serde",
        "Config's durations as \"250ms\" strings in config files (pure formatting)",
    ),
    (
        "humantime",
        "allow-list expiries written as durations (\"30d\"; parsing only, no clock)",
    ),
    ("toml", "the allow-list file format"),
    ("hex", "text forms of keys and peer ids"),
    (
        "xxhash-rust",
        "payload digests in dedupe records (XXH3-128, pure Rust, no I/O)",
    ),
    (
        "secp256k1",
        "BIP-340 signatures of membership documents (libsecp256k1; no rand feature: signing \
         randomness is passed in)",
    ),
    (
        "sha2",
        "membership document digests (SHA-256 tagged hashes, as BIP-340)",
    ),
    (
        "hpke",
        "address records sealed to each member's static key (RFC 9180; randomness passed in)",
    ),
];

/// Crates whose presence would mean the core can do I/O or run tasks.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "tokio-util",
    "futures",
    "futures-util",
    "async-std",
    "mio",
    "socket2",
    "getrandom",
    "turmoil",
    "tracing",
];

#[test]
fn the_core_depends_only_on_what_it_is_allowed() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))?;
    let manifest: toml::Table = toml::from_str(&manifest)?;
    let deps: BTreeSet<&str> = manifest
        .get("dependencies")
        .and_then(|d| d.as_table())
        .map(|t| t.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let allowed: BTreeSet<&str> = ALLOWED.iter().map(|(name, _)| *name).collect();
    for dep in &deps {
        assert!(
            !FORBIDDEN.contains(dep),
            "the sans-IO core must not depend on {dep}"
        );
        assert!(
            allowed.contains(dep),
            "new core dependency {dep}: add it to ALLOWED with a reason, if it does no I/O"
        );
    }
    // Features must not turn on I/O either: only `ring` (a cipher), `invariants` (checks
    // for the fuzzers) and `sabotage` (defects planted for the simulator's tests) exist.
    let features: BTreeSet<&str> = manifest
        .get("features")
        .and_then(|f| f.as_table())
        .map(|t| t.keys().map(String::as_str).collect())
        .unwrap_or_default();
    assert_eq!(
        features,
        BTreeSet::from(["default", "invariants", "ring", "sabotage"])
    );
    Ok(())
}
