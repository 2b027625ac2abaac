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

    /// The trace as a Mermaid sequence diagram: messages sent, faults, application events.
    pub fn mermaid(&self, nodes: &[String]) -> String {
        let mut out = String::from("sequenceDiagram\n");
        for n in nodes {
            let _ = writeln!(out, "    participant {n}");
        }
        for line in &self.lines {
            let t = format!("{}.{:03}s", line.at.as_secs(), line.at.subsec_millis());
            match &line.what {
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
        assert!(m.contains("alice->>bob: 1.510s Request a1 try 1"), "{m}");
        assert!(m.contains("Note over alice,bob: 2.000s partition"), "{m}");
    }
}
