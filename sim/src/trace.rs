//! The structured record of a run: what happened, when, where, and why.

use std::fmt::Write as _;
use std::time::Duration;

mod picture;

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
        assert!(m.contains("(until the end)"), "never mended: {m}");
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
            lines.contains(&"    alice-xbob: 0.021s dial to bob failed: connect refused"),
            "{m}"
        );
        assert!(
            lines.contains(&"    bob->>alice: 0.030s i1 Ack(Request) a1 try 1"),
            "{m}"
        );
        // An established dial is not drawn as failed.
        assert_eq!(m.matches("failed").count(), 1, "{m}");
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
        assert!(
            svg.contains(">dial to bob failed: connect refused<"),
            "{svg}"
        );
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
