//! The `--json` contract, checked on every JSON line a test sees: each line is one documented
//! event of docs/json.md (its fields exactly), and no Rust type leaks into it (`{"Ok": ...}`,
//! `{"Some": ...}`, an enum variant name as a key).

/// One row of the events table in docs/json.md.
#[derive(Debug)]
pub struct SchemaRow {
    pub event: String,
    pub fields: Vec<String>,
    pub optional: Vec<String>,
    pub by: String,
}

fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

pub fn schema_rows() -> Vec<SchemaRow> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/json.md"))
        .expect("docs/json.md");
    let (begin, end) = ("<!-- events:begin -->", "<!-- events:end -->");
    let a = doc.find(begin).expect("events:begin marker") + begin.len();
    let b = doc.find(end).expect("events:end marker");
    let rows: Vec<SchemaRow> = doc[a..b]
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            SchemaRow {
                event: backticked(cells[1]).remove(0),
                fields: backticked(cells[2]),
                optional: backticked(cells[3]),
                by: cells[4].to_string(),
            }
        })
        .collect();
    assert!(rows.len() > 15, "events table not found: {rows:?}");
    rows
}

/// Object keys anywhere in `v` that are Rust names, not JSON field names: `Ok`/`Err`/`Some`/
/// `None`, or a PascalCase enum variant wrapping its contents (`{"Rockusb": {...}}`).
pub fn rust_type_leaks(v: &serde_json::Value) -> Vec<String> {
    fn pascal(k: &str) -> bool {
        let mut c = k.chars();
        c.next().is_some_and(|f| f.is_ascii_uppercase())
            && k.chars().all(|c| c.is_ascii_alphanumeric())
            && k.chars().any(|c| c.is_ascii_lowercase())
    }
    fn walk(v: &serde_json::Value, at: &str, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(o) => {
                for (k, v) in o {
                    let here = format!("{at}.{k}");
                    if ["Ok", "Err", "Some", "None"].contains(&k.as_str()) || pascal(k) {
                        out.push(here.clone());
                    }
                    walk(v, &here, out);
                }
            }
            serde_json::Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    walk(v, &format!("{at}[{i}]"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, "", &mut out);
    out
}

/// The index of the documented row `line` matches, or why it matches none.
pub fn match_row(rows: &[SchemaRow], line: &str) -> Result<usize, String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON ({e}): {line}"))?;
    let leaks = rust_type_leaks(&v);
    if !leaks.is_empty() {
        return Err(format!("Rust types in the JSON at {leaks:?}: {line}"));
    }
    let obj = v.as_object().ok_or(format!("not an object: {line}"))?;
    if obj.get("schema") != Some(&serde_json::json!(sbcflash::progress::JSON_SCHEMA_VERSION)) {
        return Err(format!("no \"schema\": 1: {line}"));
    }
    let event = obj
        .get("event")
        .and_then(|e| e.as_str())
        .ok_or(format!("no \"event\": {line}"))?;
    let mut why = Vec::new();
    for (i, r) in rows.iter().enumerate().filter(|(_, r)| r.event == event) {
        let missing: Vec<&String> = r.fields.iter().filter(|f| !obj.contains_key(*f)).collect();
        let extra: Vec<&String> = obj
            .keys()
            .filter(|k| !["event", "schema"].contains(&k.as_str()))
            .filter(|k| !r.fields.contains(k) && !r.optional.contains(k))
            .collect();
        if missing.is_empty() && extra.is_empty() {
            return Ok(i);
        }
        why.push(format!(
            "({}) missing {missing:?}, undocumented {extra:?}",
            r.by
        ));
    }
    if why.is_empty() {
        return Err(format!("event `{event}` is not documented: {line}"));
    }
    Err(format!("{line}\n  {}", why.join("\n  ")))
}

/// Panics unless every line of a `--json` command's stdout is a documented, leak-free event.
pub fn assert_documented(stdout: &str) {
    let rows = schema_rows();
    let bad: Vec<String> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| match_row(&rows, l).err())
        .collect();
    assert!(
        bad.is_empty(),
        "--json output off its schema:\n{}",
        bad.join("\n")
    );
}
