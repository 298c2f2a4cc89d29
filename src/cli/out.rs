//! Results go to stdout through [`stdout`], never `println!`: a reader that closes the pipe
//! early (`sbcflash boards | head -1`) makes the next write fail with [`StdoutClosed`] instead
//! of a panic, and `cli::main` ends the run quietly with exit 0 (the reader got what it
//! wanted; as ripgrep does). Any other broken pipe (a child process, a download) stays an error.

use std::io::{self, Write};

/// The reader of stdout went away.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed by its reader")]
pub(crate) struct StdoutClosed;

/// Locked stdout whose broken pipe is recognisably ours.
pub(crate) struct Out(io::StdoutLock<'static>);

/// The handle every result line is written through.
pub(crate) fn stdout() -> Out {
    Out(io::stdout().lock())
}

fn mark(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        io::Error::new(io::ErrorKind::BrokenPipe, StdoutClosed)
    } else {
        e
    }
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(mark)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf).map_err(mark)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(mark)
    }
}

/// Whether `err` is stdout's reader going away (see the module docs).
pub(crate) fn is_stdout_closed(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.is::<StdoutClosed>()
            || c.downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<StdoutClosed>())
    })
}

/// `println!` to [`stdout`], returning from the enclosing function with the error (`?`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!($crate::cli::out::stdout(), $($arg)*)?
    }};
}

/// `print!` to [`stdout`], returning from the enclosing function with the error (`?`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!($crate::cli::out::stdout(), $($arg)*)?
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_marked_broken_pipe_is_stdout_closed() {
        let ours = anyhow::Error::new(mark(io::Error::from(io::ErrorKind::BrokenPipe)));
        assert!(is_stdout_closed(&ours.context("printing")));
        let child = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(!is_stdout_closed(&child));
        let other = anyhow::Error::new(mark(io::Error::from(io::ErrorKind::Other)));
        assert!(!is_stdout_closed(&other));
    }
}
