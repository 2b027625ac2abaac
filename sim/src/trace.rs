//! The structured record of a run: what happened, when, where, and why.

use std::fmt::Write as _;
use std::time::Duration;

/// What a trace line records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    /// The simulated application did something (request, respond, allow, revoke).
    App(String),
    /// The application received an event (request, reply, failure, notice).
    Event(String),
    /// A message was handed to the network: `to`, and a description.
    Send {
        /// Receiver node.
        to: String,
        /// Message description.
        message: String,
    },
    /// A message arrived from `from`.
    Recv {
        /// Sender node.
        from: String,
        /// Message description.
        message: String,
    },
    /// A connection was dialed, established, closed, or refused.
    Conn(String),
    /// An exchange changed state.
    State(String),
    /// A fault was applied, and the rule (step) that caused it.
    Fault {
        /// What was done.
        what: String,
        /// Which step (1-based) and its line.
        rule: String,
        /// For message faults: the two ends, for the diagram.
        link: Option<(String, String)>,
    },
    /// A node started (or restarted).
    Start,
}

/// One line of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Virtual time since the start.
    pub at: Duration,
    /// The node (or "sim" for the simulator itself).
    pub node: String,
    /// What happened.
    pub what: What,
}

/// A run's trace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    /// Lines in the order they happened.
    pub lines: Vec<Line>,
}

impl Trace {
    /// Appends a line.
    pub fn push(&mut self, at: Duration, node: &str, what: What) {
        self.lines.push(Line {
            at,
            node: node.to_owned(),
            what,
        });
    }

