//! From an error chain to an exit code. The one place that knows every library error type: the
//! CLI depends on all modules anyway, while `exit` stays a leaf they all import.

use crate::exit::{Classify, Exit, ExitError};

/// Find the most specific exit class in an anyhow chain: the first error in the chain whose
/// type is listed in `classify_dyn` wins.
pub fn classify(err: &anyhow::Error) -> Exit {
    err.chain().find_map(classify_dyn).unwrap_or(Exit::Failure)
}

/// Each error type that implements [`Classify`] is listed here once; adding a module error
/// means adding a line.
fn classify_dyn(e: &(dyn std::error::Error + 'static)) -> Option<Exit> {
    fn class<T: Classify + std::error::Error + 'static>(
        e: &(dyn std::error::Error + 'static),
    ) -> Option<Exit> {
        e.downcast_ref::<T>().map(Classify::exit)
    }
    class::<ExitError>(e)
        .or_else(|| class::<crate::image::ImageError>(e))
        .or_else(|| class::<crate::config::ConfigError>(e))
        .or_else(|| class::<crate::board::BoardError>(e))
        .or_else(|| class::<crate::write::WriteError>(e))
        .or_else(|| class::<crate::target::TargetError>(e))
        .or_else(|| class::<crate::acquire::AcquireError>(e))
        .or_else(|| class::<crate::console::ConsoleError>(e))
        .or_else(|| class::<crate::station::StationError>(e))
        .or_else(|| class::<crate::station::fatinject::FatError>(e))
        .or_else(|| class::<crate::usb::Error>(e))
        .or_else(|| class::<crate::usb::TransportError>(e))
        .or_else(|| class::<crate::capture::CaptureError>(e))
        .or_else(|| class::<crate::cardcheck::CheckError>(e))
        .or_else(|| class::<crate::trust::TrustError>(e))
        .or_else(|| class::<crate::tryboot::TryError>(e))
        .or_else(|| {
            e.downcast_ref::<std::io::Error>().map(|x| match x.kind() {
                std::io::ErrorKind::Interrupted => Exit::Interrupted,
                _ => Exit::Io,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transport error under plain context (no `usb::Error` around it) still gets its class.
    #[test]
    fn transport_error_is_classified() {
        let e = anyhow::Error::new(crate::usb::TransportError::Timeout).context("probing");
        assert_eq!(classify(&e), Exit::Timeout);
        let e = anyhow::Error::new(crate::usb::TransportError::Access).context("opening");
        assert_eq!(classify(&e), Exit::Environment);
        let e = anyhow::Error::new(crate::usb::TransportError::Stall).context("reading");
        assert_eq!(classify(&e), Exit::Io);
    }
}
