//! What a viewer would show wrong in a trace picture (shared by the tests that draw them).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

/// About how wide the renderer's 11 px monospace text is, a character (14 px: the heads).
const CHAR: f64 = 6.6;

/// Every problem a viewer would show in `svg`: text that leaves the canvas, mostly.
pub(crate) fn problems(svg: &str) -> Vec<String> {
    let doc = roxmltree::Document::parse(svg).expect("the SVG is well-formed XML");
    let root = doc.root_element();
    let number = |node: roxmltree::Node, name: &str| -> f64 {
        node.attribute(name)
            .unwrap_or_else(|| panic!("<{}> without {name}", node.tag_name().name()))
            .parse()
            .unwrap()
    };
    let (width, height) = (number(root, "width"), number(root, "height"));
    let mut problems = Vec::new();
    for text in root.descendants().filter(|n| n.has_tag_name("text")) {
        let content = text.text().unwrap_or_default();
        let size: f64 = text
            .attribute("font-size")
            .map_or(11.0, |s| s.parse().unwrap());
        let w = content.chars().count() as f64 * CHAR * size / 11.0;
        let x = number(text, "x");
        let (left, right) = match text.attribute("text-anchor") {
            Some("middle") => (x - w / 2.0, x + w / 2.0),
            Some("end") => (x - w, x),
            _ => (x, x + w),
        };
        let y = number(text, "y");
        if left < 0.0 || right > width || y - size < 0.0 || y > height {
            problems.push(format!(
                "{content:?} at x {left:.0}..{right:.0}, y {y:.0} leaves the {width}x{height} canvas"
            ));
        }
        for shorthand in ["(?)", "locally, ", "by peer, "] {
            if content.contains(shorthand) {
                problems.push(format!(
                    "{content:?}: trace shorthand {shorthand:?} in a label"
                ));
            }
        }
    }
    problems
}
