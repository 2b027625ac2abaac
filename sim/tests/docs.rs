//! docs/SCENARIOS.md documents every field a scenario file may hold (a hand-written one,
//! or one `shrink` wrote): each public field of the format's structs, under its serde
//! name, appears there as `name = ...`, as `` `name` ``, or as a table header.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

use std::path::Path;

/// The fields of the format: (file, serde name), skipping `#[serde(skip)]` ones.
fn fields(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut attrs = String::new();
    for line in source.lines() {
        let line = line.trim();
        if line.starts_with("#[") {
            attrs.push_str(line);
            continue;
        }
        if line.starts_with("///") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("pub ")
            && let Some((name, _)) = rest.split_once(':')
            && name.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            && !attrs.contains("serde(skip)")
        {
            let renamed = attrs
                .split("rename = \"")
                .nth(1)
                .and_then(|r| r.split('"').next());
            out.push(renamed.unwrap_or(name).to_owned());
        }
        attrs.clear();
    }
    out
}

fn documented(doc: &str, name: &str) -> bool {
    doc.contains(&format!("`{name}`"))
        || doc.contains(&format!("[{name}]"))
        || doc.contains(&format!("[[{name}]]"))
        || doc.contains(&format!(".{name}]"))
        || doc.lines().any(|l| {
            l.split(['{', ',', '#'])
                .any(|part| part.trim_start().starts_with(&format!("{name} =")))
        })
}

#[test]
fn every_field_of_the_scenario_format_is_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("../docs/SCENARIOS.md")).unwrap();
    let mut missing = Vec::new();
    let mut seen = 0;
    for file in ["src/scenario.rs", "src/scenario/tables.rs"] {
        let source = std::fs::read_to_string(root.join(file)).unwrap();
        for name in fields(&source) {
            seen += 1;
            if !documented(&doc, &name) {
                missing.push(format!("{file}: {name}"));
            }
        }
    }
    assert!(seen > 60, "only {seen} fields found: the reader is broken");
    assert!(
        missing.is_empty(),
        "undocumented in docs/SCENARIOS.md: {missing:#?}"
    );
}
