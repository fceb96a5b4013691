//! The library's modules import each other without a circle: the graph of
//! `crate::<module>` references between top-level modules (`src/<module>.rs`
//! or `src/<module>/`), outside comments and each file's `#[cfg(test)]` section, is
//! acyclic. A circle means two modules cannot be understood, changed or
//! tested one without the other.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Every top-level module's references to the others.
fn library_graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = Graph::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(&src).unwrap();
            let first = relative.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
            let module = first.trim_end_matches(".rs").to_owned();
            if module == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Comments (doc links included) are not imports.
            let code: String = text
                .split("#[cfg(test)]")
                .next()
                .unwrap()
                .lines()
                .filter(|line| !line.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            let targets = graph.entry(module.clone()).or_default();
            for (at, _) in code.match_indices("crate::") {
                // `crate::` inside a longer path (`simclr::crate::`) cannot occur; a
                // preceding identifier character would mean e.g. `my_crate::`.
                if code[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                let rest = &code[at + "crate::".len()..];
                // `crate::{a::X, b}` names several paths at once.
                let paths: Vec<&str> = match rest.strip_prefix('{') {
                    Some(group) => group[..group.find('}').unwrap_or(group.len())].split(',').collect(),
                    None => vec![rest],
                };
                for path in paths {
                    let name: String =
                        path.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if !name.is_empty() && name != module && name.chars().next().unwrap().is_lowercase() {
                        targets.insert(name);
                    }
                }
            }
        }
    }
    graph
}

/// A circle in `graph`, as the modules along it, if there is one.
fn find_circle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(node: &str, graph: &Graph, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut circle = path[start..].to_vec();
            circle.push(node.to_owned());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_library_has_no_import_circle() {
    let graph = library_graph();
    assert!(graph.len() > 10, "found only {:?}", graph.keys());
    assert!(graph["train"].contains("config"), "the scan sees train's use of config: {graph:?}");
    if let Some(circle) = find_circle(&graph) {
        panic!("import circle: {}", circle.join(" -> "));
    }
}

#[test]
fn a_circle_is_found() {
    // Negative control: the check reports a circle when there is one.
    let mut graph = library_graph();
    graph.entry("device".to_owned()).or_default().insert("train".to_owned());
    let circle = find_circle(&graph).expect("train -> device -> train");
    assert!(circle.contains(&"device".to_owned()) && circle.contains(&"train".to_owned()), "{circle:?}");
}
