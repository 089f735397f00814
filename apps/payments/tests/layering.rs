//! The layers of `src/` import only the layers below them:
//! domain ← store ← compute ← jobs ← http, and only `http/` speaks in
//! status codes. Checked on the source text, so a stray `use` fails here.

use std::path::{Path, PathBuf};

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The top-level modules a file refers to through `crate::`.
fn crate_refs(text: &str) -> Vec<String> {
    text.match_indices("crate::")
        .map(|(i, _)| {
            text[i + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

fn check(layer: &str, allowed: &[&str]) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let dir = src.join(layer);
    let files = if dir.is_dir() {
        sources(&dir)
    } else {
        vec![src.join(format!("{layer}.rs"))]
    };
    assert!(!files.is_empty(), "no sources for {layer}");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        for module in crate_refs(&text) {
            assert!(
                module == layer || allowed.contains(&module.as_str()),
                "{} ({layer}) uses crate::{module}",
                file.display()
            );
        }
        if layer != "http" {
            for http in ["axum", "StatusCode", "hyper::"] {
                assert!(
                    !text.contains(http),
                    "{} ({layer}) mentions {http}",
                    file.display()
                );
            }
        }
    }
}

#[test]
fn each_layer_imports_only_the_layers_below() {
    check("domain", &[]);
    check("store", &["domain"]);
    check("compute", &["domain"]);
    check("events", &[]);
    check(
        "jobs",
        &["domain", "store", "compute", "events", "state", "config"],
    );
}