    /// The trace as aligned text, one event per line.
    pub fn text(&self) -> String {
        let width = self
            .lines
            .iter()
            .map(|l| l.node.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let mut out = String::new();
        for line in &self.lines {
            let (tag, text) = match &line.what {
                What::App(s) => ("app", s.clone()),
                What::Event(s) => ("event", s.clone()),
                What::Send { to, message } => ("send", format!("-> {to} {message}")),
                What::Recv { from, message } => ("recv", format!("<- {from} {message}")),
                What::Conn(s) => ("conn", s.clone()),
                What::State(s) => ("state", s.clone()),
                What::Fault { what, rule, .. } => ("fault", format!("{what} [{rule}]")),
                What::Start => ("start", "node up".to_owned()),
            };
            let _ = writeln!(
                out,
                "{:>4}.{:03}s {:<width$} {:<5} {}",
                line.at.as_secs(),
                line.at.subsec_millis(),
                line.node,
                tag,
                text
            );
        }
        out
    }

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
    /// failure: (dialer, target, why).
    fn failed_dials(&self) -> Vec<Option<(String, String, String)>> {
        let mut out = vec![None; self.lines.len()];
        // (node, conn) -> target, while the dial is pending.
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
                        let why = text.split_once(": ").map_or("", |(_, w)| w).to_owned();
                        out[i] = Some((node, target, why));
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// The trace as a Mermaid sequence diagram: messages sent (`->>` delivered, `-x`
    /// lost), failed dials (`-x`), faults, application events.
    pub fn mermaid(&self, nodes: &[String]) -> String {
        let lost = self.lost_sends();
        let failed = self.failed_dials();
        let mut out = String::from("sequenceDiagram\n");
        for n in nodes {
            let _ = writeln!(out, "    participant {n}");
        }
        for (i, line) in self.lines.iter().enumerate() {
            let t = format!("{}.{:03}s", line.at.as_secs(), line.at.subsec_millis());
            if let Some((from, to, why)) = &failed[i]
                && nodes.contains(to)
            {
                let _ = writeln!(out, "    {from}-x{to}: {t} dial failed: {}", clean(why));
                continue;
            }
            match &line.what {
                What::Send { to, message } if lost[i] => {
                    let _ = writeln!(
                        out,
                        "    {}-x{}: {t} LOST {}",
                        line.node,
                        to,
                        clean(message)
                    );
                }
                What::Send { to, message } => {
                    let _ = writeln!(out, "    {}->>{}: {t} {}", line.node, to, clean(message));
                }
                What::Fault {
                    what,
                    link: Some((from, to)),
                    ..
                } => {
                    let _ = writeln!(out, "    {from}-x{to}: {t} {}", clean(what));
                }
                What::Fault { what, rule, .. } => {
                    let over = if nodes.len() > 1 {
                        format!("{},{}", nodes[0], nodes[nodes.len() - 1])
                    } else {
                        nodes.first().cloned().unwrap_or_default()
                    };
                    let _ = writeln!(
                        out,
                        "    Note over {over}: {t} {} [{}]",
                        clean(what),
                        clean(rule)
                    );
                }
                What::App(s) | What::Event(s) if nodes.contains(&line.node) => {
                    let _ = writeln!(out, "    Note over {}: {t} {}", line.node, clean(s));
                }
                What::Start if nodes.contains(&line.node) => {
                    let _ = writeln!(out, "    Note over {}: {t} node up", line.node);
                }
                _ => {}
            }
        }
        out
    }
}

/// Layout of [`Trace::svg`], in pixels.
const COLUMN: usize = 260;
const ROW: usize = 20;
const MARGIN: usize = 40;
const HEAD: usize = 50;

impl Trace {
    /// The trace as a self-contained SVG sequence diagram (no scripts, fonts or links):
    /// a lifeline per node, one row per event, time written at the left. Messages are
    /// arrows (black when received, red and dashed, ending in a cross, when lost); failed
    /// dials are red crossed arrows too; faults are red bands across the diagram with
    /// their step; state changes, application actions and events are notes on their
    /// node's lifeline. Any browser, or a CI artifact viewer, shows it as is.
    pub fn svg(&self, nodes: &[String]) -> String {
        let lost = self.lost_sends();
        let failed = self.failed_dials();
        let x_of = |name: &str| {
            nodes
                .iter()
                .position(|n| n == name)
                .map(|i| MARGIN + 70 + i * COLUMN + COLUMN / 2)
        };
        // Rows: every line but receipts (drawn as the arrow's head) and unknown nodes' notes.
        let mut rows: Vec<(usize, String)> = Vec::new();
        for (i, line) in self.lines.iter().enumerate() {
            let t = format!("{}.{:03}s", line.at.as_secs(), line.at.subsec_millis());
            let y = HEAD + rows.len() * ROW + ROW;
            let mut body = String::new();
            if let Some((from, to, why)) = &failed[i]
                && let (Some(x1), Some(x2)) = (x_of(from), x_of(to))
            {
                body = arrow(x1, x2, y, &format!("dial failed: {why}"), true);
            } else {
                match &line.what {
                    What::Send { to, message } => {
                        if let (Some(x1), Some(x2)) = (x_of(&line.node), x_of(to)) {
                            let label = if lost[i] {
                                format!("LOST {message}")
                            } else {
                                message.clone()
                            };
                            body = arrow(x1, x2, y, &label, lost[i]);
                        }
                    }
                    What::Fault { what, rule, link } => {
                        let width = MARGIN + 70 + nodes.len() * COLUMN;
                        let label = match link {
                            Some((a, b)) => format!("{what} ({a} -> {b}) [{rule}]"),
                            None => format!("{what} [{rule}]"),
                        };
                        body = format!(
                            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"#fde2e2\"/>\
                             <text x=\"{}\" y=\"{}\" fill=\"#b00020\" font-weight=\"bold\">{}</text>",
                            MARGIN + 70,
                            y - ROW + 4,
                            width - MARGIN - 70,
                            ROW - 2,
                            MARGIN + 76,
                            y - 4,
                            escape(&label)
                        );
                    }
                    What::State(text) | What::App(text) | What::Event(text) | What::Conn(text) => {
                        if let Some(x) = x_of(&line.node) {
                            let color = match &line.what {
                                What::State(_) => "#1a5fb4",
                                What::App(_) => "#26a269",
                                What::Event(_) => "#613583",
                                _ => "#77767b",
                            };
                            body = note(x, y, text, color);
                        }
                    }
                    What::Start => {
                        if let Some(x) = x_of(&line.node) {
                            body = note(x, y, "node up", "#26a269");
                        }
                    }
                    What::Recv { .. } => {}
                }
            }
            if !body.is_empty() {
                rows.push((
                    y,
                    format!(
                        "<text x=\"{MARGIN}\" y=\"{}\" fill=\"#77767b\">{t}</text>{body}",
                        y - 4
                    ),
                ));
            }
        }
        let height = HEAD + (rows.len() + 2) * ROW;
        let width = MARGIN * 2 + 70 + nodes.len() * COLUMN;
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
             viewBox=\"0 0 {width} {height}\" font-family=\"monospace\" font-size=\"11\">\n\
             <defs><marker id=\"head\" markerWidth=\"8\" markerHeight=\"8\" refX=\"7\" refY=\"4\" \
             orient=\"auto\"><path d=\"M0,0 L8,4 L0,8 z\" fill=\"#000\"/></marker></defs>\n\
             <rect width=\"{width}\" height=\"{height}\" fill=\"#fff\"/>\n"
        );
        for (i, n) in nodes.iter().enumerate() {
            let x = MARGIN + 70 + i * COLUMN + COLUMN / 2;
            let _ = writeln!(
                out,
                "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"#c0bfbc\"/>\
                 <text x=\"{x}\" y=\"{}\" text-anchor=\"middle\" font-weight=\"bold\" \
                 font-size=\"14\">{}</text>",
                HEAD - 10,
                height - ROW,
                HEAD - 20,
                escape(n)
            );
        }
        for (_, row) in rows {
            out.push_str(&row);
            out.push('\n');
        }
        out.push_str("</svg>\n");
        out
    }
}

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
        format!(
            "<path d=\"M{} {} l8 8 m0 -8 l-8 8\" stroke=\"{color}\" stroke-width=\"2\"/>",
            end - 4,
            y - 4
        )
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
         <text x=\"{mid}\" y=\"{}\" text-anchor=\"middle\" fill=\"{color}\">{}</text>",
        y - 3,
        escape(label)
    )
}

