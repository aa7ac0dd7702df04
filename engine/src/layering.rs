//! The engine's import order, kept by a test (ARCHITECTURE.md, "Layers"): `clock`, `core` and `payment` first, then
//! `types`, `store`, `writer`, `gate` and `service`. A file may import its own module and modules of an earlier
//! rank, never a later one, so the engine has no import cycle. The imports are read as text: every `crate::name` in a
//! line of code (comments skipped) before the file's `#[cfg(test)]`.

/// Each top-level module's rank; a module imports only lower ranks and itself.
const RANKS: &[(&str, u8)] = &[
    ("clock", 0),
    ("core", 0),
    ("payment", 0),
    ("types", 1),
    ("store", 2),
    ("writer", 3),
    ("gate", 4),
    ("service", 5),
    ("lib", 6),
    ("layering", 6),
];

fn rank(module: &str) -> Option<u8> {
    RANKS
        .iter()
        .find(|(name, _)| *name == module)
        .map(|(_, rank)| *rank)
}

/// The top-level modules a file's code imports with `crate::`.
fn imports(text: &str) -> Vec<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or(text);
    let mut names = Vec::new();
    for line in code.lines() {
        if line.trim_start().starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                names.push(name);
            }
        }
    }
    names
}

/// Every `.rs` file under `dir`, with the top-level module it belongs to.
fn files(dir: &std::path::Path, module: Option<&str>, out: &mut Vec<(String, std::path::PathBuf)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src")
        .map(|entry| entry.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        let owner = module.map_or_else(|| stem.clone(), str::to_owned);
        if path.is_dir() {
            files(&path, Some(&owner), out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push((owner, path));
        }
    }
}

/// The imports of `files` that break the order, as "file imports module" lines.
fn violations(files: &[(String, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for (module, text) in files {
        let Some(own) = rank(module) else {
            found.push(format!("{module} has no rank: give it one in layering.rs"));
            continue;
        };
        for name in imports(text) {
            match rank(&name) {
                Some(theirs) if name == *module || theirs < own => {}
                _ => found.push(format!("{module} imports crate::{name}")),
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_imports_in_one_direction() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut found = Vec::new();
        files(&src, None, &mut found);
        assert!(found.len() > 20, "read {} files", found.len());
        let texts: Vec<(String, String)> = found
            .into_iter()
            .map(|(module, path)| (module, std::fs::read_to_string(path).expect("read file")))
            .collect();
        assert_eq!(violations(&texts), Vec::<String>::new());
    }

    #[test]
    fn a_back_import_or_an_unranked_module_fails() {
        let planted = [
            ("store".to_owned(), "use crate::gate::Restore;\n".to_owned()),
            (
                "types".to_owned(),
                "use crate::types::HoldRow;\nuse crate::core::X;\n// crate::service in a comment\n"
                    .to_owned(),
            ),
            ("queue".to_owned(), "use crate::core::X;\n".to_owned()),
        ];
        assert_eq!(
            violations(&planted),
            vec![
                "store imports crate::gate".to_owned(),
                "queue has no rank: give it one in layering.rs".to_owned(),
            ]
        );
    }
}
