//! `p2p-node check`: every check `serve` makes at start, without starting (like `nginx -t`
//! or `promtool check config`). Nothing is bound; the data directory is opened only to read
//! it, and not at all while a running node holds it.
//!
//! Problems are collected, not stopped at: one run lists everything to fix. The config
//! file's own errors (syntax, unknown fields, bad values) come first and alone, since
//! nothing after them can be read.

use std::net::ToSocketAddrs;
use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

use crate::ServePlan;
use crate::allow::{AllowFile, AllowSource};

/// Runs the checks on a plan `serve` would start from; prints what it found. An error
/// lists every problem.
pub(crate) fn run(plan: &ServePlan) -> Result<(), String> {
    let mut problems = Vec::new();
    let mut report = |what: &str, result: Result<String, String>| match result {
        Ok(found) => println!("{what}: {found}"),
        Err(problem) => problems.push(format!("{what}: {problem}")),
    };
    report(
        "key",
        Ok(format!(
            "{}, peer id {}",
            plan.key_path.display(),
            plan.key.peer_id()
        )),
    );
    report("listen", listen(&plan.listen));
    report("allow", allow(&plan.allow));
    if let Some(dir) = &plan.data_dir {
        report("data_dir", data_dir(dir));
    }
    if let Some(records) = &plan.records {
        report(
            "records",
            Ok(records
                .backend
                .as_ref()
                .map_or_else(|| "no directory".to_owned(), |b| b.describe())),
        );
    }
    report(
        "exec",
        command(plan.options.exec.as_deref()).map(|()| {
            plan.options
                .exec
                .clone()
                .unwrap_or_else(|| "none: requests are echoed".to_owned())
        }),
    );
    if let Some(addr) = plan.options.metrics {
        report("metrics", Ok(format!("http://{addr}/metrics")));
    }
    if problems.is_empty() {
        println!("ok: `serve` would start with this configuration");
        return Ok(());
    }
    for problem in &problems {
        eprintln!("p2p-node check: {problem}");
    }
    Err(format!(
        "{} problem{} found; `serve` would not start",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    ))
}

fn listen(listen: &str) -> Result<String, String> {
    let addrs: Vec<_> = listen
        .to_socket_addrs()
        .map_err(|e| format!("{listen:?} is not an address to listen on: {e}"))?
        .collect();
    match addrs.first() {
        Some(addr) => Ok(addr.to_string()),
        None => Err(format!("{listen:?} resolves to no address")),
    }
}

fn allow(source: &AllowSource) -> Result<String, String> {
    let file = AllowFile::load(source.clone(), SystemTime::now())?;
    let report = file.report();
    let peers = crate::allow::peers(file.in_force().peers().count());
    Ok(match (&report.path, file.membership()) {
        (Some(path), Some(doc)) => format!(
            "membership {path}: network {:?}, epoch {}, {peers} allowed",
            doc.document().network,
            doc.epoch()
        ),
        (Some(path), None) => format!("{path}: {peers} in force"),
        (None, _) => "any authenticated peer (insecure)".to_owned(),
    })
}

/// A data directory: a folder, or a path one can be created at; what it holds.
fn data_dir(dir: &Path) -> Result<String, String> {
    let shown = dir.display();
    if !dir.exists() {
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
        return match parent {
            Some(p) if !p.is_dir() => Err(format!(
                "{shown} does not exist, nor does its parent {}",
                p.display()
            )),
            _ => Ok(format!("{shown} (created at start)")),
        };
    }
    if !dir.is_dir() {
        return Err(format!("{shown} is not a directory"));
    }
    let db = dir.join(p2p_handler::store::DB_FILE);
    if !db.exists() {
        return Ok(format!("{shown} (empty: a new store is made at start)"));
    }
    match p2p_handler::RedbStore::open(dir) {
        Ok(mut store) => {
            use p2p_handler::Store;
            let rows = store.load().map_err(|e| format!("{shown}: {e}"))?;
            Ok(format!("{shown} (a store of {} records)", rows.len()))
        }
        Err(e) if e.to_string().contains("already open") || e.to_string().contains("lock") => {
            Ok(format!("{shown} (in use by a running node: not read)"))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// A command the shell can read, whose program exists when it starts with a plain word.
/// Used by `serve` at start too: a missing program would refuse every request.
pub(crate) fn command(cmd: Option<&str>) -> Result<(), String> {
    let Some(cmd) = cmd else { return Ok(()) };
    let syntax = Command::new("sh")
        .args(["-n", "-c", cmd])
        .output()
        .map_err(|e| format!("cannot run sh to read --exec {cmd:?}: {e}"))?;
    if !syntax.status.success() {
        return Err(format!(
            "the shell cannot read --exec {cmd:?}: {}",
            String::from_utf8_lossy(&syntax.stderr).trim()
        ));
    }
    let Some(program) = cmd.split_whitespace().next().filter(|w| plain(w)) else {
        return Ok(()); // An assignment, a subshell, a quoted word: the shell's business.
    };
    let found = Command::new("sh")
        .args(["-c", "command -v \"$1\" >/dev/null", "sh", program])
        .status()
        .map_err(|e| format!("cannot run sh to look for {program:?}: {e}"))?;
    if found.success() {
        Ok(())
    } else {
        Err(format!(
            "--exec {cmd:?}: {program:?} is not a command here (not a shell builtin, not on \
             PATH {:?}); every request would be refused",
            std::env::var("PATH").unwrap_or_default()
        ))
    }
}

/// A word the shell runs as a program name as it is: no quoting, expansion or assignment.
fn plain(word: &str) -> bool {
    !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./+".contains(c))
}