/// A note on a lifeline.
fn note(x: usize, y: usize, text: &str, color: &str) -> String {
    format!(
        "<circle cx=\"{x}\" cy=\"{}\" r=\"3\" fill=\"{color}\"/>\
         <text x=\"{}\" y=\"{}\" fill=\"{color}\">{}</text>",
        y - 7,
        x + 6,
        y - 3,
        escape(text)
    )
}

/// Text made safe inside an XML element.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Mermaid treats `;` and `#` specially in message text.
fn clean(s: &str) -> String {
    s.replace(';', ",").replace('#', "no. ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_mermaid() {
        let mut t = Trace::default();
        t.push(
            Duration::from_millis(1500),
            "alice",
            What::App("request a1 to bob".into()),
        );
        t.push(
            Duration::from_millis(1510),
            "alice",
            What::Send {
                to: "bob".into(),
                message: "Request a1 try 1".into(),
            },
        );
        t.push(
            Duration::from_millis(2000),
            "sim",
            What::Fault {
                what: "partition alice | bob".into(),
                rule: "step 2, line 9".into(),
                link: None,
            },
        );
        let text = t.text();
        assert!(
            text.contains("   1.510s alice send  -> bob Request a1 try 1"),
            "{text}"
        );
        assert!(
            text.contains("fault partition alice | bob [step 2, line 9]"),
            "{text}"
        );
        let m = t.mermaid(&["alice".into(), "bob".into()]);
        // Never received: drawn lost.
        assert!(
            m.contains("alice-xbob: 1.510s LOST Request a1 try 1"),
            "{m}"
        );
        assert!(m.contains("Note over alice,bob: 2.000s partition"), "{m}");
    }

    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn delivered_and_lost_messages_and_failed_dials_look_different() {
        let mut t = Trace::default();
        let send = |to: &str, message: &str| What::Send {
            to: to.into(),
            message: message.into(),
        };
        let recv = |from: &str, message: &str| What::Recv {
            from: from.into(),
            message: message.into(),
        };
        t.push(at(1), "alice", What::Conn("c1 dial bob at bob".into()));
        t.push(at(5), "alice", What::Conn("c1 established with bob".into()));
        t.push(at(6), "alice", send("bob", "c1 Request a1 try 1"));
        t.push(at(7), "alice", send("bob", "c1 Request a1 try 1"));
        t.push(at(9), "bob", recv("alice", "i1 Request a1 try 1"));
        t.push(at(20), "alice", What::Conn("c2 dial bob at bob".into()));
        t.push(
            at(21),
            "alice",
            What::Conn("c2 closed (bob): io: connect refused".into()),
        );
        t.push(at(30), "bob", send("alice", "i1 Ack(Request) a1 try 1"));
        t.push(at(32), "alice", recv("bob", "c1 Ack(Request) a1 try 1"));
        let m = t.mermaid(&["alice".into(), "bob".into()]);
        let lines: Vec<&str> = m.lines().collect();
        // The first copy is matched by bob's one receipt; the second copy is lost.
        assert!(
            lines.contains(&"    alice->>bob: 0.006s c1 Request a1 try 1"),
            "{m}"
        );
        assert!(
            lines.contains(&"    alice-xbob: 0.007s LOST c1 Request a1 try 1"),
            "{m}"
        );
        assert!(
            lines.contains(&"    alice-xbob: 0.021s dial failed: io: connect refused"),
            "{m}"
        );
        assert!(
            lines.contains(&"    bob->>alice: 0.030s i1 Ack(Request) a1 try 1"),
            "{m}"
        );
        // An established dial is not drawn as failed.
        assert_eq!(m.matches("dial failed").count(), 1, "{m}");
        // The same in the SVG: a black arrow, a red dashed lost one, a red failed dial.
        let svg = t.svg(&["alice".into(), "bob".into()]);
        assert!(
            svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
            "{svg}"
        );
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("marker-end=\"url(#head)\"").count(), 2, "{svg}");
        assert_eq!(svg.matches("stroke-dasharray").count(), 2, "{svg}");
        assert!(svg.contains(">LOST c1 Request a1 try 1<"), "{svg}");
        assert!(svg.contains(">dial failed: io: connect refused<"), "{svg}");
        // Well formed enough for any viewer: every text element closed, nothing unescaped.
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    }

    #[test]
    fn svg_escapes_text_and_marks_faults() {
        let mut t = Trace::default();
        t.push(
            at(1),
            "sim",
            What::Fault {
                what: "partition alice | bob".into(),
                rule: "step 1, line 3".into(),
                link: None,
            },
        );
        t.push(at(2), "alice", What::App("request <a&b> to bob".into()));
        let svg = t.svg(&["alice".into(), "bob".into()]);
        assert!(svg.contains("fill=\"#fde2e2\""), "a fault band: {svg}");
        assert!(
            svg.contains("partition alice | bob [step 1, line 3]"),
            "{svg}"
        );
        assert!(svg.contains("request &lt;a&amp;b&gt; to bob"), "{svg}");
    }
}
