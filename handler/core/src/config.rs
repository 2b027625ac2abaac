//! Every bound the handler enforces, in one place, with its default.
//!
//! Nothing in the crate is unbounded: queues, attempts, sizes, caches, timeouts and rates
//! all come from here. [`Config::validate`] rejects combinations that cannot work.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A token bucket: `burst` events at once, refilled at `per_second` events per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Bucket capacity: how many events may arrive back to back.
    pub burst: u32,
    /// Sustained rate in events per second.
    pub per_second: u32,
}

/// Handler configuration. Defaults suit a handful to hundreds of operator nodes on a WAN.
///
/// (De)serialisable, for config files: field names as here, durations as humantime strings
/// (`"250ms"`, `"5s"`), rates as `{ burst = 32, per_second = 16 }`; a missing field takes its
/// default and an unknown one is an error. Deserialising does not validate: call
/// [`Config::validate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Largest application payload, in bytes, accepted or sent. Default 16 MiB.
    pub max_message_size: usize,
    /// How many tries of one exchange's request may reach the peer (first try included)
    /// before the app gets a failure with its payload back. Tries that never reach it (a
    /// failed dial, a peer closing the connection for having too many) are bounded by time
    /// instead: none starts after [`Config::exchange_budget`]. Default 6.
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt. Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Ceiling on the retry delay. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Dial plus Noise handshake must finish within this. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A responder drops a connection whose handshake is not done within this. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// The dialer waits this long for the Ack of its Request. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// The responder holds its Ack of a new Request this long, so that when its
    /// application answers quickly the Ack and the Reply leave in one write. The Ack is
    /// always sent, before the Reply; zero sends it at once. Keep it far below `ack_timeout`.
    /// Default 2 ms.
    #[serde(with = "humantime_serde")]
    pub ack_delay: Duration,
    /// After the Ack, the dialer waits this long for the Reply before resending. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub reply_timeout: Duration,
    /// The responder's application must answer a request within this, or the dialer is told
    /// (Abort `NoResponse`). Should be below `reply_timeout`. Default 25 s.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// After sending a Reply, the responder waits this long for its Ack before reporting the
    /// reply unconfirmed. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub reply_ack_timeout: Duration,
    /// A connection with no exchange in flight for this long is closed. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A transfer that makes no progress for this long abandons the connection, and its
    /// exchange is retried like any broken connection's: a write of which the peer takes
    /// no byte (it stopped reading, or its host is gone without a reset), or a message of
    /// which no chunk arrives once it began. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub write_stall_timeout: Duration,
    /// Keep a dialed connection open after its exchange for the next one (until
    /// `idle_timeout`). Default false: a dialed connection closes after its exchange,
    /// except that requests already queued to the same peer go on it first, one after the
    /// other, and the last one closes it.
    pub reuse_connections: bool,
    /// Requests waiting behind a peer's current exchange. Default 64.
    pub max_queued_per_peer: usize,
    /// Inbound requests handed to the app and not yet answered, over all peers; past this new
    /// requests are Nacked `Busy`. Default 1024.
    pub max_pending_inbound: usize,
    /// Exchange ids remembered per peer to drop duplicate requests. Default 1024.
    pub dedupe_per_peer: usize,
    /// Memory for dedupe records over all peers, counted at
    /// [`DEDUPE_RECORD_COST`](crate::endpoint::DEDUPE_RECORD_COST) bytes a record (cached
    /// replies are counted in `reply_cache_bytes`). Past it, the oldest finished record of any
    /// peer is forgotten; if none is finished, new requests are Nacked `Busy`. The same bound
    /// holds for the records a durable node stores. Default 64 MiB (262,144 records).
    pub dedupe_bytes: usize,
    /// Outcomes of our exchanges (replies, failures) the application has not taken yet. At
    /// this many, `request()` is refused with `RequestError::Unread` until it reads some, so
    /// an application that never reads cannot grow the node (or its store) without bound.
    /// A driver setting. Default 4096.
    pub max_unread_outcomes: usize,
    /// Bytes of sent replies kept to answer a resent request without asking the app again.
    /// Default 64 MiB.
    pub reply_cache_bytes: usize,
    /// Incoming requests per peer. Default burst 64, 32 per second.
    pub request_rate: RateLimit,
    /// Incoming connections per peer. Default burst 32, 16 per second.
    pub connection_rate: RateLimit,
    /// Consecutive rate-limited requests after which the peer is disconnected. Default 16.
    pub rate_limit_strikes: u32,
    /// Peers whose rate-limit state is tracked at once (bounds memory in allow-any mode).
    /// Default 4096.
    pub max_tracked_peers: usize,
    /// Open connections, both directions: authenticated ones, and dials. A peer that
    /// authenticates while this many are open is sent `Close{TooManyConnections}` and
    /// disconnected (its dialer retries as after a refused dial); a dial waits for a free
    /// slot. Either is reported as a priority notice. Handshakes of accepted streams are
    /// bounded apart (`max_handshaking`). Default 1024.
    pub max_connections: usize,
    /// Connections the operating system holds for accepting (the listen backlog). A burst
    /// of dials beyond it loses their SYNs, and each costs its dialer a retransmit a second
    /// later. The system caps it (`net.core.somaxconn` on Linux, 4096 by default). A driver
    /// setting. Default 4096.
    pub listen_backlog: u32,
    /// Inbound connections that have not finished their handshake, per class: from
    /// addresses an allow-list entry lists, and from anywhere else (strangers). A stranger
    /// never takes a listed address's slot. When a class is full, a new stream waits
    /// (parked, unread, up to `4 * max_handshaking` of them, each for `handshake_timeout`
    /// at most) or takes the slot of a handshake that stalled (no handshake message for a
    /// tenth of `handshake_timeout`) from an address holding more slots than its own.
    /// Handshakes that progress are never evicted; authenticated connections never are.
    /// See `admission.rs`. Default 256.
    pub max_handshaking: usize,
    /// Unauthenticated inbound connections from one IP address, per class (listed or
    /// stranger); a stream beyond it waits (parked) for one of them to finish, or takes
    /// the slot of one that stalled. Keeps one host from taking every slot. Default 32.
    pub max_handshaking_per_ip: usize,
    /// The Diffie-Hellman work a stranger address may cause: a token per handshake message
    /// 1 processed from an address no allow-list entry lists, given back when the handshake
    /// authenticates an allowed peer. An address whose handshakes fail or stall is slowed
    /// to this rate; allowed peers never run dry. The burst is at least
    /// `max_handshaking_per_ip`, so that an address's handshakes in flight never wait for a
    /// token unless earlier ones failed. Default burst 32, 8 per second.
    pub stranger_handshake_rate: RateLimit,
    /// Capacity of each of the six channels between the application, the handler task and
    /// the network side (a connection's own outgoing queue is sized by the driver, not by
    /// this). Any value from 1 works. Default 1024.
    pub channel_capacity: usize,
}

