//! The async driver: tasks and channels around the sans-IO core.
//!
//! ```text
//!  application                     handler task                        network side
//!  -----------                     ------------                        ------------
//!  commands  ----(1)---->  +----------------------+  --(4) sender---->  router task --> connection
//!  received  <---(2)-----  |  Endpoint (all the   |  <-(5) receiver--  (listener,       tasks (one per
//!  priority  <---(3)-----  |  exchange logic)     |  <-(6) priority--   limits)          stream: Noise,
//!                          +----------------------+                                       framing)
//! ```
//!
//! Six bounded channels: (1) app commands; (2) requests and every exchange outcome for the
//! app (replies, failures with payloads, the fate of our replies); (3) informational
//! notices for the app (peer errors, rate limits, limits hit);
//! (4) dial/send/close for the network; (5) connection events; (6) network notices
//! (connection limit, accept errors, connections dropped for being too slow).
//!
//! The tasks hold no protocol logic: the handler task feeds the [`Endpoint`](crate::Endpoint) and
//! performs its outputs; a connection task feeds its [`Connection`](crate::Connection) and writes its frames; the router
//! spawns, limits and routes. Time comes only from `tokio::time`, randomness only from the
//! seed given to [`Handler::spawn`], and every `select!` is `biased;`, so under a simulated
//! runtime the same seed gives the same run.
//!
//! Back-pressure, and why nothing is dropped silently:
//! * (1) full: `Handler` methods wait for room (they are async; the sync facade blocks).
//! * (2) full: events wait in the handler task's backlog, and the handler stops reading
//!   connection events (5) until the backlog drains, so slowness reaches the peers as TCP
//!   back-pressure instead of as loss.
//! * (3) full: notices wait in a backlog of the same size; past that they are dropped and
//!   counted. They are informational, so an application written to `request`, `response`
//!   and `check_receive` alone, which never reads them, cannot stall the node.
//! * (4) never blocks for long: the router forwards with `try_send` and never waits on the
//!   handler; (5) full makes connection tasks wait (back-pressure again).
//! * A connection whose outgoing queue is full is dropped and reported on (6) as lost; the
//!   endpoint retries its exchange like any broken connection.
//!
//! One file per task or concern: `handle` (the application's [`Handler`] and what it
//! receives), `handler_task`, `router` (listener, dials, limits, and the handler/network
//! messages), `slots` (the live connection table both of those use), `conn_task`, `records`
//! (the task that reads and writes a records backend), `tap` (the simulator's hook) and
//! `buggify` (fault points that make tasks fall behind, for the simulator).

mod buggify;
mod catalog;
mod conn_task;
mod handle;
mod handler_task;
mod observe;
mod records;
mod router;
mod slots;
mod tap;

pub use catalog::{EXCHANGE_DURATION, EXCHANGE_DURATION_BUCKETS};
pub use handle::{
    Handler, HandlerError, Inbox, MembershipStatus, Notice, Options, Received, RequestOptions,
    ShutdownReport, Status, WallClock,
};
pub use tap::{Arrival, NoTap, Tap, Verdict};

use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::allow_list::AllowList;

/// How long shutdown waits for connections to flush their last frames before cutting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

type SharedAllow = Arc<RwLock<AllowList>>;

/// Milliseconds since the Unix epoch on `clock` (0 before it).
fn unix_ms(clock: &(dyn Fn() -> std::time::SystemTime + Send + Sync)) -> u64 {
    clock()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// A timer a task keeps for its whole life and moves to each new deadline. Moving a timer
/// later is cheap; a `Sleep` made afresh on every turn of a task's loop would be entered into
/// the runtime's timer wheel and taken out again on every turn.
struct Timer {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// The deadline the sleep is set to, if any is wanted.
    armed: Option<std::time::Instant>,
}

impl Timer {
    fn new() -> Self {
        Self {
            // Never polled until armed.
            sleep: Box::pin(tokio::time::sleep(std::time::Duration::ZERO)),
            armed: None,
        }
    }

    /// Sets the timer to `deadline` (none: the caller must not wait on it); returns whether
    /// it is set.
    fn arm(&mut self, deadline: Option<std::time::Instant>) -> bool {
        if let Some(at) = deadline
            && self.armed != Some(at)
        {
            self.sleep
                .as_mut()
                .reset(tokio::time::Instant::from_std(at));
        }
        self.armed = deadline;
        deadline.is_some()
    }

    /// Resolves at the armed deadline.
    fn wait(&mut self) -> &mut std::pin::Pin<Box<tokio::time::Sleep>> {
        &mut self.sleep
    }

    /// The deadline passed: the next `arm` sets the timer even to the same instant.
    fn fired(&mut self) {
        self.armed = None;
    }
}
