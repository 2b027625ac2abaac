//! Pictures of a trace for a person: an SVG sequence diagram sized to its content, and the
//! same story in Mermaid.
//!
//! Both tell messages delivered from messages lost, draw a failed dial beside the lane of
//! the node that dialed, and show a fault over the time it lasted: from the step that
//! broke something (a partition, a hold, a crash, a stop, a full disk, a fail rate) to the
//! step that mended it (repair, release, restart, a zero fail rate), or to the end. Labels
//! say why in words ("the peer closed it: done", "connect to ...: connection refused"),
//! not in the trace's shorthand.

use std::fmt::Write as _;

use super::{Trace, What};

/// Layout, in pixels. Text is 11 px monospace, about 6.6 px a character.
const CHAR_WIDTH: f64 = 6.6;
/// The least distance between two lifelines.
const MIN_GAP: usize = 180;
const ROW: usize = 20;
const MARGIN: usize = 20;
/// The time column, left of the first lifeline.
const TIME: usize = 70;
const HEAD: usize = 50;
/// How far a fault's band reaches either side of its lanes' lifelines.
const BAND: usize = 30;
/// How far a failed dial's stub reaches towards its target.
const STUB: usize = 24;

/// What one row of the picture shows.
enum Mark {
    /// A message from lane to lane, delivered or lost.
    Arrow {
        from: usize,
        to: usize,
        label: String,
        lost: bool,
    },
    /// A dial that failed before its connection was up: a stub towards the target and the
    /// reason beside the dialer's lane.
    DialFailed {
        lane: usize,
        toward: usize,
        label: String,
    },
    /// Something on one lifeline.
    Note {
        lane: usize,
        text: String,
        color: &'static str,
    },
    /// A fault over `lanes` (all when empty), lasting until row `until` (`usize::MAX`:
    /// never mended).
    Fault {
        lanes: Vec<usize>,
        label: String,
        until: usize,
    },
    /// The step that mended a fault.
    Heal { lanes: Vec<usize>, label: String },
}

struct Row {
    time: String,
    mark: Mark,
}

impl Trace {
    /// Which `Send` lines were never received (lost to a partition, a drop, a crash or a
    /// closed connection), by line index. A send matches the first later `Recv` at its
    /// receiver from its sender with the same message (connection ids differ at each end,
    /// so they are left out of the comparison).
    fn lost_sends(&self) -> Vec<bool> {
        use std::collections::{BTreeMap, VecDeque};
        let body = |m: &str| m.split_once(' ').map_or(m, |(_, rest)| rest).to_owned();
        // (receiver, sender, message) -> the receipts, in order.
        let mut receipts: BTreeMap<(String, String, String), VecDeque<usize>> = BTreeMap::new();
        for (j, line) in self.lines.iter().enumerate() {
            if let What::Recv { from, message } = &line.what {
                receipts
                    .entry((line.node.clone(), from.clone(), body(message)))
                    .or_default()
                    .push_back(j);
            }
        }
        let mut lost = vec![false; self.lines.len()];
        for (i, line) in self.lines.iter().enumerate() {
            let What::Send { to, message } = &line.what else {
                continue;
            };
            let key = (to.clone(), line.node.clone(), body(message));
            let queue = receipts.get_mut(&key);
            let matched = queue.is_some_and(|q| {
                while q.front().is_some_and(|j| *j < i) {
                    q.pop_front();
                }
                q.pop_front().is_some()
            });
            lost[i] = !matched;
        }
        lost
    }

