//! Who may start a handshake, decided before any cryptography.
//!
//! Every accepted stream is unauthenticated until its Noise handshake ends, and a handshake
//! costs the responder key generation and Diffie-Hellman work. [`Admission`] bounds what
//! unauthenticated connections can take, so that strangers can never lock allowed peers
//! out, and so that a crowd of allowed peers is never mistaken for an attack:
//!
//! * **Two classes.** A stream from an IP address that an allow-list entry lists
//!   ([`Class::Listed`]) has a budget of its own: strangers never evict it, and it starts
//!   ahead of them. Every other stream is a [`Class::Stranger`].
//! * **Slots.** Each class holds at most `max_handshaking` handshakes at once, at most
//!   `max_handshaking_per_ip` of them from one address.
//! * **Park, don't churn.** A stream that finds no slot is *parked*: held, unread, costing
//!   a file descriptor and nothing else, until a slot frees (up to `listen_backlog` of
//!   them: what the operating system would otherwise hold for us). Closing it instead
//!   would make its dialer reconnect at once, and a node busy closing and accepting has no
//!   time left for anyone. Parked streams start in a fair order (the address with the
//!   fewest handshakes first, then the oldest), and are dropped after `handshake_timeout`.
//! * **Room for newcomers.** Parked streams never take the last eighth of a class's slots:
//!   those are kept for streams from addresses that hold no handshake yet, so an allowed
//!   peer arriving from its own address while a flood waits in the parking starts at once.
//! * **Evict only what stalls.** A newcomer may take the slot of a connection that has
//!   waited at least [`Admission::stall`] for its peer's next handshake message (silent, or
//!   not answering message 2), and only from an address holding at least two more slots
//!   than the newcomer's (fair share). A parked stream whose IK message 1 arrived
//!   ([`Admission::ready`]) may also take one from its own address when that is at its
//!   bound: an IK handshake ends with message 1 at the responder, so it can never stall
//!   a slot itself. A stream that has sent nothing, or an XX message 1 (which leaves the
//!   responder waiting for message 3), never does, so an attacker's sockets, re-opened as
//!   soon as they are evicted, cannot evict each other in a loop and keep every slot young.
//!   A handshake that progresses at network speed is never evicted.
//! * **Ready first.** Parked streams whose message 1 arrived start before silent ones, IK
//!   ones before XX ones.
//! * **Hold garbage.** A stream whose message 1 is garbage (a wrong mac1) is not closed at
//!   once, which would have its sender reconnect at once and keep the node accepting and
//!   closing at full speed: [`Admission::hold`] parks it for good, unread, never started,
//!   the first to go when parking is full, and closed when it expires like any parked
//!   stream. Its sender's sockets then cost what silent ones do.
//! * **Diffie-Hellman budget.** An address spends a token of a bucket
//!   (`stranger_handshake_rate`) before an unproven message 1 of its is processed, and gets
//!   it back when the handshake authenticates an allowed peer. Allowed crowds therefore
//!   never run dry; an address whose handshakes fail or stall is slowed to the bucket's
//!   rate, a listed one too (an attacker may share an allowed peer's address).
//! * **Proven first.** A message 1 that redeems a ticket ([`crate::guard`]) proves an
//!   allowed identity before any Diffie-Hellman: [`Admission::prove`] takes it out of the
//!   slots and the parking at once, so it waits behind no unproven stream, from its own
//!   address neither, and pays nothing. Tickets are single use and at most
//!   [`crate::guard::TICKETS_PER_PEER`] per peer are live, which bounds these.
//! * **Load.** While handshakes fill half the slots or streams wait parked,
//!   [`Admission::under_load`] says so: the driver then answers an unproven IK message 1
//!   with a cookie reply instead of Diffie-Hellman work.
//!
//! Sans-IO like the rest of the core: the driver owns the sockets and tasks, tells this
//! table what happens (`accept`, `progressed`, `admit`, `ended`, `handle_timeout`) and acts
//! on what it says (start, park, drop; the ids in [`Admission::poll_evicted`] to cut, the
//! ids in [`Admission::poll_start`] to start).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::endpoint::ConnId;
use crate::rate::Bucket;

/// Which budget a stream draws on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// From an address an allow-list entry lists.
    Listed,
    /// From anywhere else.
    Stranger,
}

/// What to do with a stream just accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Start its handshake now.
    Start,
    /// Hold it unread until [`Admission::poll_start`] names it (or it is evicted).
    Park,
    /// Close it: nothing can make room (too many streams wait already).
    Drop,
}

