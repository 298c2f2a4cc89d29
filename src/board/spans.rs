//! Key paths ↔ byte positions in a TOML text, so descriptor errors can name both the key and
//! its `line:col` (serde errors only carry a span; validation errors only know the key path).

use toml_edit::{ImDocument, Item, Value};

/// A parsed document kept only for span lookups.
pub(crate) struct Spans<'a> {
    doc: Option<ImDocument<&'a str>>,
}

impl<'a> Spans<'a> {
    pub(crate) fn new(text: &'a str) -> Spans<'a> {
        Spans {
            doc: ImDocument::parse(text).ok(),
        }
    }

    /// Byte offset of the key (or, for array indexes, the element) named by a dotted path such
    /// as `storage.1.layout.placements.0.sector`. Falls back to the deepest prefix found.
    pub(crate) fn locate(&self, path: &str) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut node = Node::Item(doc.as_item());
        let mut best = None;
        for seg in path.split('.').filter(|s| !s.is_empty()) {
            let (next, span) = match seg.parse::<usize>() {
                Ok(i) => node.index(i)?,
                Err(_) => node.key(seg)?,
            };
            if span.is_some() {
                best = span;
            }
            node = next;
        }
        best
    }

    /// Dotted path of the deepest key whose key or value contains byte `offset`.
    pub(crate) fn path_at(&self, offset: usize) -> Option<String> {
        let doc = self.doc.as_ref()?;
        let mut path = Vec::new();
        walk(Node::Item(doc.as_item()), offset, &mut path);
        if path.is_empty() {
            None
        } else {
            Some(path.join("."))
        }
    }
}

#[derive(Clone, Copy)]
enum Node<'d> {
    Item(&'d Item),
    Value(&'d Value),
    /// An element of an array of tables (a `Table`, not wrapped in an `Item`).
    Table(&'d toml_edit::Table),
}

type Step<'d> = (Node<'d>, Option<usize>);

impl<'d> Node<'d> {
    fn key(self, k: &str) -> Option<Step<'d>> {
        match self {
            Node::Item(Item::Table(t)) | Node::Table(t) => {
                let (key, item) = t.get_key_value(k)?;
                Some((Node::Item(item), key.span().map(|s| s.start)))
            }
            Node::Item(Item::Value(v)) | Node::Value(v) => {
                let t = v.as_inline_table()?;
                let (key, item) = t.get_key_value(k)?;
                Some((Node::Item(item), key.span().map(|s| s.start)))
            }
            _ => None,
        }
    }

    fn index(self, i: usize) -> Option<Step<'d>> {
        match self {
            Node::Item(Item::ArrayOfTables(a)) => {
                let t = a.get(i)?;
                // Point at the table header if known, else at its first key.
                let span = t.span().map(|s| s.start).or_else(|| {
                    t.iter()
                        .next()
                        .and_then(|(k, _)| t.key(k).and_then(|k| k.span()).map(|s| s.start))
                });
                Some((Node::Table(t), span))
            }
            Node::Item(Item::Value(v)) | Node::Value(v) => {
                let a = v.as_array()?;
                let e = a.get(i)?;
                Some((Node::Value(e), e.span().map(|s| s.start)))
            }
            _ => None,
        }
    }
}

fn walk(node: Node<'_>, offset: usize, path: &mut Vec<String>) {
    let contains = |r: Option<std::ops::Range<usize>>| r.is_some_and(|r| r.contains(&offset));
    match node {
        Node::Item(Item::Table(t)) | Node::Table(t) => {
            for (k, item) in t.iter() {
                let key_span = t.key(k).and_then(|k| k.span());
                if contains(key_span) || contains(item.span()) || item_contains(item, offset) {
                    path.push(k.to_string());
                    walk(Node::Item(item), offset, path);
                    return;
                }
            }
        }
        Node::Item(Item::ArrayOfTables(a)) => {
            for (i, t) in a.iter().enumerate() {
                if table_contains(t, offset) {
                    path.push(i.to_string());
                    walk(Node::Table(t), offset, path);
                    return;
                }
            }
        }
        Node::Item(Item::Value(v)) | Node::Value(v) => {
            if let Some(t) = v.as_inline_table() {
                for (k, val) in t.iter() {
                    let key_span = t.key(k).and_then(|k| k.span());
                    if contains(key_span) || contains(val.span()) {
                        path.push(k.to_string());
                        walk(Node::Value(val), offset, path);
                        return;
                    }
                }
            } else if let Some(a) = v.as_array() {
                for (i, e) in a.iter().enumerate() {
                    if contains(e.span()) {
                        path.push(i.to_string());
                        walk(Node::Value(e), offset, path);
                        return;
                    }
                }
            }
        }
        _ => {}
    }
}

fn item_contains(item: &Item, offset: usize) -> bool {
    match item {
        Item::Table(t) => table_contains(t, offset),
        Item::ArrayOfTables(a) => a.iter().any(|t| table_contains(t, offset)),
        _ => false,
    }
}

fn table_contains(t: &toml_edit::Table, offset: usize) -> bool {
    if t.span().is_some_and(|r| r.contains(&offset)) {
        return true;
    }
    t.iter().any(|(k, item)| {
        t.key(k)
            .and_then(|k| k.span())
            .is_some_and(|r| r.contains(&offset))
            || item.span().is_some_and(|r| r.contains(&offset))
            || item_contains(item, offset)
    })
}