impl Config {
    /// The longest one exchange can take, from its first attempt to its outcome: every
    /// attempt dials (`connect_timeout`), waits for the Ack (`ack_timeout`) and then for the
    /// Reply (`reply_timeout`), with the largest backoff between attempts. An upper bound:
    /// the outcome (a reply, or a failure with its cause) is reported within it. Time spent
    /// queued behind the peer's earlier exchanges, or waiting for a connection slot, comes
    /// on top.
    pub fn exchange_budget(&self) -> Duration {
        let per_attempt = self
            .connect_timeout
            .saturating_add(self.ack_timeout)
            .saturating_add(self.reply_timeout);
        let mut total = per_attempt.saturating_mul(self.max_attempts);
        for failures in 1..self.max_attempts {
            total = total.saturating_add(self.backoff_base(failures));
        }
        total
    }

    /// The retry delay after `failures` failed attempts, before jitter (which draws it
    /// from half of it to all of it): `backoff_initial` doubled per failure, capped at
    /// `backoff_max`.
    pub(crate) fn backoff_base(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(20);
        self.backoff_initial
            .saturating_mul(1 << exp)
            .min(self.backoff_max)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_message_size: 16 * 1024 * 1024,
            max_attempts: 6,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(2),
            ack_delay: Duration::from_millis(2),
            reply_timeout: Duration::from_secs(30),
            response_timeout: Duration::from_secs(25),
            reply_ack_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            write_stall_timeout: Duration::from_secs(30),
            reuse_connections: false,
            max_queued_per_peer: 64,
            max_pending_inbound: 1024,
            dedupe_per_peer: 1024,
            dedupe_bytes: 64 * 1024 * 1024,
            max_unread_outcomes: 4096,
            reply_cache_bytes: 64 * 1024 * 1024,
            request_rate: RateLimit {
                burst: 64,
                per_second: 32,
            },
            connection_rate: RateLimit {
                burst: 32,
                per_second: 16,
            },
            rate_limit_strikes: 16,
            max_tracked_peers: 4096,
            max_connections: 1024,
            listen_backlog: 4096,
            max_handshaking: 256,
            max_handshaking_per_ip: 32,
            stranger_handshake_rate: RateLimit {
                burst: 32,
                per_second: 8,
            },
            channel_capacity: 1024,
        }
    }
}