#[derive(Debug, Clone, Copy)]
struct Handshake {
    ip: IpAddr,
    class: Class,
    /// When it began waiting for its peer's next handshake message.
    waiting_since: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Parked {
    conn: ConnId,
    class: Class,
    since: Instant,
    /// Its message 1 arrived (the driver read it while it waited).
    ready: bool,
    /// That message 1 is IK's (it cannot stall the handshake at our end).
    ik: bool,
    /// Its message 1 was garbage: held until it expires, never started.
    held: bool,
}

/// The table of unauthenticated inbound connections. See the module docs.
#[derive(Debug)]
pub struct Admission {
    max_handshaking: usize,
    /// Slots of each class that parked streams leave to newcomers from fresh addresses.
    reserve: usize,
    per_ip: usize,
    max_parked: usize,
    handshake_timeout: Duration,
    stall: Duration,
    rate: crate::config::RateLimit,
    /// Handshakes in progress.
    running: BTreeMap<ConnId, Handshake>,
    /// Handshakes in progress per class and address.
    counts: BTreeMap<(Class, IpAddr), usize>,
    /// Per class, handshakes in progress.
    totals: BTreeMap<Class, usize>,
    /// Streams waiting for a slot, per address, oldest first.
    parked: BTreeMap<IpAddr, VecDeque<Parked>>,
    parked_len: usize,
    /// Evicted (or dropped from parking) and not yet cut by the driver.
    evicted: VecDeque<ConnId>,
    /// Evicted handshakes whose task has not ended: `admit` refuses them.
    cut: BTreeSet<ConnId>,
    /// Parked streams whose turn came.
    to_start: VecDeque<ConnId>,
    /// Diffie-Hellman budget per stranger address.
    buckets: BTreeMap<IpAddr, Bucket>,
    evictions: u64,
    proven: u64,
    held: u64,
    /// When [`Admission::handle_timeout`] last ran.
    checked_at: Option<Instant>,
}

/// At most this many stranger addresses keep a Diffie-Hellman bucket; past it, full
/// buckets (which say nothing) are forgotten first.
const MAX_BUCKETS: usize = 65_536;

impl Admission {
    /// A table with `config`'s budgets.
    pub fn new(config: &Config) -> Self {
        Self {
            max_handshaking: config.max_handshaking,
            reserve: (config.max_handshaking / 8).max(1),
            per_ip: config.max_handshaking_per_ip,
            max_parked: usize::try_from(config.listen_backlog).unwrap_or(usize::MAX),
            handshake_timeout: config.handshake_timeout,
            stall: Self::stall_for(config),
            // An address's handshakes in flight never wait for a token unless earlier
            // ones failed: the burst covers as many as it may run at once.
            rate: crate::config::RateLimit {
                burst: config
                    .stranger_handshake_rate
                    .burst
                    .max(u32::try_from(config.max_handshaking_per_ip).unwrap_or(u32::MAX)),
                per_second: config.stranger_handshake_rate.per_second,
            },
            running: BTreeMap::new(),
            counts: BTreeMap::new(),
            totals: BTreeMap::new(),
            parked: BTreeMap::new(),
            parked_len: 0,
            evicted: VecDeque::new(),
            cut: BTreeSet::new(),
            to_start: VecDeque::new(),
            buckets: BTreeMap::new(),
            evictions: 0,
            proven: 0,
            held: 0,
            checked_at: None,
        }
    }

    /// How long a handshake may wait for its peer's next message before a newcomer may
    /// take its slot: a tenth of `handshake_timeout` (500 ms by default), far beyond a
    /// round trip, far below the timeout that would end it anyway.
    pub fn stall_for(config: &Config) -> Duration {
        config.handshake_timeout / 10
    }

    /// How long a handshake may wait for its peer before a newcomer may take its slot.
    pub fn stall(&self) -> Duration {
        self.stall
    }

    /// Handshakes in progress.
    pub fn handshaking(&self) -> usize {
        self.running.len()
    }

    /// Streams waiting for a slot.
    pub fn parked(&self) -> usize {
        self.parked_len
    }

    /// Connections evicted (or parked streams dropped) to make room, since the start.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Input: the driver accepted `conn` from `ip`; `listed` if an allow-list entry lists
    /// that address. Evictions it made room with are in [`Admission::poll_evicted`].
    pub fn accept(&mut self, conn: ConnId, ip: IpAddr, listed: bool, now: Instant) -> Verdict {
        let class = if listed {
            Class::Listed
        } else {
            Class::Stranger
        };
        if self.has_room(class, ip, false) {
            self.start(conn, ip, class, now);
            return Verdict::Start;
        }
        if let Some(victim) = self.victim(class, ip, now, false) {
            self.evict(victim);
            self.start(conn, ip, class, now);
            return Verdict::Start;
        }
        if self.parked_len >= self.max_parked && !self.drop_a_parked(ip) {
            return Verdict::Drop;
        }
        self.parked.entry(ip).or_default().push_back(Parked {
            conn,
            class,
            since: now,
            ready: false,
            ik: false,
            held: false,
        });
        self.parked_len += 1;
        Verdict::Park
    }

    /// Input: a handshake message arrived on `conn`; its wait for the next begins anew.
    pub fn progressed(&mut self, conn: ConnId, now: Instant) {
        if let Some(h) = self.running.get_mut(&conn) {
            h.waiting_since = now;
        }
    }

    /// Input (the connection's task): the handshake of `conn` authenticated an allowed
    /// peer. False if `conn` was evicted meanwhile: then the task must end without
    /// announcing the connection. A stranger address gets its Diffie-Hellman token back.
    pub fn admit(&mut self, conn: ConnId, now: Instant) -> bool {
        if self.cut.contains(&conn) {
            return false;
        }
        if let Some(h) = self.release(conn) {
            if h.class == Class::Stranger {
                self.refund(h.ip, now);
            }
            self.fill_slots(now);
        }
        true
    }

    /// Input (the connection's task): message 1 of the parked stream `conn` arrived, and
    /// does not prove a ticket; `ik` if it is an IK message 1. True if its handshake starts
    /// now (room, or the slot of a stalled handshake, of its own address too if `ik`);
    /// false if it waits for [`Admission::poll_start`], ahead of the silent parked streams
    /// (and an IK one ahead of XX ones). True as well if it is not parked (it started
    /// meanwhile).
    pub fn ready(&mut self, conn: ConnId, ik: bool, now: Instant) -> bool {
        let Some((ip, class)) = self.parked.iter_mut().find_map(|(ip, q)| {
            let p = q.iter_mut().find(|p| p.conn == conn)?;
            p.ready = true;
            p.ik = ik;
            Some((*ip, p.class))
        }) else {
            return !self.cut.contains(&conn);
        };
        let victim = if self.has_room(class, ip, false) {
            None
        } else {
            match self.victim(class, ip, now, ik) {
                Some(victim) => Some(victim),
                None => return false,
            }
        };
        if let Some(victim) = victim {
            self.evict(victim);
        }
        self.unpark(conn);
        self.start(conn, ip, class, now);
        true
    }

