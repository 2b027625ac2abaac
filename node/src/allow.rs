//! The allow list of a serving node, kept in step with its file and with the expiry of its
//! entries.
//!
//! The file is read every `allow_reload_interval`; a change is applied once two reads in a
//! row agree (so a file caught half-written by an editor is not applied, nor reported), and
//! at once on SIGHUP. A new file that does not parse is reported and the list in force
//! stays. Expiries are applied as they come: an expired entry is treated as removed. Each
//! change reaches the handler as a whole new list ([`P2pHandler::set_allow_list`]), which
//! disconnects removed peers and fails their exchanges with the payload back.
//!
//! With `--membership FILE` the file is a signed membership document instead: the handler
//! starts from it, and a changed file is *offered* ([`P2pHandler::offer_membership`]): a
//! newer epoch signed by the committee is applied (and spread to every member by the
//! nodes themselves), anything else is refused and logged, and the node keeps its epoch.
//! Member expiry is then the handler's business, not this file's.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use p2p_handler::membership::Signed;
use p2p_handler::{AllowList, HandlerError, P2pHandler, PeerId};

use crate::metrics::{AllowReport, reloaded};

/// Where the list comes from.
#[derive(Debug, Clone)]
pub(crate) enum AllowSource {
    /// A file, watched.
    File(PathBuf),
    /// Any authenticated peer (`--allow-any-peer-insecure`).
    AnyPeerInsecure,
    /// A signed membership document, watched (`--membership`).
    Membership(PathBuf),
}

/// The list in force and what it came from.
pub(crate) struct AllowFile {
    path: Option<PathBuf>,
    /// The file's text as last applied (or found invalid), to notice changes.
    text: String,
    /// A changed text seen once, applied when the next read agrees.
    pending: Option<String>,
    /// The list as loaded, expiries included, and when.
    list: AllowList,
    loaded: SystemTime,
    /// What the handler has now: `list` minus the expired entries.
    applied: AllowList,
    /// Membership mode: the document read at start (handed to the handler's options).
    membership: Option<Signed>,
}

impl AllowFile {
    /// Loads the list at start. Unlike a reload, a bad file here is an error.
    pub(crate) fn load(source: AllowSource, now: SystemTime) -> Result<Self, String> {
        let mut membership = None;
        let (path, text, list) = match source {
            AllowSource::File(path) => {
                let text = read(&path)?;
                let list = parse(&text, &path)?;
                (Some(path), text, list)
            }
            AllowSource::AnyPeerInsecure => {
                (None, String::new(), AllowList::allow_any_peer_insecure())
            }
            AllowSource::Membership(path) => {
                let text = read(&path)?;
                let doc = Signed::from_toml(&text, &path.display().to_string())
                    .map_err(|e| e.to_string())?;
                let list = doc.document().allow_list();
                membership = Some(doc);
                (Some(path), text, list)
            }
        };
        if membership.is_some() {
            return Ok(Self {
                path,
                text,
                pending: None,
                list: list.clone(),
                loaded: now,
                applied: list,
                membership,
            });
        }
        let (applied, expired) = list.in_force_at(now, now);
        let file = Self {
            path,
            text,
            pending: None,
            list,
            loaded: now,
            applied,
            membership: None,
        };
        file.report_expired(&expired, "at start");
        if !file.applied.is_allow_any() && file.applied.peers().next().is_none() {
            tracing::warn!(
                "the allow list {} lists no peer in force: no one can talk to this node \
                 until it does",
                file.shown()
            );
        }
        Ok(file)
    }

    /// Where the list comes from, for `/status`.
    pub(crate) fn report(&self) -> AllowReport {
        let source = match (&self.path, &self.membership) {
            (_, Some(_)) => "membership",
            (Some(_), None) => "file",
            (None, None) => "any-peer-insecure",
        };
        AllowReport {
            source: source.to_owned(),
            path: self.path.as_ref().map(|p| p.display().to_string()),
            ..AllowReport::default()
        }
    }

    /// Membership mode: the document to start the handler with.
    pub(crate) fn membership(&self) -> Option<&Signed> {
        self.membership.as_ref()
    }

    /// The list to start the handler with.
    pub(crate) fn in_force(&self) -> AllowList {
        self.applied.clone()
    }

    /// When the next entry still in force expires, if any does. (Of the whole list, an
    /// entry already expired would stay "due" for ever, and the serve loop would re-read
    /// the file on every turn.)
    pub(crate) fn next_expiry(&self) -> Option<SystemTime> {
        if self.membership.is_some() {
            return None; // The handler judges members' expiry itself.
        }
        self.applied.next_expiry(self.loaded)
    }

    /// Reads the file and applies a change (at once when `forced`, on SIGHUP; otherwise
    /// once it reads the same twice), then applies expiries. Problems are logged, never
    /// fatal: the list in force stays.
    pub(crate) fn refresh(&mut self, node: &P2pHandler, forced: bool, now: SystemTime) {
        if let Some(path) = self.path.clone() {
            match read(&path) {
                Err(e) => {
                    if forced || self.pending.is_none() {
                        reloaded(Reload::Failed);
                        tracing::warn!("{e}; the allow list in force stays");
                    }
                }
                Ok(text) if text == self.text => {
                    self.pending = None;
                    if forced {
                        reloaded(Reload::Unchanged);
                    }
                    if forced && self.membership.is_some() {
                        // A reload asked for and nothing to do: say so.
                        self.report_membership(node, "unchanged");
                    } else if forced {
                        tracing::info!(
                            "allow list {} unchanged: {} in force",
                            self.shown(),
                            peers(self.applied.peers().count())
                        );
                    }
                }
                Ok(text) if forced || self.pending.as_ref() == Some(&text) => {
                    self.pending = None;
                    self.reload(node, &path, text, now);
                }
                // Changed since the last read: wait for it to settle.
                Ok(text) => self.pending = Some(text),
            }
        }
        if self.membership.is_none() {
            self.expire(node, now);
        }
    }

