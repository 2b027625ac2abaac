//! Deterministic simulation of p2p-handler nodes on turmoil.
pub mod transport;