    /// Input (the connection's task): message 1 of `conn` was garbage. It leaves its slot
    /// (or parking place) and is held, parked for good, until it expires or parking needs
    /// room; the driver keeps the stream open, unread, until [`Admission::poll_evicted`]
    /// names it (or its sender closes it).
    pub fn hold(&mut self, conn: ConnId, now: Instant) {
        let (ip, class) = if let Some(h) = self.release(conn) {
            self.fill_slots(now);
            (h.ip, h.class)
        } else if let Some(found) = self
            .parked
            .iter()
            .find_map(|(ip, q)| q.iter().find(|p| p.conn == conn).map(|p| (*ip, p.class)))
        {
            self.unpark(conn);
            found
        } else {
            return;
        };
        self.held += 1;
        if self.parked_len >= self.max_parked && !self.drop_oldest_held() {
            // Parking is full of streams that may yet be good: close this one.
            self.evicted.push_back(conn);
            return;
        }
        self.parked.entry(ip).or_default().push_back(Parked {
            conn,
            class,
            since: now,
            ready: false,
            ik: false,
            held: true,
        });
        self.parked_len += 1;
    }

    /// Streams held for a garbage message 1, since the start.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Input (the connection's task): message 1 of `conn` redeemed a ticket. It leaves its
    /// slot or its parking place for good: it waits for nothing, is never evicted, and
    /// pays no token. False if it was evicted meanwhile (the task must end).
    pub fn prove(&mut self, conn: ConnId, now: Instant) -> bool {
        if self.cut.contains(&conn) {
            return false;
        }
        self.proven += 1;
        if self.release(conn).is_some() {
            self.fill_slots(now);
            return true;
        }
        self.unpark(conn);
        true
    }

    /// Whether the driver should ask unproven IK dialers for a cookie before any
    /// Diffie-Hellman: streams wait parked for a slot (held garbage does not count: a port
    /// scanner's probe must not cost every first contact a round trip), or handshakes fill
    /// half the slots of a class.
    pub fn under_load(&self) -> bool {
        self.totals.values().any(|n| 2 * n >= self.max_handshaking)
            || self.parked.values().flatten().any(|p| !p.held)
    }

    /// Whether `conn` waits parked for a slot.
    pub fn is_parked(&self, conn: ConnId) -> bool {
        self.parked
            .values()
            .any(|q| q.iter().any(|p| p.conn == conn))
    }

    /// Message 1s that proved an allowed identity by a ticket, since the start.
    pub fn proven(&self) -> u64 {
        self.proven
    }

    /// Input: `conn`'s task ended (its handshake failed, timed out, or was cut), or a parked
    /// stream was closed. Frees what it held.
    pub fn ended(&mut self, conn: ConnId, now: Instant) {
        self.cut.remove(&conn);
        if self.release(conn).is_some() {
            self.fill_slots(now);
            return;
        }
        self.unpark(conn);
    }

    fn unpark(&mut self, conn: ConnId) {
        for queue in self.parked.values_mut() {
            if let Some(i) = queue.iter().position(|p| p.conn == conn) {
                queue.remove(i);
                self.parked_len -= 1;
                break;
            }
        }
        self.parked.retain(|_, q| !q.is_empty());
    }

    /// Input: time passed; parked streams older than `handshake_timeout` are dropped (their
    /// dialers gave up by now).
    pub fn handle_timeout(&mut self, now: Instant) {
        let timeout = self.handshake_timeout;
        let mut expired = Vec::new();
        for queue in self.parked.values_mut() {
            while queue
                .front()
                .is_some_and(|p| now.saturating_duration_since(p.since) >= timeout)
            {
                if let Some(p) = queue.pop_front() {
                    expired.push(p.conn);
                }
            }
        }
        self.parked.retain(|_, q| !q.is_empty());
        self.parked_len -= expired.len();
        self.evicted.extend(expired);
        self.checked_at = Some(now);
        self.promote(now);
    }

    /// Parked streams whose IK message 1 arrived take the slots of handshakes that have
    /// stalled since (the timer of [`Admission::poll_timeout`] wakes the driver when one
    /// does), oldest first: without it such a stream could wait for a slot to free by
    /// itself, a whole `handshake_timeout`, behind an attacker's stalled XX handshakes.
    fn promote(&mut self, now: Instant) {
        loop {
            let next = self
                .parked
                .iter()
                .filter_map(|(ip, q)| q.iter().find(|p| p.ready && p.ik).map(|p| (*ip, *p)))
                .min_by_key(|(_, p)| (p.class, p.since, p.conn));
            let Some((ip, p)) = next else {
                return;
            };
            if !self.has_room(p.class, ip, true) {
                let Some(victim) = self.victim(p.class, ip, now, true) else {
                    return;
                };
                self.evict(victim);
            }
            self.unpark(p.conn);
            self.start(p.conn, ip, p.class, now);
            self.to_start.push_back(p.conn);
        }
    }

    /// Input (the connection's task, before it processes an unproven message 1): the
    /// handshake takes a Diffie-Hellman token of its address's bucket, or learns how long
    /// until one refills.
    pub fn take_dh(&mut self, conn: ConnId, now: Instant) -> Result<(), Duration> {
        let Some(h) = self.running.get(&conn) else {
            // Not (or no longer) a handshake of this table: nothing to charge.
            return Ok(());
        };
        let ip = h.ip;
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= MAX_BUCKETS {
            self.forget_full_buckets(now);
        }
        let rate = self.rate;
        self.buckets
            .entry(ip)
            .or_insert_with(|| Bucket::full(rate, now))
            .take(rate, now)
    }

    /// Output: the next connection to cut (a handshake's task to abort, or a parked stream
    /// to close). The driver calls [`Admission::ended`] for it once it is gone.
    pub fn poll_evicted(&mut self) -> Option<ConnId> {
        self.evicted.pop_front()
    }

    /// Output: the next parked stream whose handshake may start now.
    pub fn poll_start(&mut self) -> Option<ConnId> {
        self.to_start.pop_front()
    }

