//! A board's storage over rockusb as a capture [`Medium`]: the loader session the writer uses
//! (`write --via`, brought up by [`crate::usb::flash::bring_up`]), read with READ_LBA.

use super::{CaptureError, Medium};
use crate::usb::rockusb::RockusbSink;
use crate::write::{Sink, WriteError};

pub(crate) struct BoardStorage {
    sink: RockusbSink,
    name: String,
    size: u64,
}

impl BoardStorage {
    /// The storage the loader selected; `None` when the loader does not report its size
    /// (mainline U-Boot's rockusb has no READ_FLASH_INFO), as nothing says where it ends.
    pub(crate) fn new(sink: RockusbSink, name: String) -> Option<Self> {
        let size = sink.capacity()?;
        Some(BoardStorage { sink, name, size })
    }

    /// The session, to reset the board when the capture is done.
    pub(crate) fn into_sink(self) -> RockusbSink {
        self.sink
    }
}

impl Medium for BoardStorage {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_sectors(&mut self, buf: &mut [u8], offset: u64) -> Result<(), CaptureError> {
        let path = self.name.clone();
        self.sink.read_at(offset, buf).map_err(|e| match e {
            WriteError::Io { offset, source, .. } => CaptureError::Read {
                path,
                offset,
                source,
            },
            other => CaptureError::Read {
                path,
                offset,
                source: std::io::Error::other(other.to_string()),
            },
        })
    }
}
