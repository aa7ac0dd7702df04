//! The layering of `shell-api/src`, kept by a test (ARCHITECTURE.md, "Layers"). Each file belongs to a module (its
//! first path component); modules are plumbing, areas or the composition root:
//! - the composition root (`lib.rs`, `main.rs`, `cli.rs`, `server.rs`) may import anything;
//! - plumbing (HTTP frame, auth, errors, pagination, idempotency, config, database, metrics, OpenAPI base) imports
//!   only plumbing and the root's state (`AppState`, `Settings`, …), never an area;
//! - an area imports plumbing, the root's state, itself, and only the other areas `ALLOWED` names.
//!
//! The imports are read as text: every `crate::name` and every name at the top of a `crate::{…}` group, up to the
//! file's `#[cfg(test)]` (tests may reach further).

/// Modules of the HTTP plumbing.
const PLUMBING: &[&str] = &[
    "abuse",
    "auth",
    "config",
    "db",
    "error",
    "extract",
    "guard",
    "idempotency",
    "metrics",
    "notify",
    "openapi",
    "pagination",
];
/// The composition root and the commands.
const ROOT: &[&str] = &["lib", "app", "main", "cli", "server", "layering"];
/// Each area and the top-level modules (folders) it is made of.
const AREAS: &[(&str, &[&str])] = &[
    ("members", &["members"]),
    ("catalog", &["catalog"]),
    ("stores", &["stores"]),
    ("drops", &["drops"]),
    ("feeds", &["feeds"]),
    ("shop", &["shop"]),
    ("subscriptions", &["subscriptions"]),
    ("live", &["live"]),
    ("ops", &["ops"]),
    ("campaigns", &["campaigns"]),
    ("admin", &["admin"]),
];
/// Which areas an area may import besides itself.
const ALLOWED: &[(&str, &[&str])] = &[
    ("drops", &["catalog"]),
    ("live", &["drops", "catalog"]),
    ("shop", &["catalog", "live"]),
    // A store's product list shows the catalogue's product body and reuses its search pattern.
    ("stores", &["catalog"]),
    ("subscriptions", &["shop"]),
    ("campaigns", &["drops"]),
    ("admin", &["catalog"]),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    Root,
    Plumbing,
    Area(&'static str),
}

fn layer_of(module: &str) -> Option<Layer> {
    if ROOT.contains(&module) {
        return Some(Layer::Root);
    }
    if PLUMBING.contains(&module) {
        return Some(Layer::Plumbing);
    }
    AREAS
        .iter()
        .find(|(_, modules)| modules.contains(&module))
        .map(|(area, _)| Layer::Area(area))
}

/// The crate's top-level names a file's text imports (before its `#[cfg(test)]`).
fn imports(text: &str) -> Vec<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or(text);
    let mut names = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The names at the top of the group: split on commas at depth 0, take each part's first name.
            let mut depth = 0;
            let mut part = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.push(std::mem::take(&mut part));
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    part.push(c);
                }
            }
            names.push(part);
        } else {
            names.push(rest.to_owned());
        }
    }
    names
        .iter()
        .filter_map(|name| {
            let name: String = name
                .trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// Every import that breaks the layering, as "file imports module (why)". `files` are paths relative to `src/` with
/// their text.
fn violations(files: &[(String, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for (path, text) in files {
        let module = path
            .split('/')
            .next()
            .unwrap_or(path)
            .trim_end_matches(".rs");
        let Some(from) = layer_of(module) else {
            found.push(format!("{path}: module `{module}` is in no layer"));
            continue;
        };
        for name in imports(text) {
            // Names that are no module are the root's items (AppState, Settings, macros); anyone may use those.
            let Some(to) = layer_of(&name) else { continue };
            let allowed = match (from, to) {
                (Layer::Root, _) | (_, Layer::Plumbing) => true,
                (Layer::Plumbing, _) | (_, Layer::Root) => false,
                (Layer::Area(a), Layer::Area(b)) => {
                    a == b
                        || ALLOWED
                            .iter()
                            .any(|(area, to)| *area == a && to.contains(&b))
                }
            };
            if !allowed {
                found.push(format!("{path} imports `{name}` ({from:?} -> {to:?})"));
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_tree(dir: &std::path::Path, base: &std::path::Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                read_tree(&path, base, out);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                let relative = path.strip_prefix(base).expect("under src");
                out.push((
                    relative.to_string_lossy().into_owned(),
                    std::fs::read_to_string(&path).expect("read file"),
                ));
            }
        }
    }

    #[test]
    fn shell_api_keeps_its_layers() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        read_tree(&src, &src, &mut files);
        assert!(files.len() > 30, "read {} files", files.len());
        assert_eq!(violations(&files), Vec::<String>::new());
    }

    #[test]
    fn a_back_import_is_caught() {
        let files = |path: &str, text: &str| vec![(path.to_owned(), text.to_owned())];
        // Plumbing importing an area, directly and inside a group.
        assert_eq!(
            violations(&files("error.rs", "use crate::drops::DropBody;")).len(),
            1
        );
        assert_eq!(
            violations(&files(
                "auth.rs",
                "use crate::{error::ApiError, shop::{search, cart}};"
            ))
            .len(),
            1
        );
        // An area importing one it may not; the allowed direction and root items pass.
        assert_eq!(
            violations(&files("catalog/products.rs", "crate::shop::cart::add(&s);")).len(),
            1
        );
        assert!(violations(&files(
            "shop/cart.rs",
            "use crate::catalog::products::Product;"
        ))
        .is_empty());
        assert!(violations(&files("live/mod.rs", "use crate::{AppState, drops::x};")).is_empty());
        // Imports in tests are not read.
        assert!(violations(&files("error.rs", "#[cfg(test)]\nuse crate::drops::x;")).is_empty());
        // A new top-level module must be given a layer.
        assert_eq!(violations(&files("wishlists.rs", "")).len(), 1);
        // The catalogue knows stores only as SQL: importing the area is a back-import.
        assert_eq!(
            violations(&files(
                "catalog/products.rs",
                "use crate::stores::StoreBody;"
            ))
            .len(),
            1
        );
    }
}