    /// Output: when [`Admission::handle_timeout`] has parked streams to drop.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let expiry = self
            .parked
            .values()
            .filter_map(|q| q.front())
            .map(|p| p.since + self.handshake_timeout)
            .min();
        // When a running handshake stalls, a parked IK stream may take its slot; only
        // instants after the last check, so a stall no one may take never spins the timer.
        let stall = if self.parked.values().flatten().any(|p| p.ready && p.ik) {
            self.running
                .values()
                .map(|h| h.waiting_since + self.stall)
                .filter(|at| self.checked_at.is_none_or(|checked| *at > checked))
                .min()
        } else {
            None
        };
        expiry.into_iter().chain(stall).min()
    }

    // ----- helpers -----

    /// Whether a stream from `ip` may start now. A parked one (`parked`) leaves the
    /// reserve alone; a newcomer may use it only if its address holds no handshake yet.
    fn has_room(&self, class: Class, ip: IpAddr, parked: bool) -> bool {
        let total = self.totals.get(&class).copied().unwrap_or(0);
        let own = self.count(class, ip);
        let limit = if parked || own > 0 {
            self.max_handshaking.saturating_sub(self.reserve).max(1)
        } else {
            self.max_handshaking
        };
        total < limit && own < self.per_ip
    }

    fn count(&self, class: Class, ip: IpAddr) -> usize {
        self.counts.get(&(class, ip)).copied().unwrap_or(0)
    }

    fn start(&mut self, conn: ConnId, ip: IpAddr, class: Class, now: Instant) {
        self.running.insert(
            conn,
            Handshake {
                ip,
                class,
                waiting_since: now,
            },
        );
        *self.counts.entry((class, ip)).or_default() += 1;
        *self.totals.entry(class).or_default() += 1;
    }

