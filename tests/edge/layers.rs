//! The crate's modules depend on each other one way only (`cargo test --test edge layers`).
//!
//! Reads every source file under `src/` (test modules and comments left out), finds the
//! crate modules each one names (`crate::x`), and checks every such dependency against
//! one declared order, from the leaves up: the contract's data, the validated state,
//! the published table, the writers, the request path, the services. A dependency that
//! points up the order — the start of a circle — fails with the file that holds it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every top-level module of `src/`, lowest first. A module may use only modules
/// before it.
#[rustfmt::skip]
const ORDER: &[&str] = &[
    // leaves: they use nothing of the crate
    "allocator", "clock", "codes", "cow", "files", "hook", "metrics", "services", "usage",
    // the answers the edge makes itself, as values
    "answer",
    // the contract's data, then the rules between objects; DNS answers (verification,
    // DNS-01 checks)
    "schema", "state", "dns",
    // what a snapshot's readers need: keys and share records, pages, the access log line
    "access", "pages", "access_log",
    // the published snapshot
    "routing",
    // static releases (files a snapshot names), public storage objects, the operators'
    // file (assembling sections owned by the modules below it), the writers
    "releases", "storage", "config", "store", "reload",
    // behaviour around the request path and the background services
    "hostile", "front", "tls", "upstream", "cluster", "acme", "control",
    // the request path, then start-up
    "proxy", "server",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without its test module and comments.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The crate modules `code` names through `crate::`.
fn uses(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let name: String = rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

#[test]
fn layers_modules_depend_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let rank = |m: &str| ORDER.iter().position(|x| *x == m);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut wrong = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("a component").as_os_str().to_string_lossy().into_owned();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" || rel.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let Some(me) = rank(&module) else {
            wrong.push(format!("src/{} belongs to module `{module}`, which ORDER does not place", rel.display()));
            continue;
        };
        let text = std::fs::read_to_string(f).expect("read source");
        for used in uses(&code_of(&text)) {
            if used == module {
                continue;
            }
            graph.entry(module.clone()).or_default().insert(used.clone());
            match rank(&used) {
                Some(r) if r < me => {}
                Some(_) => wrong.push(format!("src/{} (`{module}`) uses `{used}`, which is not below it", rel.display())),
                None => wrong.push(format!("src/{} uses `crate::{used}`, which ORDER does not place", rel.display())),
            }
        }
    }
    assert!(wrong.is_empty(), "dependencies that point up:\n  {}", wrong.join("\n  "));
    // The check can fail: the request path does depend on the table, and the table on
    // the schema.
    assert!(graph["proxy"].contains("routing") && graph["routing"].contains("schema"), "{graph:?}");
}

#[test]
fn layers_check_sees_uses_and_skips_tests_and_comments() {
    let code =
        code_of("use crate::routing::X; // crate::proxy\nfn f() { crate::schema::y(); }\n#[cfg(test)]\nmod tests { use crate::server; }\n");
    assert_eq!(uses(&code).into_iter().collect::<Vec<_>>(), ["routing", "schema"]);
}
