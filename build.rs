//! Embeds every `boards/**/*.toml` in the binary, so an installed sbcflash needs no data
//! directory and a new descriptor file is picked up without editing a list.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|x| x == "toml") {
            out.push(p);
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let boards = root.join("boards");
    println!("cargo:rerun-if-changed=boards");
    let mut files = Vec::new();
    collect(&boards, &mut files);
    files.sort();
    let mut src = String::from("/// (path relative to the crate, contents) of every shipped descriptor.\npub static EMBEDDED: &[(&str, &str)] = &[\n");
    for f in &files {
        // Directories are listed too so adding a file to an existing subdirectory reruns us.
        if let Some(parent) = f.parent() {
            println!("cargo:rerun-if-changed={}", parent.display());
        }
        println!("cargo:rerun-if-changed={}", f.display());
        let rel = f.strip_prefix(&root).expect("under manifest dir");
        let _ = writeln!(
            src,
            "    ({:?}, include_str!({:?})),",
            rel.to_string_lossy(),
            f.to_string_lossy()
        );
    }
    src.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("embedded_boards.rs");
    std::fs::write(out, src).expect("write embedded_boards.rs");
}