/// The largest of every count bound (queues, channels, connections, tables): far beyond
/// any real node, and within what its data structures (a channel's semaphore) can hold.
pub const MAX_COUNT: usize = 1 << 24;
/// The most attempts an exchange may make.
pub const MAX_ATTEMPTS: u32 = 1_000;
/// The longest any timeout or backoff may be: a year.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);
/// The largest byte budget (dedupe records, reply cache): 1 TiB.
pub const MAX_BYTES: u64 = 1 << 40;

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Checks that every bound is usable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |what: &str| Err(ConfigError(what.to_owned()));
        if self.max_message_size == 0 || self.max_message_size > crate::wire::MAX_MESSAGE_SIZE_LIMIT
        {
            return fail("max_message_size must be between 1 byte and 1 GiB");
        }
        if self.max_attempts == 0 || self.max_attempts > MAX_ATTEMPTS {
            return Err(ConfigError(format!(
                "max_attempts = {}: must be 1 to {MAX_ATTEMPTS}",
                self.max_attempts
            )));
        }
        if self.ack_delay >= self.ack_timeout {
            return fail("ack_delay must be below ack_timeout");
        }
        if self.backoff_initial > self.backoff_max {
            return fail("backoff_initial must not exceed backoff_max");
        }
        let timeouts = [
            ("connect_timeout", self.connect_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("ack_timeout", self.ack_timeout),
            ("reply_timeout", self.reply_timeout),
            ("response_timeout", self.response_timeout),
            ("reply_ack_timeout", self.reply_ack_timeout),
            ("idle_timeout", self.idle_timeout),
            ("write_stall_timeout", self.write_stall_timeout),
        ];
        for (name, value) in timeouts {
            if value.is_zero() {
                return Err(ConfigError(format!("{name} must be positive")));
            }
        }
        // Added to instants: a duration beyond what a clock can hold would panic there.
        let durations = timeouts.into_iter().chain([
            ("ack_delay", self.ack_delay),
            ("backoff_initial", self.backoff_initial),
            ("backoff_max", self.backoff_max),
        ]);
        for (name, value) in durations {
            if value > MAX_DURATION {
                return Err(ConfigError(format!(
                    "{name} = {value:?}: at most {} days",
                    MAX_DURATION.as_secs() / 86_400
                )));
            }
        }
        let counts = [
            ("max_queued_per_peer", self.max_queued_per_peer),
            ("max_pending_inbound", self.max_pending_inbound),
            ("dedupe_per_peer", self.dedupe_per_peer),
            ("max_tracked_peers", self.max_tracked_peers),
            ("max_connections", self.max_connections),
            ("max_handshaking", self.max_handshaking),
            ("max_handshaking_per_ip", self.max_handshaking_per_ip),
            ("channel_capacity", self.channel_capacity),
            ("max_unread_outcomes", self.max_unread_outcomes),
            ("listen_backlog", self.listen_backlog as usize),
        ];
        for (name, value) in counts {
            if value == 0 || value > MAX_COUNT {
                return Err(ConfigError(format!(
                    "{name} = {value}: must be 1 to {MAX_COUNT}"
                )));
            }
        }
        if self.dedupe_bytes < crate::endpoint::DEDUPE_RECORD_COST {
            return fail("dedupe_bytes must hold at least one record (256 bytes)");
        }
        for (name, value) in [
            ("dedupe_bytes", self.dedupe_bytes),
            ("reply_cache_bytes", self.reply_cache_bytes),
        ] {
            if value as u64 > MAX_BYTES {
                return Err(ConfigError(format!("{name} = {value}: at most 1 TiB")));
            }
        }
        for (name, rate) in [
            ("request_rate", self.request_rate),
            ("connection_rate", self.connection_rate),
            ("stranger_handshake_rate", self.stranger_handshake_rate),
        ] {
            if rate.burst == 0 || rate.per_second == 0 {
                return Err(ConfigError(format!(
                    "{name} needs a positive burst and rate"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Config::default().validate(), Ok(()));
    }

    #[test]
    fn rejects_unusable_bounds() {
        let bad = [
            Config {
                max_attempts: 0,
                ..Config::default()
            },
            Config {
                max_message_size: 0,
                ..Config::default()
            },
            Config {
                backoff_initial: Duration::from_secs(10),
                ..Config::default()
            },
            Config {
                ack_timeout: Duration::ZERO,
                ..Config::default()
            },
            Config {
                max_handshaking: 0,
                ..Config::default()
            },
            Config {
                dedupe_bytes: 255,
                ..Config::default()
            },
            Config {
                max_unread_outcomes: 0,
                ..Config::default()
            },
            Config {
                max_handshaking_per_ip: 0,
                ..Config::default()
            },
            Config {
                channel_capacity: usize::MAX,
                ..Config::default()
            },
            Config {
                max_attempts: u32::MAX,
                ..Config::default()
            },
            Config {
                ack_timeout: Duration::MAX,
                ..Config::default()
            },
            Config {
                backoff_max: Duration::from_secs(400 * 86_400),
                ..Config::default()
            },
            Config {
                reply_cache_bytes: usize::MAX,
                ..Config::default()
            },
            Config {
                request_rate: RateLimit {
                    burst: 0,
                    per_second: 1,
                },
                ..Config::default()
            },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
        // Out of bounds, not merely bad: the error names the field and the bound.
        let huge = Config {
            channel_capacity: 1 << 40,
            ..Config::default()
        };
        let e = huge.validate().unwrap_err().0;
        assert!(
            e.contains("channel_capacity") && e.contains("1 to 16777216"),
            "{e}"
        );
    }

    #[test]
    fn config_files_name_fields_as_the_struct_does_with_defaults_for_the_rest() {
        let c: Config = toml::from_str(
            "ack_delay = \"0s\"\nbackoff_initial = \"250ms\"\nmax_tracked_peers = 7\n\
             request_rate = { burst = 3, per_second = 2 }\n",
        )
        .unwrap();
        assert_eq!(
            c,
            Config {
                ack_delay: Duration::ZERO,
                backoff_initial: Duration::from_millis(250),
                max_tracked_peers: 7,
                request_rate: RateLimit {
                    burst: 3,
                    per_second: 2
                },
                ..Config::default()
            }
        );
        // Every field round-trips, so a file can be written from a Config.
        let text = toml::to_string(&Config::default()).unwrap();
        assert!(text.contains("ack_timeout = \"2s\""), "{text}");
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), Config::default());
        // Unknown fields and bad values are errors that name them.
        let e = toml::from_str::<Config>("ack_timout = \"1s\"").unwrap_err();
        assert!(e.to_string().contains("ack_timout"), "{e}");
        let e = toml::from_str::<Config>("ack_timeout = \"soon\"").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        let e = toml::from_str::<Config>("request_rate = { burst = 1 }").unwrap_err();
        assert!(e.to_string().contains("per_second"), "{e}");
    }

    #[test]
    fn the_exchange_budget_adds_every_attempt_and_backoff() {
        // 6 attempts of 5 + 2 + 30 s, backoffs 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s.
        assert_eq!(
            Config::default().exchange_budget(),
            Duration::from_secs(6 * 37) + Duration::from_millis(3100)
        );
        let one = Config {
            max_attempts: 1,
            ..Config::default()
        };
        assert_eq!(one.exchange_budget(), Duration::from_secs(37));
        let capped = Config {
            max_attempts: 3,
            backoff_initial: Duration::from_secs(4),
            backoff_max: Duration::from_secs(5),
            ..Config::default()
        };
        assert_eq!(
            capped.exchange_budget(),
            Duration::from_secs(3 * 37 + 4 + 5)
        );
    }
}