    fn release(&mut self, conn: ConnId) -> Option<Handshake> {
        let h = self.running.remove(&conn)?;
        if let Some(n) = self.counts.get_mut(&(h.class, h.ip)) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&(h.class, h.ip));
            }
        }
        if let Some(n) = self.totals.get_mut(&h.class) {
            *n -= 1;
        }
        Some(h)
    }

    fn evict(&mut self, conn: ConnId) {
        if self.release(conn).is_some() {
            self.cut.insert(conn);
            self.evicted.push_back(conn);
            self.evictions += 1;
        }
    }

    /// A stalled handshake of `class` whose slot a newcomer from `ip` may take: from its
    /// own address when that is at its bound and the newcomer sent an IK message 1
    /// (`own_ok`), otherwise from the address holding the most (at least two more than the
    /// newcomer's). The one that waited longest goes.
    fn victim(&self, class: Class, ip: IpAddr, now: Instant, own_ok: bool) -> Option<ConnId> {
        let own = self.count(class, ip);
        let from = if own >= self.per_ip {
            if !own_ok {
                return None;
            }
            ip
        } else {
            let (&(_, busiest), &most) = self
                .counts
                .iter()
                .filter(|((c, _), _)| *c == class)
                .max_by_key(|(key, n)| (**n, std::cmp::Reverse(key.1)))?;
            if most < own + 2 {
                return None;
            }
            busiest
        };
        self.running
            .iter()
            .filter(|(_, h)| h.class == class && h.ip == from)
            .filter(|(_, h)| now.saturating_duration_since(h.waiting_since) >= self.stall)
            .min_by_key(|(conn, h)| (h.waiting_since, **conn))
            .map(|(conn, _)| *conn)
    }

    /// Parking is full: drops the oldest parked stream of the address with the most parked,
    /// if that address has more parked than `ip`. False if none qualifies.
    /// Parking is full: closes the held stream that was held longest. False if none is.
    fn drop_oldest_held(&mut self) -> bool {
        let oldest = self
            .parked
            .values()
            .flat_map(|q| q.iter().filter(|p| p.held))
            .min_by_key(|p| (p.since, p.conn))
            .map(|p| p.conn);
        let Some(conn) = oldest else {
            return false;
        };
        self.unpark(conn);
        self.evicted.push_back(conn);
        self.evictions += 1;
        true
    }

    fn drop_a_parked(&mut self, ip: IpAddr) -> bool {
        let own = self.parked.get(&ip).map_or(0, VecDeque::len);
        let Some((&busiest, queue)) = self
            .parked
            .iter_mut()
            .max_by_key(|(addr, q)| (q.len(), std::cmp::Reverse(**addr)))
        else {
            return false;
        };
        if queue.len() <= own {
            return false;
        }
        // A held stream goes first: it has shown it is garbage.
        let at = queue.iter().position(|p| p.held).unwrap_or(0);
        let Some(dropped) = queue.remove(at) else {
            return false;
        };
        if queue.is_empty() {
            self.parked.remove(&busiest);
        }
        self.parked_len -= 1;
        self.evicted.push_back(dropped.conn);
        self.evictions += 1;
        true
    }

    /// Starts parked streams while there is room: listed addresses first, then streams
    /// whose message 1 arrived, then the address with the fewest handshakes, then the
    /// oldest stream.
    fn fill_slots(&mut self, now: Instant) {
        loop {
            let next = self
                .parked
                .iter()
                .flat_map(|(ip, q)| {
                    // An address's oldest ready IK stream, its oldest ready stream and its
                    // oldest one not held.
                    let ik = q.iter().find(|p| p.ready && p.ik);
                    let ready = q.iter().find(|p| p.ready);
                    let oldest = q.iter().find(|p| !p.held);
                    ik.into_iter().chain(ready).chain(oldest).map(|p| (*ip, *p))
                })
                .filter(|(ip, p)| self.has_room(p.class, *ip, true))
                .min_by_key(|(ip, p)| {
                    (
                        p.class,
                        !p.ready,
                        !p.ik,
                        self.count(p.class, *ip),
                        p.since,
                        p.conn,
                    )
                });
            let Some((ip, p)) = next else {
                return;
            };
            self.unpark(p.conn);
            self.start(p.conn, ip, p.class, now);
            self.to_start.push_back(p.conn);
        }
    }

    fn refund(&mut self, ip: IpAddr, now: Instant) {
        if let Some(bucket) = self.buckets.get_mut(&ip) {
            bucket.give_back(self.rate, now);
        }
    }

    fn forget_full_buckets(&mut self, now: Instant) {
        let rate = self.rate;
        self.buckets.retain(|_, b| !b.is_full(rate, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimit;

    /// Five slots a class, the last kept for fresh addresses; two per address; sixteen
    /// parking places.
    fn config() -> Config {
        Config {
            max_handshaking: 5,
            max_handshaking_per_ip: 2,
            listen_backlog: 16,
            handshake_timeout: Duration::from_secs(5),
            stranger_handshake_rate: RateLimit {
                burst: 2,
                per_second: 1,
            },
            ..Config::default()
        }
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    fn conn(n: u64) -> ConnId {
        ConnId::inbound(n)
    }

    fn drain(table: &mut Admission) -> (Vec<ConnId>, Vec<ConnId>) {
        let evicted = std::iter::from_fn(|| table.poll_evicted()).collect();
        let started = std::iter::from_fn(|| table.poll_start()).collect();
        (evicted, started)
    }

    /// Starts `streams` (conn, address) as strangers at `now`, each of which must start.
    fn fill(table: &mut Admission, streams: &[(u64, u8)], now: Instant) {
        for &(n, a) in streams {
            assert_eq!(
                table.accept(conn(n), ip(a), false, now),
                Verdict::Start,
                "{n}"
            );
        }
    }

    #[test]
    fn a_listed_address_has_slots_strangers_cannot_take() {
        let t0 = Instant::now();
        let mut table = Admission::new(&config());
        fill(&mut table, &[(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)], t0);
        // The allowed peer's listed address starts at once, with no eviction.
        assert_eq!(table.accept(conn(9), ip(9), true, t0), Verdict::Start);
        assert_eq!(drain(&mut table), (vec![], vec![]));
        // Listed slots fill too, and strangers still cannot take them, stalled or not.
        assert_eq!(table.accept(conn(10), ip(9), true, t0), Verdict::Start);
        let later = t0 + Duration::from_secs(2);
        assert_eq!(table.accept(conn(11), ip(7), false, later), Verdict::Start);
        let (evicted, _) = drain(&mut table);
        assert_eq!(evicted, vec![conn(1)], "a stalled stranger made room");
    }

    #[test]
    fn a_crowd_on_one_address_waits_its_turn_and_is_never_evicted() {
        let t0 = Instant::now();
        let mut table = Admission::new(&config());
        fill(&mut table, &[(1, 1), (2, 1)], t0);
        // The address is at its bound and its handshakes progress: later ones park.
        for n in 3..=6 {
            assert_eq!(table.accept(conn(n), ip(1), false, t0), Verdict::Park);
        }
        assert_eq!(table.parked(), 4);
        // Progress keeps a handshake safe, even when it is old.
        let t1 = t0 + Duration::from_secs(2);
        table.progressed(conn(1), t1);
        table.progressed(conn(2), t1);
        assert_eq!(table.accept(conn(7), ip(1), false, t1), Verdict::Park);
        assert_eq!(drain(&mut table), (vec![], vec![]));
        // One authenticates: the oldest parked starts in its slot.
        assert!(table.admit(conn(1), t1));
        assert_eq!(drain(&mut table), (vec![], vec![conn(3)]));
        table.ended(conn(2), t1);
        assert_eq!(drain(&mut table), (vec![], vec![conn(4)]));
        assert_eq!(table.handshaking(), 2);
        assert_eq!(table.evictions(), 0);
    }

    #[test]
    fn a_newcomer_takes_a_stalled_slot_of_the_busiest_address_only() {
        let t0 = Instant::now();
        let mut table = Admission::new(&config());
        fill(&mut table, &[(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)], t0);
        // Full. A newcomer from a fresh address: 10.0.0.1 holds two more than it, but
        // nothing has stalled yet, so it parks.
        assert_eq!(table.accept(conn(6), ip(4), false, t0), Verdict::Park);
        // Once they stall, a newcomer takes the slot that waited longest.
        let late = t0 + table.stall();
        table.progressed(conn(1), late);
        assert_eq!(table.accept(conn(7), ip(5), false, late), Verdict::Start);
        assert_eq!(
            drain(&mut table).0,
            vec![conn(2)],
            "the silent one, not conn 1"
        );
        assert!(
            !table.admit(conn(2), late),
            "an evicted handshake is not admitted"
        );
        // Fair share: no address holds two more than 10.0.0.3's one: it parks.
        assert_eq!(table.accept(conn(8), ip(3), false, late), Verdict::Park);
        assert_eq!(drain(&mut table).0, Vec::<ConnId>::new());
        // An address at its own bound: a newcomer that has sent nothing parks (a silent
        // flood re-opened as fast as it is evicted must not evict itself in a loop); once
        // its message 1 arrives, it replaces the address's own stalled handshake, ahead
        // of the streams parked before it.
        assert_eq!(table.accept(conn(9), ip(2), false, late), Verdict::Park);
        assert_eq!(drain(&mut table).0, Vec::<ConnId>::new());
        assert!(table.ready(conn(9), true, late));
        assert_eq!(drain(&mut table), (vec![conn(3)], vec![]));
        assert!(!table.is_parked(conn(9)));
        assert!(table.ready(conn(9), true, late), "started already");
        assert!(!table.ready(conn(3), true, late), "evicted");
    }

    #[test]
    fn parked_streams_whose_message_1_arrived_start_before_silent_ones() {
        let t0 = Instant::now();
        let mut table = Admission::new(&config());
        fill(&mut table, &[(1, 1), (2, 1)], t0);
        for n in 3..=5 {
            assert_eq!(table.accept(conn(n), ip(1), false, t0), Verdict::Park);
        }
        // Conn 5's message 1 arrives; no stalled handshake to replace yet: it waits,
        // first in line.
        assert!(!table.ready(conn(5), false, t0));
        table.ended(conn(1), t0);
        assert_eq!(drain(&mut table), (vec![], vec![conn(5)]));
        // Then the oldest silent one.
        table.ended(conn(2), t0);
        assert_eq!(drain(&mut table), (vec![], vec![conn(3)]));
    }

    #[test]
    fn parked_streams_start_fairly_leave_room_for_newcomers_and_expire() {
        let t0 = Instant::now();
        let mut table = Admission::new(&config());
        fill(&mut table, &[(1, 1), (2, 2), (3, 2), (4, 3)], t0);
        // Four of five: the last slot is for an address that holds none. 10.0.0.1 holds
        // one, so its next stream parks; then a stream of 10.0.0.4 takes the reserve.
        let t1 = t0 + Duration::from_millis(1);
        assert_eq!(table.accept(conn(5), ip(1), false, t0), Verdict::Park);
        assert_eq!(table.accept(conn(6), ip(4), false, t1), Verdict::Start);
        assert_eq!(table.accept(conn(7), ip(5), false, t1), Verdict::Park);
        // Two slots free: parked streams fill up to four, the address with the fewest
        // handshakes first (10.0.0.5, younger than 10.0.0.1's).
        table.ended(conn(2), t1);
        table.ended(conn(3), t1);
        assert_eq!(drain(&mut table).1, vec![conn(7)]);
        assert_eq!(table.handshaking(), 4);
        // The other waits for its turn, and gives up with its dialer.
        assert_eq!(table.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        table.handle_timeout(t0 + Duration::from_secs(5));
        assert_eq!(drain(&mut table).0, vec![conn(5)]);
        assert_eq!((table.parked(), table.poll_timeout()), (0, None));
    }

    #[test]
    fn when_parking_is_full_the_busiest_address_gives_way() {
        let t0 = Instant::now();
        let mut table = Admission::new(&config());
        fill(&mut table, &[(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)], t0);
        // Sixteen parking places (listen_backlog), all taken by 10.0.0.1.
        for n in 10..26 {
            assert_eq!(table.accept(conn(n), ip(1), false, t0), Verdict::Park);
        }
        // Another of its streams cannot get in; one from elsewhere takes its oldest place.
        assert_eq!(table.accept(conn(30), ip(1), false, t0), Verdict::Drop);
        assert_eq!(table.accept(conn(31), ip(5), false, t0), Verdict::Park);
        assert_eq!(drain(&mut table).0, vec![conn(10)]);
        assert_eq!(table.parked(), 16);
    }

    #[test]
    fn strangers_pay_for_their_handshakes_and_allowed_peers_get_it_back() {
        let t0 = Instant::now();
        let mut table = Admission::new(&config());
        fill(&mut table, &[(1, 1), (2, 1)], t0);
        table.accept(conn(3), ip(2), true, t0);
        // Burst 2 for 10.0.0.1, then one a second.
        assert_eq!(table.take_dh(conn(1), t0), Ok(()));
        assert_eq!(table.take_dh(conn(2), t0), Ok(()));
        table.ended(conn(1), t0);
        fill(&mut table, &[(4, 1)], t0);
        assert_eq!(table.take_dh(conn(4), t0), Err(Duration::from_secs(1)));
        // An allowed peer's handshake from there authenticates: its token comes back.
        assert!(table.admit(conn(2), t0));
        assert_eq!(table.take_dh(conn(4), t0), Ok(()));
        // A listed address pays too (an attacker may share it), within its own bucket.
        assert_eq!(table.take_dh(conn(3), t0), Ok(()));
        assert_eq!(table.take_dh(conn(3), t0), Ok(()));
        assert!(table.take_dh(conn(3), t0).is_err());
    }

    #[test]
    fn a_parked_ik_stream_takes_the_slot_of_a_handshake_as_soon_as_it_stalls() {
        let t0 = Instant::now();
        let mut table = Admission::new(&config());
        fill(&mut table, &[(1, 1), (2, 1)], t0);
        assert_eq!(table.accept(conn(5), ip(1), false, t0), Verdict::Park);
        assert_eq!(table.accept(conn(6), ip(1), false, t0), Verdict::Park);
        // An XX message 1 and an IK one arrive; nothing has stalled yet: both wait.
        assert!(!table.ready(conn(6), false, t0));
        assert!(!table.ready(conn(5), true, t0));
        // The timer is set for when the first running handshake stalls, not for the
        // parked streams' expiry.
        let stalls = t0 + table.stall();
        assert_eq!(table.poll_timeout(), Some(stalls));
        table.handle_timeout(stalls);
        assert_eq!(drain(&mut table), (vec![conn(1)], vec![conn(5)]));
        // The XX one is never promoted over a stalled handshake of its own address: it
        // waits for a slot to free, or its expiry.
        let later = stalls + table.stall();
        assert_eq!(table.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        table.handle_timeout(later);
        assert_eq!(drain(&mut table), (vec![], vec![]));
        assert!(table.is_parked(conn(6)));
    }

    #[test]
    fn a_parked_stream_may_be_held_too_and_half_the_slots_busy_is_load() {
        let t0 = Instant::now();
        let mut table = Admission::new(&config());
        fill(&mut table, &[(1, 1), (2, 1)], t0);
        assert_eq!(table.accept(conn(3), ip(1), false, t0), Verdict::Park);
        assert_eq!(table.accept(conn(4), ip(1), false, t0), Verdict::Park);
        // Garbage from a parked stream: still parked, now held, never started.
        table.hold(conn(4), t0);
        table.hold(conn(3), t0);
        assert_eq!((table.parked(), table.held()), (2, 2));
        table.ended(conn(1), t0);
        assert_eq!(drain(&mut table), (vec![], vec![]));
        // Load is half of `max_handshaking`: with eight slots, four busy.
        let eight = Config {
            max_handshaking: 8,
            max_handshaking_per_ip: 8,
            ..config()
        };
        let mut busy = Admission::new(&eight);
        fill(&mut busy, &[(1, 1), (2, 2), (3, 3)], t0);
        assert!(!busy.under_load());
        fill(&mut busy, &[(4, 4)], t0);
        assert!(busy.under_load());
    }

    #[test]
    fn ik_ready_before_xx_ready_and_a_stall_no_one_may_take_does_not_wake_the_timer_again() {
        let t0 = Instant::now();
        let mut table = Admission::new(&config());
        fill(&mut table, &[(1, 1), (2, 1)], t0);
        for n in 3..=5 {
            assert_eq!(table.accept(conn(n), ip(1), false, t0), Verdict::Park);
        }
        // The oldest sent XX, the next nothing, the youngest IK: a freed slot goes to IK.
        assert!(!table.ready(conn(3), false, t0));
        let t1 = t0 + Duration::from_millis(1);
        assert!(!table.ready(conn(5), true, t1));
        table.ended(conn(1), t1);
        assert_eq!(drain(&mut table), (vec![], vec![conn(5)]));
        table.ended(conn(2), t1);
        assert_eq!(drain(&mut table), (vec![], vec![conn(3)]));

        // Five addresses hold a slot each (full); a parked IK stream from a sixth may take
        // none of theirs (each holds one, not two more than its none): when they stall the
        // timer wakes once, finds nothing it may do, and is next set for the expiry.
        let mut full = Admission::new(&config());
        fill(&mut full, &[(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)], t0);
        assert_eq!(full.accept(conn(6), ip(6), false, t0), Verdict::Park);
        assert!(!full.ready(conn(6), true, t0));
        let stalls = t0 + full.stall();
        assert_eq!(full.poll_timeout(), Some(stalls));
        full.handle_timeout(stalls);
        assert_eq!(drain(&mut full), (vec![], vec![]));
        assert_eq!(full.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        // A handshake that progressed stalls anew later: the timer is set for that.
        full.progressed(conn(1), stalls);
        assert_eq!(full.poll_timeout(), Some(stalls + full.stall()));
    }

    #[test]
    fn garbage_is_held_parked_never_started_and_the_first_to_go() {
        let t0 = Instant::now();
        let mut table = Admission::new(&config());
        // Four of five slots: the last is kept for fresh addresses.
        fill(&mut table, &[(1, 1), (2, 2), (3, 2), (4, 3)], t0);
        assert_eq!(table.accept(conn(5), ip(1), false, t0), Verdict::Park);
        // Conn 1's message 1 is garbage: it leaves its slot (conn 5 takes it) and is held.
        table.hold(conn(1), t0);
        assert_eq!(drain(&mut table), (vec![], vec![conn(5)]));
        assert!(table.is_parked(conn(1)));
        assert_eq!((table.parked(), table.held()), (1, 1));
        // Held garbage is no load, and no slot ever goes to it.
        let mut quiet = Admission::new(&config());
        quiet.accept(conn(9), ip(9), false, t0);
        quiet.hold(conn(9), t0);
        assert!(!quiet.under_load(), "a scanner's probe made a load");
        table.ended(conn(2), t0);
        assert_eq!(drain(&mut table), (vec![], vec![]));
        // It goes when it expires, as any parked stream.
        table.handle_timeout(t0 + Duration::from_secs(5));
        assert_eq!(drain(&mut table), (vec![conn(1)], vec![]));
        assert_eq!(table.parked(), 0);
        // Parking full: the held one goes first, not the newcomer; none held, the garbage
        // itself is closed.
        let mut full = Admission::new(&config());
        fill(&mut full, &[(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)], t0);
        // From 10.0.0.2, at its bound: none of them starts when a slot frees.
        for n in 10..25 {
            assert_eq!(full.accept(conn(n), ip(2), false, t0), Verdict::Park);
        }
        full.hold(conn(1), t0);
        assert_eq!(full.parked(), 16);
        let before = full.evictions();
        full.hold(conn(2), t0);
        assert_eq!(drain(&mut full).0, vec![conn(1)], "the older held one goes");
        assert_eq!(full.evictions(), before + 1);
        assert!(full.is_parked(conn(2)));
        let mut none_held = Admission::new(&config());
        fill(
            &mut none_held,
            &[(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)],
            t0,
        );
        for n in 10..26 {
            assert_eq!(none_held.accept(conn(n), ip(2), false, t0), Verdict::Park);
        }
        none_held.hold(conn(1), t0);
        assert_eq!(drain(&mut none_held).0, vec![conn(1)]);
        assert_eq!(none_held.parked(), 16);
    }

    #[test]
    fn a_proven_handshake_leaves_its_slot_or_parking_place_and_is_never_evicted() {
        let t0 = Instant::now();
        let mut table = Admission::new(&config());
        fill(&mut table, &[(1, 1), (2, 1)], t0);
        assert!(!table.under_load());
        for n in 3..=5 {
            assert_eq!(table.accept(conn(n), ip(1), false, t0), Verdict::Park);
        }
        assert!(table.under_load());
        assert!(table.is_parked(conn(4)));
        // A parked stream's message 1 redeems a ticket: it starts ahead of the older ones,
        // in no slot.
        assert!(table.prove(conn(4), t0));
        assert!(!table.is_parked(conn(4)));
        assert_eq!((table.parked(), table.handshaking()), (2, 2));
        // One in a slot proves itself: its slot goes to the oldest parked stream.
        assert!(table.prove(conn(1), t0));
        assert_eq!(drain(&mut table), (vec![], vec![conn(3)]));
        // Neither can be chosen as a victim, stalled or not; both are admitted.
        let late = t0 + table.stall() * 2;
        assert_eq!(table.accept(conn(9), ip(1), false, late), Verdict::Park);
        assert!(table.ready(conn(9), true, late));
        let (evicted, _) = drain(&mut table);
        assert!(
            !evicted.contains(&conn(1)) && !evicted.contains(&conn(4)),
            "{evicted:?}"
        );
        assert!(table.admit(conn(1), late) && table.admit(conn(4), late));
        // An evicted handshake cannot prove itself afterwards.
        assert!(!table.prove(evicted[0], late));
        assert_eq!(table.proven(), 2);
        // Half the slots of a class busy is load too.
        let mut busy = Admission::new(&config());
        fill(&mut busy, &[(1, 1), (2, 2)], t0);
        assert!(!busy.under_load());
        fill(&mut busy, &[(3, 3)], t0);
        assert!(busy.under_load());
    }

    #[test]
    fn the_victim_is_the_busiest_addresss_own_stalled_handshake_and_evictions_are_counted() {
        let t0 = Instant::now();
        let mut table = Admission::new(&config());
        // 10.0.0.2's lone handshake has waited longest, but 10.0.0.1 holds the most.
        fill(&mut table, &[(1, 2)], t0);
        let t1 = t0 + Duration::from_millis(10);
        fill(&mut table, &[(2, 1), (3, 1), (4, 3), (5, 4)], t1);
        let late = t1 + table.stall();
        assert_eq!(table.accept(conn(6), ip(6), false, late), Verdict::Start);
        assert_eq!(drain(&mut table).0, vec![conn(2)]);
        assert_eq!(table.evictions(), 1);
        // Parked streams dropped for room count too.
        let mut small = Admission::new(&Config {
            listen_backlog: 1,
            ..config()
        });
        fill(&mut small, &[(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)], t0);
        assert_eq!(small.accept(conn(6), ip(1), false, t0), Verdict::Park);
        assert_eq!(small.accept(conn(7), ip(1), false, t0), Verdict::Drop);
        assert_eq!(small.evictions(), 0);
        assert_eq!(small.accept(conn(8), ip(4), false, t0), Verdict::Park);
        assert_eq!(drain(&mut small).0, vec![conn(6)]);
        assert_eq!(small.evictions(), 1);
    }

    #[test]
    fn a_parked_stream_that_closes_frees_its_place_and_never_starts() {
        let t0 = Instant::now();
        let mut table = Admission::new(&config());
        fill(&mut table, &[(1, 1), (2, 1)], t0);
        assert_eq!(table.accept(conn(3), ip(1), false, t0), Verdict::Park);
        assert_eq!(table.accept(conn(4), ip(1), false, t0), Verdict::Park);
        table.ended(conn(3), t0);
        assert_eq!(table.parked(), 1);
        table.ended(conn(1), t0);
        assert_eq!(drain(&mut table).1, vec![conn(4)], "the one still parked");
        assert_eq!(table.parked(), 0);
    }

    #[test]
    fn expiry_drops_only_the_streams_that_waited_too_long() {
        let t0 = Instant::now();
        let mut table = Admission::new(&config());
        fill(&mut table, &[(1, 1), (2, 1)], t0);
        table.accept(conn(3), ip(1), false, t0);
        let t1 = t0 + Duration::from_secs(3);
        // Its handshakes progress, so the address's next stream waits too.
        table.progressed(conn(1), t1);
        table.progressed(conn(2), t1);
        assert_eq!(table.accept(conn(4), ip(1), false, t1), Verdict::Park);
        table.handle_timeout(t0 + Duration::from_secs(5));
        assert_eq!(drain(&mut table).0, vec![conn(3)]);
        assert_eq!(table.parked(), 1);
        assert_eq!(table.poll_timeout(), Some(t1 + Duration::from_secs(5)));
        table.ended(conn(1), t1);
        assert_eq!(drain(&mut table).1, vec![conn(4)]);
    }

    #[test]
    fn buckets_of_many_addresses_are_bounded_by_forgetting_full_ones() {
        let t0 = Instant::now();
        let mut table = Admission::new(&config());
        // One address spent its tokens; then as many others as there may be buckets.
        fill(&mut table, &[(1, 1), (2, 1)], t0);
        table.take_dh(conn(1), t0).unwrap();
        table.take_dh(conn(2), t0).unwrap();
        table.ended(conn(1), t0);
        table.ended(conn(2), t0);
        for n in 0..MAX_BUCKETS as u64 {
            let addr = IpAddr::from([10, (n >> 16) as u8 + 1, (n >> 8) as u8, n as u8]);
            assert_eq!(table.accept(conn(100 + n), addr, false, t0), Verdict::Start);
            assert_eq!(table.take_dh(conn(100 + n), t0), Ok(()));
            table.admit(conn(100 + n), t0);
        }
        assert!(
            table.buckets.len() <= MAX_BUCKETS,
            "{}",
            table.buckets.len()
        );
        // Full buckets went; the spent one stayed, so 10.0.0.1 still waits.
        fill(&mut table, &[(3, 1)], t0);
        assert!(table.take_dh(conn(3), t0).is_err());
    }

    #[test]
    fn an_address_may_run_its_whole_bound_of_handshakes_without_waiting_for_tokens() {
        // A bucket smaller than the per-address bound would make a crowd's handshakes in
        // flight wait for tokens their successes give back only later.
        let t0 = Instant::now();
        let mut table = Admission::new(&Config {
            max_handshaking: 100,
            max_handshaking_per_ip: 40,
            ..config()
        });
        for n in 1..=40 {
            assert_eq!(table.accept(conn(n), ip(1), false, t0), Verdict::Start);
            assert_eq!(table.take_dh(conn(n), t0), Ok(()), "handshake {n}");
        }
    }
}