    /// Dials that failed before their connection was established, by line index of the
    /// failure: (dialer, target, why, in words).
    fn failed_dials(&self) -> Vec<Option<(String, String, String)>> {
        let mut out = vec![None; self.lines.len()];
        // (node, conn, target), while the dial is pending.
        let mut pending: Vec<(String, String, String)> = Vec::new();
        for (i, line) in self.lines.iter().enumerate() {
            let What::Conn(text) = &line.what else {
                continue;
            };
            let mut words = text.split_whitespace();
            let (Some(conn), Some(verb)) = (words.next(), words.next()) else {
                continue;
            };
            let key = |p: &(String, String, String)| p.0 == line.node && p.1 == conn;
            match verb {
                "dial" => {
                    let target = words.next().unwrap_or("?").to_owned();
                    pending.push((line.node.clone(), conn.to_owned(), target));
                }
                "established" => pending.retain(|p| !key(p)),
                "closed" => {
                    if let Some(k) = pending.iter().position(key) {
                        let (node, _, target) = pending.remove(k);
                        let why = text.split_once(": ").map_or("", |(_, w)| w);
                        out[i] = Some((node, target, dial_failure(why)));
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// The rows of the picture: every line but receipts (drawn as their arrow's head) and
    /// lines of nodes that have no lane.
    fn rows(&self, nodes: &[String]) -> Vec<Row> {
        let lost = self.lost_sends();
        let failed = self.failed_dials();
        let lane = |name: &str| nodes.iter().position(|n| n == name);
        let mut rows: Vec<Row> = Vec::new();
        // Faults not mended yet: their key and their row.
        let mut open: Vec<(String, usize)> = Vec::new();
        for (i, line) in self.lines.iter().enumerate() {
            let time = format!("{}.{:03}s", line.at.as_secs(), line.at.subsec_millis());
            let mark = if let Some((from, to, why)) = &failed[i] {
                lane(from)
                    .zip(lane(to))
                    .map(|(lane, toward)| Mark::DialFailed {
                        lane,
                        toward,
                        label: format!("dial to {to} failed: {why}"),
                    })
            } else {
                match &line.what {
                    What::Send { to, message } => {
                        lane(&line.node)
                            .zip(lane(to))
                            .map(|(from, to)| Mark::Arrow {
                                from,
                                to,
                                label: if lost[i] {
                                    format!("LOST {message}")
                                } else {
                                    message.clone()
                                },
                                lost: lost[i],
                            })
                    }
                    What::Fault { what, rule, link } => Some(fault_mark(
                        what,
                        rule,
                        link.as_ref(),
                        nodes,
                        rows.len(),
                        &mut open,
                        &mut rows,
                    )),
                    What::State(text) | What::App(text) | What::Event(text) => lane(&line.node)
                        .map(|lane| Mark::Note {
                            lane,
                            text: text.clone(),
                            color: match &line.what {
                                What::State(_) => "#1a5fb4",
                                What::App(_) => "#26a269",
                                _ => "#613583",
                            },
                        }),
                    What::Conn(text) => lane(&line.node).map(|lane| Mark::Note {
                        lane,
                        text: connection(text),
                        color: "#77767b",
                    }),
                    What::Start => lane(&line.node).map(|lane| Mark::Note {
                        lane,
                        text: "node up".to_owned(),
                        color: "#26a269",
                    }),
                    What::Recv { .. } => None,
                }
            };
            if let Some(mark) = mark {
                rows.push(Row { time, mark });
            }
        }
        // Faults never mended last to the end.
        for (_, row) in open {
            if let Mark::Fault { until, .. } = &mut rows[row].mark {
                *until = usize::MAX;
            }
        }
        rows
    }

    /// The trace as a Mermaid sequence diagram: messages sent (`->>` delivered, `-x`
    /// lost), failed dials (`-x`), faults (a note saying until when) and their mending,
    /// application events.
    pub fn mermaid(&self, nodes: &[String]) -> String {
        let rows = self.rows(nodes);
        let mut out = String::from("sequenceDiagram\n");
        for n in nodes {
            let _ = writeln!(out, "    participant {n}");
        }
        let over = |lanes: &[usize]| -> String {
            let (first, last) = match (lanes.iter().min(), lanes.iter().max()) {
                (Some(a), Some(b)) => (*a, *b),
                _ => (0, nodes.len().saturating_sub(1)),
            };
            if first == last {
                nodes.get(first).cloned().unwrap_or_default()
            } else {
                format!("{},{}", nodes[first], nodes[last])
            }
        };
        for row in &rows {
            let t = &row.time;
            match &row.mark {
                Mark::Arrow {
                    from,
                    to,
                    label,
                    lost,
                } => {
                    let arrow = if *lost { "-x" } else { "->>" };
                    let _ = writeln!(
                        out,
                        "    {}{arrow}{}: {t} {}",
                        nodes[*from],
                        nodes[*to],
                        clean(label)
                    );
                }
                Mark::DialFailed {
                    lane,
                    toward,
                    label,
                } => {
                    let _ = writeln!(
                        out,
                        "    {}-x{}: {t} {}",
                        nodes[*lane],
                        nodes[*toward],
                        clean(label)
                    );
                }
                Mark::Fault {
                    lanes,
                    label,
                    until,
                } => {
                    let end = rows.get(*until).map_or("the end", |r| r.time.as_str());
                    let _ = writeln!(
                        out,
                        "    Note over {}: {t} {} (until {end})",
                        over(lanes),
                        clean(label)
                    );
                }
                Mark::Heal { lanes, label } => {
                    let _ = writeln!(out, "    Note over {}: {t} {}", over(lanes), clean(label));
                }
                Mark::Note { lane, text, color } if *color != "#77767b" => {
                    let _ = writeln!(out, "    Note over {}: {t} {}", nodes[*lane], clean(text));
                }
                Mark::Note { .. } => {} // Connections: too many for a diagram of messages.
            }
        }
        out
    }

    /// The trace as a self-contained SVG sequence diagram (no scripts, fonts or links),
    /// sized to what it holds: a lifeline per node, one row per event, time at the left.
    /// Messages are arrows (black when received; red, dashed and crossed when lost);
    /// a failed dial is a crossed red stub with its reason beside the dialer's lane; a
    /// fault is a red band over its lanes from the step that broke them to the one that
    /// mended them; state changes, application actions, events and connections are notes
    /// on their node's lifeline. Any browser, or a CI artifact viewer, shows it as is.
    pub fn svg(&self, nodes: &[String]) -> String {
        let rows = self.rows(nodes);
        let x = lanes_x(&rows, nodes);
        let y_of = |row: usize| HEAD + row * ROW + ROW;
        let height = HEAD + (rows.len() + 2) * ROW;
        let band = |lanes: &[usize]| -> (usize, usize) {
            let (first, last) = match (lanes.iter().min(), lanes.iter().max()) {
                (Some(a), Some(b)) => (*a, *b),
                _ => (0, nodes.len().saturating_sub(1)),
            };
            let left = x
                .get(first)
                .map_or(MARGIN + TIME, |x| x.saturating_sub(BAND));
            let right = x.get(last).map_or(left, |x| x + BAND);
            (left, right)
        };
        let mut width = x.last().map_or(MARGIN + TIME + BAND, |x| x + MIN_GAP / 2) + MARGIN;
        let mut bands = String::new();
        let mut body = String::new();
        for (r, row) in rows.iter().enumerate() {
            let y = y_of(r);
            let _ = write!(
                body,
                "<text x=\"{MARGIN}\" y=\"{}\" fill=\"#77767b\">{}</text>",
                y - 4,
                row.time
            );
            match &row.mark {
                Mark::Arrow {
                    from,
                    to,
                    label,
                    lost,
                } => body.push_str(&arrow(x[*from], x[*to], y, label, *lost)),
                Mark::DialFailed {
                    lane,
                    toward,
                    label,
                } => {
                    body.push_str(&stub(x[*lane], x[*toward], y));
                    width = width.max(x[*lane] + 6 + text_width(label) + MARGIN);
                    body.push_str(&note(x[*lane], y, label, "#b00020"));
                }
                Mark::Note { lane, text, color } => {
                    width = width.max(x[*lane] + 6 + text_width(text) + MARGIN);
                    body.push_str(&note(x[*lane], y, text, color));
                }
                Mark::Fault {
                    lanes,
                    label,
                    until,
                } => {
                    let (left, right) = band(lanes);
                    width = width.max(left + 6 + text_width(label) + MARGIN);
                    let top = y - ROW + 4;
                    let bottom = y_of((*until).min(rows.len().saturating_sub(1))).max(y);
                    let _ = write!(
                        bands,
                        "<rect x=\"{left}\" y=\"{top}\" width=\"{}\" height=\"{}\" \
                         fill=\"#fde2e2\" fill-opacity=\"0.6\" stroke=\"#e0a0a0\"/>",
                        right - left,
                        bottom - top + 2
                    );
                    let _ = write!(
                        body,
                        "<text x=\"{}\" y=\"{}\" fill=\"#b00020\" font-weight=\"bold\"{HALO}>{}</text>",
                        left + 6,
                        y - 4,
                        escape(label)
                    );
                }
                Mark::Heal { lanes, label } => {
                    let (left, _) = band(lanes);
                    width = width.max(left + 6 + text_width(label) + MARGIN);
                    let _ = write!(
                        body,
                        "<text x=\"{}\" y=\"{}\" fill=\"#26a269\" font-weight=\"bold\"{HALO}>{}</text>",
                        left + 6,
                        y - 4,
                        escape(label)
                    );
                }
            }
            body.push('\n');
        }
        for (name, x) in nodes.iter().zip(&x) {
            width = width.max(x + text_width(name) / 2 + MARGIN);
        }
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
             viewBox=\"0 0 {width} {height}\" font-family=\"monospace\" font-size=\"11\">\n\
             <defs><marker id=\"head\" markerWidth=\"8\" markerHeight=\"8\" refX=\"7\" refY=\"4\" \
             orient=\"auto\"><path d=\"M0,0 L8,4 L0,8 z\" fill=\"#000\"/></marker></defs>\n\
             <rect width=\"{width}\" height=\"{height}\" fill=\"#fff\"/>\n{bands}\n"
        );
        for (name, x) in nodes.iter().zip(&x) {
            let _ = writeln!(
                out,
                "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"#c0bfbc\"/>\
                 <text x=\"{x}\" y=\"{}\" text-anchor=\"middle\" font-weight=\"bold\" \
                 font-size=\"14\">{}</text>",
                HEAD - 10,
                height - ROW,
                HEAD - 20,
                escape(name)
            );
        }
        out.push_str(&body);
        out.push_str("</svg>\n");
        out
    }
}

/// A fault line as a mark: a fault that a later step mends opens a band (closed when its
/// mending comes), a mending closes one, anything else (a message fault, an attack, a
/// latency) is a band of one row.
fn fault_mark(
    what: &str,
    rule: &str,
    link: Option<&(String, String)>,
    nodes: &[String],
    row: usize,
    open: &mut Vec<(String, usize)>,
    rows: &mut [Row],
) -> Mark {
    let lanes_named = |text: &str| -> Vec<usize> {
        let mut lanes: Vec<usize> = text
            .split(|c: char| c.is_whitespace() || c == '|')
            .filter_map(|w| nodes.iter().position(|n| n == w))
            .collect();
        lanes.sort_unstable();
        lanes.dedup();
        lanes
    };
    let label = match link {
        Some((a, b)) => format!("{what} ({a} -> {b}) [{rule}]"),
        None => format!("{what} [{rule}]"),
    };
    match lasting(what) {
        Some((key, true)) => {
            open.push((key, row));
            Mark::Fault {
                lanes: lanes_named(what),
                label,
                until: row,
            }
        }
        Some((key, false)) => {
            if let Some(k) = open.iter().position(|(open_key, _)| *open_key == key) {
                let (_, start) = open.remove(k);
                if let Some(Mark::Fault { until, .. }) = rows.get_mut(start).map(|r| &mut r.mark) {
                    *until = row;
                }
            }
            Mark::Heal {
                lanes: lanes_named(what),
                label,
            }
        }
        None => {
            let lanes = match link {
                Some((a, b)) => lanes_named(&format!("{a} {b}")),
                None => lanes_named(what),
            };
            Mark::Fault {
                lanes,
                label,
                until: row,
            }
        }
    }
}

/// A fault that lasts until a step mends it: its key (what the mending names too) and
/// whether this line breaks (`true`) or mends (`false`).
fn lasting(what: &str) -> Option<(String, bool)> {
    // "A | B" names a link both ways: keyed in order, so "b | a" mends "a | b".
    let link = |ends: &str| -> String {
        match ends.split_once(" | ") {
            Some((a, b)) if a > b => format!("{b} | {a}"),
            _ => ends.to_owned(),
        }
    };
    let (verb, rest) = what.split_once(' ')?;
    Some(match verb {
        "partition" => (format!("link {}", link(rest)), true),
        "repair" => (format!("link {}", link(rest)), false),
        "hold" => (format!("hold {}", link(rest)), true),
        "release" => (format!("hold {}", link(rest)), false),
        "crash" | "stop" => (format!("node {rest}"), true),
        "disk" => (format!("node {}", rest.strip_prefix("full ")?), true),
        "restart" => (format!("node {}", rest.split_whitespace().next()?), false),
        "fail" => {
            let (ends, rate) = rest.strip_prefix("rate ")?.split_once(" = ")?;
            (format!("rate {}", link(ends)), rate.trim() != "0")
        }
        _ => return None,
    })
}

/// Where each lane's lifeline goes: far enough apart for the notes right of each one and
/// for the labels of the arrows between them.
fn lanes_x(rows: &[Row], nodes: &[String]) -> Vec<usize> {
    let n = nodes.len();
    // What each lane needs right of its lifeline, and each gap for arrows' labels.
    let mut right = vec![0usize; n];
    let mut gaps = vec![MIN_GAP; n.saturating_sub(1)];
    for (i, name) in nodes.iter().enumerate() {
        right[i] = text_width(name) / 2 + 12;
    }
    for row in rows {
        match &row.mark {
            Mark::Note { lane, text, .. } => {
                right[*lane] = right[*lane].max(6 + text_width(text) + 16)
            }
            Mark::DialFailed { lane, label, .. } => {
                right[*lane] = right[*lane].max(6 + text_width(label) + 16);
            }
            _ => {}
        }
    }
    for (i, gap) in gaps.iter_mut().enumerate() {
        *gap = (*gap).max(right[i]);
    }
    // Arrows: their label centred on the span; widen the span's last gap if it is short.
    for row in rows {
        if let Mark::Arrow {
            from, to, label, ..
        } = &row.mark
        {
            let (a, b) = ((*from).min(*to), (*from).max(*to));
            if a == b {
                continue;
            }
            let span: usize = gaps[a..b].iter().sum();
            let need = text_width(label) + 24;
            if need > span {
                gaps[b - 1] += need - span;
            }
        }
    }
    let mut x = Vec::with_capacity(n);
    let mut at = MARGIN + TIME + BAND + 10;
    for i in 0..n {
        x.push(at);
        at += gaps.get(i).copied().unwrap_or(0);
    }
    x
}

/// About how wide `text` is drawn, in pixels.
fn text_width(text: &str) -> usize {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let width = (text.chars().count() as f64 * CHAR_WIDTH).ceil() as usize;
    width
}

/// A white outline under text, so a label that crosses a lifeline or a band stays legible.
const HALO: &str = " stroke=\"#fff\" stroke-width=\"3\" paint-order=\"stroke\"";

/// An arrow from `x1` to `x2` at height `y`, labelled; lost ones red, dashed, crossed.
fn arrow(x1: usize, x2: usize, y: usize, label: &str, lost: bool) -> String {
    let (color, dash, end) = if lost {
        // Stop short of the receiver, with a cross where it vanished.
        let end = if x2 > x1 { x2 - 30 } else { x2 + 30 };
        ("#b00020", " stroke-dasharray=\"4 3\"", end)
    } else {
        ("#000", "", x2)
    };
    let head = if lost {
        cross(end, y, color)
    } else {
        String::new()
    };
    let marker = if lost {
        ""
    } else {
        " marker-end=\"url(#head)\""
    };
    let mid = x1.min(end) + x1.abs_diff(end) / 2;
    format!(
        "<line x1=\"{x1}\" y1=\"{y}\" x2=\"{end}\" y2=\"{y}\" stroke=\"{color}\"{dash}{marker}/>{head}\
         <text x=\"{mid}\" y=\"{}\" text-anchor=\"middle\" fill=\"{color}\"{HALO}>{}</text>",
        y - 3,
        escape(label)
    )
}

/// A failed dial's stub: a short dashed red line from the dialer towards its target, and
/// a cross where it stopped.
fn stub(x: usize, toward: usize, y: usize) -> String {
    let end = if toward >= x { x + STUB } else { x - STUB };
    format!(
        "<line x1=\"{x}\" y1=\"{}\" x2=\"{end}\" y2=\"{}\" stroke=\"#b00020\" \
         stroke-dasharray=\"4 3\"/>{}",
        y + 2,
        y + 2,
        cross(end, y + 6, "#b00020")
    )
}

fn cross(x: usize, y: usize, color: &str) -> String {
    format!(
        "<path d=\"M{} {} l8 8 m0 -8 l-8 8\" stroke=\"{color}\" stroke-width=\"2\"/>",
        x.saturating_sub(4),
        y - 4
    )
}

/// A note on a lifeline, written right of it.
fn note(x: usize, y: usize, text: &str, color: &str) -> String {
    format!(
        "<circle cx=\"{x}\" cy=\"{}\" r=\"3\" fill=\"{color}\"/>\
         <text x=\"{}\" y=\"{}\" fill=\"{color}\"{HALO}>{}</text>",
        y - 7,
        x + 6,
        y - 3,
        escape(text)
    )
}

/// A connection line of the trace in words: "c3 closed (bob): the peer closed it: done".
fn connection(text: &str) -> String {
    let Some((head, why)) = text.split_once(": ") else {
        return text.replace("(?)", "(before the handshake)");
    };
    let head = head.replace("(?)", "(before the handshake)");
    format!("{head}: {}", reason(why))
}

/// Why a dial failed, in words.
fn dial_failure(why: &str) -> String {
    match why {
        // The dialer itself gave up the dial: what it was for had ended meanwhile.
        "locally, Done" => "abandoned: nothing left to send on it".to_owned(),
        _ => reason(why),
    }
}

/// A close reason of the trace ("locally, Idle", "by peer, NotAllowed", "io: ...") in
/// words.
fn reason(why: &str) -> String {
    if let Some(code) = why.strip_prefix("locally, ") {
        format!("we closed it: {}", words(code))
    } else if let Some(code) = why.strip_prefix("by peer, ") {
        format!("the peer closed it: {}", words(code))
    } else if let Some(io) = why.strip_prefix("io: ") {
        io.to_owned()
    } else {
        why.to_owned()
    }
}

/// `NotAllowed` -> "not allowed".
fn words(code: &str) -> String {
    let mut out = String::new();
    for c in code.chars() {
        if c.is_uppercase() && !out.is_empty() {
            out.push(' ');
        }
        out.extend(c.to_lowercase());
    }
    out
}

/// Text made safe inside an XML element.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Mermaid reads `#...;` as an entity and `;` as the end of a statement: both are written
/// as entity codes, so `bob#1` shows as `bob#1`.
fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '#' => out.push_str("#35;"),
            ';' => out.push_str("#59;"),
            c => out.push(c),
        }
    }
    out
}
