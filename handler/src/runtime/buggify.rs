//! Fault points inside the driver, in FoundationDB's BUGGIFY manner: places where a task
//! falls behind as it would on a busy machine (a connection task that writes its frames
//! late, or reads the next one late; a handler task that takes its next input late). Off
//! unless the crate is built with the `buggify` feature *and* [`Options::buggify`] gives a
//! seed: the simulator turns them on for some of its seeds, never a release build.
//!
//! Each task draws from its own stream of that seed, in an order fixed by the task's own
//! history, so a run stays deterministic: same seed, same delays, same trace.
//!
//! [`Options::buggify`]: super::Options::buggify

#[cfg(feature = "buggify")]
use rand_chacha::ChaCha20Rng;
#[cfg(feature = "buggify")]
use rand_core::{Rng, SeedableRng};

/// One in this many passes through a fault point is delayed.
#[cfg(feature = "buggify")]
const ONE_IN: u32 = 16;
/// The longest delay, in milliseconds (below every timeout a sane config has).
#[cfg(feature = "buggify")]
const MAX_DELAY_MS: u64 = 20;

/// The fault points of one task.
#[derive(Debug, Default)]
pub(super) struct Points {
    #[cfg(feature = "buggify")]
    rng: Option<ChaCha20Rng>,
}

impl Points {
    /// The points of the task numbered `stream`, on when `seed` is given.
    #[cfg_attr(not(feature = "buggify"), allow(unused_variables))]
    pub(super) fn new(seed: Option<u64>, stream: u64) -> Self {
        #[cfg(feature = "buggify")]
        {
            Self {
                rng: seed.map(|seed| {
                    let mut rng = ChaCha20Rng::seed_from_u64(seed);
                    rng.set_stream(stream);
                    rng
                }),
            }
        }
        #[cfg(not(feature = "buggify"))]
        Self {}
    }

    /// A fault point: now and then (when on), the task sleeps 1-20 ms here.
    pub(super) async fn delay(&mut self) {
        #[cfg(feature = "buggify")]
        if let Some(rng) = &mut self.rng
            && rng.next_u32().is_multiple_of(ONE_IN)
        {
            let ms = 1 + rng.next_u64() % MAX_DELAY_MS;
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
    }
}
