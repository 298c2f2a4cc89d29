//! The one seam between protocol logic and USB hardware.
//!
//! Every protocol in [`super`] is written against [`Transport`]: four transfer kinds with
//! explicit timeouts, nothing else. The rusb implementation below is the only code that touches
//! libusb; the simulated devices in `super::sim` implement the same trait from the device side,
//! which is how all protocols are tested without a USB bus.

use std::time::Duration;

/// A transfer failed. Kept small and copyable so simulated devices can inject each kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("transfer timed out")]
    Timeout,
    /// The device stalled the endpoint (libusb `PIPE`): it rejected the request.
    #[error("device stalled the request (endpoint halted)")]
    Stall,
    /// The device left the bus (cable pulled, board reset, re-enumeration).
    #[error("device disconnected")]
    Gone,
    #[error("permission denied opening the USB device")]
    Access,
    #[error("device sent more data than requested (overflow)")]
    Overflow,
    #[error("USB I/O error: {0}")]
    Other(String),
}

impl crate::exit::Classify for TransportError {
    fn exit(&self) -> crate::exit::Exit {
        use crate::exit::Exit;
        match self {
            TransportError::Timeout => Exit::Timeout,
            TransportError::Access => Exit::Environment,
            _ => Exit::Io,
        }
    }
}

/// The transfers a recovery protocol needs. Implementations own one claimed interface and its
/// bulk endpoint pair; control transfers go to the device (recipient device, vendor type is in
/// `request_type`).
pub trait Transport: Send {
    /// Control OUT with an optional data stage; returns bytes sent.
    fn control_out(
        &mut self,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        data: &[u8],
        timeout: Duration,
    ) -> Result<usize, TransportError>;

    /// Control IN; returns bytes received into `buf`.
    fn control_in(
        &mut self,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<usize, TransportError>;

    /// Bulk OUT on the claimed interface's OUT endpoint; returns bytes sent.
    fn bulk_out(&mut self, data: &[u8], timeout: Duration) -> Result<usize, TransportError>;

    /// Bulk IN on the claimed interface's IN endpoint; returns bytes received (a short packet
    /// ends the transfer early).
    fn bulk_in(&mut self, buf: &mut [u8], timeout: Duration) -> Result<usize, TransportError>;
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn control_out(
        &mut self,
        rt: u8,
        req: u8,
        value: u16,
        index: u16,
        data: &[u8],
        timeout: Duration,
    ) -> Result<usize, TransportError> {
        (**self).control_out(rt, req, value, index, data, timeout)
    }
    fn control_in(
        &mut self,
        rt: u8,
        req: u8,
        value: u16,
        index: u16,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<usize, TransportError> {
        (**self).control_in(rt, req, value, index, buf, timeout)
    }
    fn bulk_out(&mut self, data: &[u8], timeout: Duration) -> Result<usize, TransportError> {
        (**self).bulk_out(data, timeout)
    }
    fn bulk_in(&mut self, buf: &mut [u8], timeout: Duration) -> Result<usize, TransportError> {
        (**self).bulk_in(buf, timeout)
    }
}

impl From<rusb::Error> for TransportError {
    fn from(e: rusb::Error) -> Self {
        match e {
            rusb::Error::Timeout => TransportError::Timeout,
            rusb::Error::Pipe => TransportError::Stall,
            rusb::Error::NoDevice | rusb::Error::NotFound => TransportError::Gone,
            rusb::Error::Access => TransportError::Access,
            rusb::Error::Overflow => TransportError::Overflow,
            other => TransportError::Other(other.to_string()),
        }
    }
}

/// A claimed interface of a real device, through libusb.
pub(crate) struct RusbTransport {
    handle: rusb::DeviceHandle<rusb::Context>,
    interface: u8,
    ep_in: Option<u8>,
    ep_out: Option<u8>,
}

impl RusbTransport {
    /// Claim `interface` (detaching a kernel driver if one is bound, e.g. usb-storage) and find
    /// its bulk endpoints. Interfaces without bulk endpoints (the Rockchip maskrom, which only
    /// takes control transfers) are fine: bulk calls then fail with a clear error.
    pub(crate) fn open(
        device: &rusb::Device<rusb::Context>,
        interface: u8,
    ) -> Result<Self, TransportError> {
        let handle = device.open()?;
        // Not supported on every platform; claiming still works when nothing is bound.
        let _ = handle.set_auto_detach_kernel_driver(true);
        handle.claim_interface(interface)?;
        let (mut ep_in, mut ep_out) = (None, None);
        let config = device.active_config_descriptor()?;
        for iface in config.interfaces().filter(|i| i.number() == interface) {
            if let Some(alt) = iface.descriptors().next() {
                for ep in alt.endpoint_descriptors() {
                    if ep.transfer_type() != rusb::TransferType::Bulk {
                        continue;
                    }
                    match ep.direction() {
                        rusb::Direction::In if ep_in.is_none() => ep_in = Some(ep.address()),
                        rusb::Direction::Out if ep_out.is_none() => ep_out = Some(ep.address()),
                        _ => {}
                    }
                }
            }
        }
        Ok(Self {
            handle,
            interface,
            ep_in,
            ep_out,
        })
    }
}

impl RusbTransport {
    /// An unplug in the middle of a transfer reaches libusb as a failed transfer
    /// (`LIBUSB_ERROR_IO`); only later calls say `NO_DEVICE` (seen through the USB lab's real
    /// stack). Ask the device whether it is still there, so the user hears "disconnected".
    fn error(&self, e: rusb::Error) -> TransportError {
        if e == rusb::Error::Io {
            // The host's disconnect handling runs after the failed transfer: give it a moment.
            for _ in 0..10 {
                match self.handle.active_configuration() {
                    Err(rusb::Error::NoDevice) => return TransportError::Gone,
                    Err(_) => break,
                    Ok(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        e.into()
    }
}

impl Drop for RusbTransport {
    fn drop(&mut self) {
        let _ = self.handle.release_interface(self.interface);
    }
}

impl Transport for RusbTransport {
    fn control_out(
        &mut self,
        rt: u8,
        req: u8,
        value: u16,
        index: u16,
        data: &[u8],
        timeout: Duration,
    ) -> Result<usize, TransportError> {
        self.handle
            .write_control(rt, req, value, index, data, timeout)
            .map_err(|e| self.error(e))
    }
    fn control_in(
        &mut self,
        rt: u8,
        req: u8,
        value: u16,
        index: u16,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<usize, TransportError> {
        self.handle
            .read_control(rt, req, value, index, buf, timeout)
            .map_err(|e| self.error(e))
    }
    fn bulk_out(&mut self, data: &[u8], timeout: Duration) -> Result<usize, TransportError> {
        let ep = self
            .ep_out
            .ok_or_else(|| TransportError::Other("interface has no bulk OUT endpoint".into()))?;
        self.handle
            .write_bulk(ep, data, timeout)
            .map_err(|e| self.error(e))
    }
    fn bulk_in(&mut self, buf: &mut [u8], timeout: Duration) -> Result<usize, TransportError> {
        let ep = self
            .ep_in
            .ok_or_else(|| TransportError::Other("interface has no bulk IN endpoint".into()))?;
        self.handle
            .read_bulk(ep, buf, timeout)
            .map_err(|e| self.error(e))
    }
}