    /// Logs the epoch in force.
    fn report_membership(&self, node: &P2pHandler, what: &str) {
        if let Ok(Some(m)) = node.membership() {
            tracing::info!(
                "membership file {} {what}: epoch {} ({}) in force, {} allowed",
                self.shown(),
                m.epoch,
                m.digest.short(),
                peers(m.allowed)
            );
        }
    }

    /// Membership mode: offers the file's new document to the handler.
    fn offer(&mut self, node: &P2pHandler, path: &Path, text: String) {
        let origin = path.display().to_string();
        self.text = text;
        let doc = match Signed::from_toml(&self.text, &origin) {
            Ok(doc) => doc,
            Err(e) => {
                reloaded(Reload::Failed);
                return tracing::error!("{e}; the node keeps its membership epoch");
            }
        };
        let epoch = doc.epoch();
        match node.offer_membership(doc) {
            Ok(applied) if applied.is_empty() => {
                reloaded(Reload::Unchanged);
                self.report_membership(node, "unchanged");
            }
            Ok(_) => {
                reloaded(Reload::Applied);
                self.report_membership(node, &format!("applied (epoch {epoch})"));
            }
            Err(HandlerError::MembershipRefused(refused)) => {
                reloaded(Reload::Failed);
                let held = node.membership().ok().flatten().map_or(0, |m| m.epoch);
                tracing::error!(
                    "membership file {origin} refused: {refused}; the node keeps epoch {held}"
                );
            }
            Err(e) => {
                reloaded(Reload::Failed);
                tracing::error!("membership file {origin}: {e}");
            }
        }
    }

    fn reload(&mut self, node: &P2pHandler, path: &Path, text: String, now: SystemTime) {
        if self.membership.is_some() {
            return self.offer(node, path, text);
        }
        let parsed = parse(&text, path);
        self.text = text;
        match parsed {
            Err(e) => {
                reloaded(Reload::Failed);
                tracing::error!("{e}; the allow list in force stays");
            }
            Ok(list) => {
                reloaded(Reload::Applied);
                self.list = list;
                self.loaded = now;
                let (applied, expired) = self.list.in_force_at(now, now);
                let removed = self.apply(node, applied);
                tracing::info!(
                    "allow list {} reloaded: {} in force{}",
                    self.shown(),
                    peers(self.applied.peers().count()),
                    listed(" removed: ", &removed)
                );
                self.report_expired(&expired, "in the new file");
            }
        }
    }

    /// Drops the entries whose time has come.
    fn expire(&mut self, node: &P2pHandler, now: SystemTime) {
        let (in_force, expired) = self.list.in_force_at(now, self.loaded);
        if in_force == self.applied {
            return;
        }
        // The entries that were in force until now.
        let newly: Vec<PeerId> = expired
            .into_iter()
            .filter(|peer| self.applied.contains(peer))
            .collect();
        self.apply(node, in_force);
        for peer in newly {
            tracing::warn!(
                "the allow-list entry of peer {} expired: disconnected, its exchanges fail",
                self.name(&peer)
            );
        }
    }

    /// Hands `list` to the handler; returns the peers it removed.
    fn apply(&mut self, node: &P2pHandler, list: AllowList) -> Vec<PeerId> {
        self.applied = list.clone();
        match node.set_allow_list(list) {
            Ok(removed) => removed,
            Err(e) => {
                tracing::error!("cannot change the allow list: {e}");
                Vec::new()
            }
        }
    }

    fn report_expired(&self, expired: &[PeerId], when: &str) {
        for peer in expired {
            tracing::warn!(
                "the allow-list entry of peer {} in {} has expired already ({when}): not allowed",
                self.name(peer),
                self.shown()
            );
        }
    }

    /// A peer as logs name it: its short id, and the file's label if it has one.
    fn name(&self, peer: &PeerId) -> String {
        match self.list.get(peer).and_then(|e| e.name.as_deref()) {
            Some(name) => format!("{} ({name})", peer.short()),
            None => peer.short().to_string(),
        }
    }

    fn shown(&self) -> String {
        self.path
            .as_ref()
            .map_or_else(|| "(any peer)".to_owned(), |p| p.display().to_string())
    }
}

/// How a reload of the allow-list (or membership) file ended.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Reload {
    /// A changed file took effect.
    Applied,
    /// Asked for (SIGHUP), and the file held nothing new.
    Unchanged,
    /// The file could not be read, did not parse, or was refused: the list in force stays.
    Failed,
}

impl Reload {
    pub(crate) const ALL: [Reload; 3] = [Reload::Applied, Reload::Unchanged, Reload::Failed];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Reload::Applied => "applied",
            Reload::Unchanged => "unchanged",
            Reload::Failed => "failed",
        }
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read allow list {}: {e}", path.display()))
}

fn parse(text: &str, path: &Path) -> Result<AllowList, String> {
    AllowList::from_toml_str(text, &path.display().to_string()).map_err(|e| e.to_string())
}

/// "1 peer", "0 peers", "12 peers".
pub(crate) fn peers(n: usize) -> String {
    if n == 1 {
        "1 peer".to_owned()
    } else {
        format!("{n} peers")
    }
}

fn listed(prefix: &str, peers: &[PeerId]) -> String {
    if peers.is_empty() {
        return String::new();
    }
    let names: Vec<String> = peers.iter().map(|p| p.short().to_string()).collect();
    format!(";{prefix}{}", names.join(", "))
}
